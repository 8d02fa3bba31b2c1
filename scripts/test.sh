#!/usr/bin/env bash
# The test command of the README: sets up .venv, then runs every test but the GPU ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -m "not gpu" "$@"
