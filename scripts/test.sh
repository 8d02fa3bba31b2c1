#!/usr/bin/env bash
# The test command of the README: sets up .venv, runs the checks (ruff, ruff format, mypy), then
# every test but the GPU ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The dashboard's browser tests drive headless Chromium with Debian's chromedriver; install
# them when missing and we can (root with apt). Without them those tests skip, unless
# XSAM_REQUIRE_BROWSER=1 (CI), where they fail.
if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver for the browser tests" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        chromium chromium-driver >/dev/null; } \
        || echo "could not install them: the browser tests will skip (or fail under CI)" >&2
fi
# The house rules, before any test: lint, format and types. Each check runs even when an
# earlier one failed, so one run names every check that fails; then the run stops there.
failed=()
echo "checks: ruff check, ruff format --check, mypy" >&2
.venv/bin/ruff check . || failed+=("ruff check .")
.venv/bin/ruff format --check . || failed+=("ruff format --check .")
.venv/bin/mypy || failed+=("mypy")
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED check: %s\n' "${failed[@]}" >&2
    exit 1
fi
exec .venv/bin/python -m pytest -m "not gpu" "$@"
