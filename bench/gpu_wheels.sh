#!/usr/bin/env bash
# Downloads into <repo>/.whl the wheels that bench/gpu_check.sh needs on the lent GPU machine
# (CPython 3.12, x86-64, torch/numpy/pytest/pyyaml/tqdm/httpx already there, no network) and
# prints their total size. .whl/ is git-ignored; the device run carries it (`carry: [".whl"]`).
#
#   bash bench/gpu_wheels.sh
#
# Only the config schema's packages travel: pydantic and its dependencies. The serve stage
# would also need ray (its cp312 wheel alone is 79 MB, more than the 64 MiB a device run may
# carry with the whole working tree), fastapi, uvicorn, starlette, sqlalchemy, alembic and
# pydantic-settings; without them gpu_check.sh skips that stage and proves the same fit() on
# the GPU through `xsam train`. Versions: those the project's .venv resolves today (keep them
# in step with pyproject.toml's ranges).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python

NATIVE=("pydantic-core==2.50.5")
PURE=(
    "pydantic==2.14.4"
    "annotated-types==0.8.0"
    "typing-inspection==0.4.5"
    "typing-extensions==4.16.0"
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64
    manylinux2014_x86_64 manylinux1_x86_64)

rm -rf .whl
mkdir -p .whl
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platform_args[@]}" -d .whl "${NATIVE[@]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation py --abi none --platform any -d .whl "${PURE[@]}"
ls -l .whl/*.whl | awk '{printf "%10d  %s\n", $5, $9}'
du -cb .whl/*.whl | tail -n 1 | awk '{printf "total: %d bytes (%.2f MiB)\n", $1, $1 / 1048576}'
