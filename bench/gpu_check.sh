#!/usr/bin/env bash
# One command for a lent GPU: the CUDA tests, the step-time figures and an end-to-end job, each
# stage under its own time limit, all results in RESULTS_DIR (few files: summary.md, env.txt,
# pytest.log, junit.xml, step_time.json, step_time_graphs.json, step_time.md, e2e.log).
#
#   bash bench/gpu_check.sh RESULTS_DIR            # on one H100: about 5 minutes, at most 8
#   bash bench/gpu_check.sh --quick RESULTS_DIR    # CPU, tiny sizes, under a minute (CI)
#
# Stages (a failing stage never stops the next one; the exit status is 1 if any failed):
#   env        python, torch, CUDA, the packages each stage needs, nvidia-smi
#   pytest     pytest -m gpu tests/gpu (skipped tests without CUDA: reported "skipped")
#   step_time  bench/step_time.py --model resnet18 --batch 125 512, channels_last, bf16,
#              one search per epoch (--quick: cnn1d on the CPU, a few steps)
#   step_time_graphs  the same with --cuda-graph (non-search steps replayed from a CUDA graph)
#              → step_time_graphs.json, its tables appended to step_time.md; CUDA only (--quick
#              and CPU runs: skipped). Its own stage and limit: a failure here fails only it
#   e2e-train  `xsam train` of ResNet-18 on CIFAR-shaped synthetic data, use_gpu: true (no Ray)
#   e2e-serve  `xsam serve --num-gpus 1` runs the same job to success; skipped where ray and
#              the API's packages are absent (the device run cannot carry ray's 79 MB wheel)
# Wheels in <repo>/.whl (bench/gpu_wheels.sh) are installed first into a temporary folder on
# PYTHONPATH; the repository itself goes on PYTHONPATH (no install).
set -uo pipefail

QUICK=0
if [ "${1:-}" = "--quick" ]; then
    QUICK=1
    shift
fi
if [ $# -ne 1 ]; then
    echo "usage: bash bench/gpu_check.sh [--quick] RESULTS_DIR" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
# The whole check must end within BUDGET seconds (the device lends 8 minutes a run).
BUDGET=${GPU_CHECK_BUDGET_S:-450}
DEADLINE=$(($(date +%s) + BUDGET))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/xsam-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STAGES="$WORK/stages.tsv"
: >"$STAGES"
: >"$OUT/e2e.log"

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then
    PY=$ROOT/.venv/bin/python
else
    PY=python3
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
cd "$ROOT" || exit 2

record() { # name status seconds note
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" >>"$STAGES"
    echo "== $1: $2 ($3 s) $4"
}

# run_stage NAME LIMIT_S LOG CMD...: runs CMD under `timeout` (its whole process group), with
# the limit cut to what is left of the budget; CMD's exit status 3 means "skipped".
run_stage() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((DEADLINE - $(date +%s) - 10))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        record "$name" failed 0 "no time left in the ${BUDGET} s budget"
        return
    fi
    local t0 rc first
    first=$(($(wc -l <"$log") + 1)) # this stage's lines start here (logs may be shared)
    echo "## stage $name" >>"$log"
    echo "\$ $*" >>"$log"
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    local secs=$(($(date +%s) - t0)) reason
    reason=$(tail -n "+$first" "$log" | grep -E '^(SKIPPED|FAILED): ' | tail -n 1 | cut -c1-300)
    case $rc in
    0) record "$name" passed "$secs" "" ;;
    3) record "$name" skipped "$secs" "${reason#SKIPPED: }" ;;
    124 | 137) record "$name" failed "$secs" "timed out after $limit s" ;;
    *) record "$name" failed "$secs" "exit status $rc${reason:+; ${reason#FAILED: }}" ;;
    esac
}

# -- wheels -------------------------------------------------------------------------------------
t0=$(date +%s)
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if ! compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    record wheels skipped 0 "no .whl folder (bench/gpu_wheels.sh makes one)"
elif [ "$PYVER" != 3.12 ]; then
    record wheels skipped 0 "the .whl wheels are for CPython 3.12; $PY is $PYVER"
else
    SITE="$WORK/site"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
        "$ROOT"/.whl/*.whl >"$WORK/pip.log" 2>&1; then
        export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
        record wheels passed $(($(date +%s) - t0)) "$(ls "$ROOT"/.whl/*.whl | wc -l) wheels from .whl"
    else
        record wheels failed $(($(date +%s) - t0)) "pip install from .whl: $(tail -n 1 "$WORK/pip.log")"
    fi
fi

# -- env ----------------------------------------------------------------------------------------
: >"$WORK/env.log"
run_stage env 60 "$WORK/env.log" "$PY" bench/gpu_check.py env "$OUT/env.txt"
{
    echo
    echo "---- the env stage's output ----"
    cat "$WORK/env.log"
} >>"$OUT/env.txt"
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    DEVICE=cuda
else
    DEVICE=cpu
    if [ "$QUICK" = 0 ]; then
        record cuda failed 0 "torch sees no CUDA device; the full check needs one (--quick runs on a CPU)"
    fi
fi

# -- pytest -m gpu ------------------------------------------------------------------------------
: >"$OUT/pytest.log"
run_stage pytest 150 "$OUT/pytest.log" "$PY" bench/gpu_check.py pytest "$OUT/junit.xml"

# -- step time ----------------------------------------------------------------------------------
: >"$OUT/step_time.md"
if [ "$QUICK" = 1 ]; then
    run_stage step_time 60 "$OUT/step_time.md" "$PY" bench/step_time.py --device "$DEVICE" \
        --model cnn1d --batch 32 --rounds 2 --warmup-rounds 1 --block 4 --search-every 8 \
        --profile-steps 2 --precision bf16 --json "$OUT/step_time.json"
elif [ "$DEVICE" = cuda ]; then
    run_stage step_time 240 "$OUT/step_time.md" "$PY" bench/step_time.py --device cuda \
        --model resnet18 --batch 125 512 --channels-last --precision bf16 --search-every epoch \
        --cudnn-benchmark \
        --rounds 10 --block 32 --profile-steps 8 --json "$OUT/step_time.json"
else
    echo '{"skipped": "CUDA is not available on this machine"}' >"$OUT/step_time.json"
    record step_time skipped 0 "CUDA is not available on this machine"
fi
if [ "$QUICK" = 0 ] && [ "$DEVICE" = cuda ]; then
    # 10 rounds as above: ~40-60 s on an H200 (replays are fast; one capture per arm a block).
    run_stage step_time_graphs 150 "$OUT/step_time.md" "$PY" bench/step_time.py --device cuda \
        --model resnet18 --batch 125 512 --channels-last --precision bf16 --search-every epoch \
        --cudnn-benchmark --cuda-graph \
        --rounds 10 --block 32 --profile-steps 8 --json "$OUT/step_time_graphs.json"
else
    record step_time_graphs skipped 0 "CUDA graphs need a CUDA device (--quick runs on the CPU)"
fi

# -- end to end ---------------------------------------------------------------------------------
# The full check proves the GPU path, so it skips without CUDA; --quick trains where it runs.
if [ "$QUICK" = 1 ]; then
    E2E_ARGS=(--device "$DEVICE" --quick)
else
    E2E_ARGS=(--device cuda)
fi
run_stage e2e-train 120 "$OUT/e2e.log" "$PY" bench/gpu_check.py e2e-train "${E2E_ARGS[@]}" \
    "$WORK/e2e-train"
if [ "$QUICK" = 1 ]; then
    record e2e-serve skipped 0 "--quick runs xsam train only (Ray's start-up alone is ~20 s)"
else
    run_stage e2e-serve 180 "$OUT/e2e.log" "$PY" bench/gpu_check.py e2e-serve "${E2E_ARGS[@]}" \
        --timeout 150 "$WORK/e2e-serve"
fi

# -- summary ------------------------------------------------------------------------------------
"$PY" bench/gpu_check.py summary "$OUT" "$STAGES"
