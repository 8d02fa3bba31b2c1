#!/usr/bin/env bash
# Smoke test of a running deployment (after `docker compose up -d`): checks /healthz and /readyz,
# submits a tiny MNIST-1D job through the REST API, waits for it to succeed and downloads its
# weights. Needs only bash and python3 (standard library) on the machine that runs it.
#
#   scripts/smoke_test.sh                 # a 1-GPU job against http://127.0.0.1:$XSAM_API_PUBLISH
#   scripts/smoke_test.sh --cpu           # a CPU job (a host without GPUs)
#   scripts/smoke_test.sh --workers 2     # 2 DDP ranks (2 GPUs, or 2 CPUs with --cpu)
#
# The token is $XSAM_TOKEN, else XSAM_ADMIN_TOKEN from ./.env; the URL is --url, else $XSAM_SERVER,
# else http://127.0.0.1:<XSAM_API_PUBLISH from ./.env, default 8000>. Exit status 0 = passed.
set -euo pipefail
cd "$(dirname "$0")/.."

from_env_file() {  # the value of $1 in ./.env, if any
    [ -f .env ] && sed -n "s/^$1=//p" .env | tail -n 1 || true
}

url=${XSAM_SERVER:-}
token=${XSAM_TOKEN:-}
use_gpu=true
workers=1
timeout=900
while [ $# -gt 0 ]; do
    case $1 in
        --url) url=$2; shift 2 ;;
        --cpu) use_gpu=false; shift ;;
        --workers) workers=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "smoke_test: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$url" ]; then
    publish=$(from_env_file XSAM_API_PUBLISH)
    publish=${publish:-8000}
    case $publish in *:*) url="http://$publish" ;; *) url="http://127.0.0.1:$publish" ;; esac
fi
token=${token:-$(from_env_file XSAM_ADMIN_TOKEN)}
if [ -z "$token" ]; then
    echo "smoke_test: no token: set XSAM_TOKEN or XSAM_ADMIN_TOKEN in .env" >&2
    exit 2
fi

# The deployment needs Compose v2 (`docker compose`). Debian 12's `docker-compose` package is v1,
# which refuses the file's top-level `name:`: a user who has only that is told what to install.
if ! docker compose version >/dev/null 2>&1; then
    v1=$(docker-compose version --short 2>/dev/null || true)
    case $v1 in
        1.*) echo "smoke_test: note: docker-compose $v1 is Compose v1; this deployment needs" \
                  "Compose v2: install docker-compose-plugin (Docker's apt repository) or" \
                  "Debian's docker-compose-v2, then use \`docker compose\`" >&2 ;;
    esac
fi

export SMOKE_URL=$url SMOKE_TOKEN=$token SMOKE_GPU=$use_gpu SMOKE_WORKERS=$workers SMOKE_TIMEOUT=$timeout
exec python3 - <<'PY'
import json
import os
import sys
import time
import urllib.error
import urllib.request

url, token = os.environ["SMOKE_URL"].rstrip("/"), os.environ["SMOKE_TOKEN"]
deadline = time.monotonic() + float(os.environ["SMOKE_TIMEOUT"])


def call(method, path, body=None, raw=False):
    request = urllib.request.Request(
        url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            data = response.read()
    except urllib.error.HTTPError as exc:
        sys.exit(f"smoke_test: {method} {path} -> {exc.code}: {exc.read().decode(errors='replace')}")
    except OSError as exc:
        sys.exit(f"smoke_test: cannot reach {url}: {exc}")
    return data if raw else json.loads(data)


for path in ("/healthz", "/readyz"):
    call("GET", path)
    print(f"smoke_test: {path} ok")

job = {
    "name": "smoke-test",
    "tags": ["smoke-test"],
    "config": {
        "model": {"name": "cnn1d"},
        "data": {"name": "mnist1d", "num_train": 1000, "batch_size": 100},
        "optimizer": {"name": "xsam"},
        "schedule": {"epochs": 1},
        "resources": {
            "num_workers": int(os.environ["SMOKE_WORKERS"]),
            "use_gpu": os.environ["SMOKE_GPU"] == "true",
            "cpus_per_worker": 1,
        },
    },
}
job_id = call("POST", "/v1/jobs", job)["id"]
print(f"smoke_test: submitted job {job_id} to {url}")
status = None
while time.monotonic() < deadline:
    current = call("GET", f"/v1/jobs/{job_id}")
    if current["status"] != status:
        status = current["status"]
        print(f"smoke_test: job {job_id} is {status}")
    if status in ("succeeded", "failed", "cancelled"):
        break
    time.sleep(2)
else:
    call("POST", f"/v1/jobs/{job_id}/cancel")
    sys.exit(f"smoke_test: job {job_id} did not end in time (still {status}); cancelled it")

if status != "succeeded":
    for event in call("GET", f"/v1/jobs/{job_id}/events")["items"]:
        print(f"  {event['time']} {event['type']}: {event['message']}")
    sys.exit(f"smoke_test: job {job_id} ended {status}: {current.get('error')}")
if current.get("attempt", 1) > 1:
    print(f"smoke_test: note: the job needed {current['attempt']} attempts; earlier ones failed:")
    for event in call("GET", f"/v1/jobs/{job_id}/events")["items"]:
        if event["type"] in ("failed", "retried", "requeued"):
            print(f"  {event['time']} {event['type']}: {event['message']}")
metrics = call("GET", f"/v1/jobs/{job_id}/metrics/latest")
weights = call("GET", f"/v1/jobs/{job_id}/artifacts/model", raw=True)
if not weights:
    sys.exit(f"smoke_test: job {job_id} succeeded but its weights are empty")
print(f"smoke_test: latest metrics {json.dumps(metrics)}")
print(f"smoke_test: downloaded {len(weights)} bytes of weights")
print("smoke_test: PASSED")
PY
