#!/usr/bin/env bash
# Runs tests that start processes (DDP ranks, Ray, servers) many times in a row and reports every
# failure and every hang, so a test that fails one run in five is caught before CI meets it.
#
#   scripts/stress.sh                       # the default plan: DDP tests x30, the others x10
#   scripts/stress.sh -n 5 TEST [TEST ...]  # these pytest node ids / files, 5 runs each
#   scripts/stress.sh -n 10 -- tests/xsam/test_training.py -k ddp   # pytest options after --
#   scripts/stress.sh --list                # print the default plan
#
# Each run is its own pytest process (as CI's is), so a hang at interpreter exit counts too; a run
# still going after --timeout seconds (default 600) is killed with its whole process group and
# reported as a hang. Logs of failed or hung runs are kept under $STRESS_OUT (default
# /tmp/xsam-stress). Exit status 0 only when every run of every test passed.
set -uo pipefail
cd "$(dirname "$0")/.."

runs=""
timeout=600
out=${STRESS_OUT:-/tmp/xsam-stress}
tests=()
list=false
while [ $# -gt 0 ]; do
    case $1 in
        -n) runs=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --list) list=true; shift ;;
        -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
        --) shift; tests+=("$@"); break ;;
        -*) echo "stress: unknown option $1 (see --help; pytest options go after --)" >&2; exit 2 ;;
        *) tests+=("$1"); shift ;;
    esac
done

# The default plan: "<runs> <pytest selection>", one line per group. Every test that starts
# processes is here: spawned DDP ranks, the Ray cluster and `xsam serve` processes, the topology.
plan=$(cat <<'EOF'
30 tests/xsam/test_optim.py::test_ddp_ranks_agree_and_equal_one_process_on_the_global_batch
10 tests/xsam/test_training.py -k ddp
10 tests/worker/test_e2e.py
10 tests/worker/test_study_e2e.py tests/worker/test_logs_e2e.py
5 tests/faults/test_restarts_database.py tests/faults/test_restarts_api.py tests/faults/test_restarts_agent.py tests/faults/test_restarts_rank.py
10 tests/deploy/test_topology.py
10 tests/service/test_client.py tests/service/test_serve_single.py tests/service/test_dashboard_browser.py tests/worker/test_heartbeat_and_failures.py tests/cli/test_jobs_cli.py tests/bench
10 tests/faults
EOF
)
if [ ${#tests[@]} -gt 0 ]; then
    plan="${runs:-10} ${tests[*]}"
elif [ -n "$runs" ]; then
    plan=$(echo "$plan" | sed "s/^[0-9]*/$runs/")
fi
if $list; then
    echo "$plan"
    exit 0
fi
bash scripts/setup.sh >/dev/null

mkdir -p "$out"
export XSAM_REQUIRE_POSTGRES=${XSAM_REQUIRE_POSTGRES:-0} OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
total=0 bad=0
summary=()
while read -r n selection; do
    [ -n "$n" ] || continue
    passed=0 failed=0 hung=0 times=()
    for i in $(seq "$n"); do
        log="$out/run.log"
        start=$(date +%s)
        # setsid: the run and everything it starts form one process group we can kill whole.
        # The session mark (tests/conftest.py) is ours, so that daemons the run started outside
        # its group (Ray's) can be found and killed after a hang too.
        mark=stress-$$-$total
        XSAM_TEST_SESSION=$mark setsid timeout --kill-after=10 -s TERM "$timeout" \
            .venv/bin/python -m pytest -q -p no:cacheprovider -x $selection >"$log" 2>&1
        rc=$?
        for env in /proc/[0-9]*/environ; do
            if grep -qz "^XSAM_TEST_SESSION=$mark\$" "$env" 2>/dev/null; then
                pid=${env#/proc/}
                pid=${pid%/environ}
                echo "stress: run $((i)) left process $pid running; killing it"
                kill -9 "$pid" 2>/dev/null
            fi
        done
        took=$(($(date +%s) - start))
        times+=("$took")
        total=$((total + 1))
        name=$(echo "$selection" | sed 's/[^A-Za-z0-9]\+/_/g' | cut -c1-80)
        if [ $rc -eq 0 ]; then
            passed=$((passed + 1))
        elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
            hung=$((hung + 1)) bad=$((bad + 1))
            cp "$log" "$out/hang-$name-$i.log"
            echo "stress: HANG  run $i/$n of $selection (killed after ${timeout}s; log $out/hang-$name-$i.log)"
        else
            failed=$((failed + 1)) bad=$((bad + 1))
            cp "$log" "$out/fail-$name-$i.log"
            echo "stress: FAIL  run $i/$n of $selection (exit $rc; log $out/fail-$name-$i.log)"
            grep -E "^(FAILED|ERROR) " "$log" | head -5 | sed 's/^/stress:       /'
        fi
        echo "stress: run $i/$n: exit $rc in ${took}s — $selection"
    done
    sorted=$(printf '%s\n' "${times[@]}" | sort -n)
    median=$(echo "$sorted" | sed -n "$(((n + 1) / 2))p")
    max=$(echo "$sorted" | tail -n 1)
    summary+=("$passed/$n passed, $failed failed, $hung hung (median ${median}s, max ${max}s): $selection")
done <<<"$plan"

echo
echo "stress summary ($(date -u +%FT%TZ), $(getconf _NPROCESSORS_ONLN) cores):"
printf '  %s\n' "${summary[@]}"
echo "$((total - bad))/$total runs passed"
[ $bad -eq 0 ]
