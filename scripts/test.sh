#!/usr/bin/env bash
# The test command of the README: sets up .venv, then runs every test but the GPU ones.
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
exec .venv/bin/python -m pytest -m "not gpu" "$@"
