"""API load: `wrk` against `xsam serve`, for get-job, list, metrics query and /healthz.

Starts `xsam serve --no-agent --workers W` on a free loopback port with a fresh database,
seeds it (a user, `--jobs` jobs of which some queued, some running, one with a 20 000-point
series and a few latest metrics), then runs `wrk` (C, event-driven: the load generator costs far
less than the server) for `--duration` seconds at `--connections` connections on each route in
turn, all against the same server process. /healthz (no token, no database) is the ceiling of
the HTTP stack on this machine; the ratio get-job ÷ /healthz says how much of it the read path
keeps. Reports requests/s, p50 and p99 (wrk's latency distribution), and
"cpu ms": the server's CPU time per request (the API's processes and, on PostgreSQL, the
database's backends for the bench database, from /proc; "db ms" is the backends' part), which
the machine's load and wrk's own share of the cores disturb far less than the rate.

    python bench/api_load.py                              # 64 connections, 10 s each, both dbs
    python bench/api_load.py --db postgres --workers 2 --duration 5
    python bench/api_load.py --db postgres --routes healthz,get --jobs 20   # the get-job pair

wrk comes from Debian (`apt-get install wrk`); the script installs it when missing and root.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._databases import fresh_database
from bench._server import ADMIN, database_cpu, start_server, stop_server, tree_cpu

CONFIG = {"model": {"name": "mlp"}, "data": {"name": "digits"}, "schedule": {"epochs": 2}}
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def find_wrk() -> str:
    """The wrk binary, installed from Debian's archive when missing (as root)."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True)
        found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk not found: install it with `apt-get install wrk`")
    return found


def seed(base: str, jobs: int) -> tuple[str, int]:
    """A user token and a job with a 20 000-point series and latest metrics; `jobs` jobs in all."""
    admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    user = admin.post("/v1/tokens", json={"name": "bench", "role": "user"}).json()["token"]
    as_user = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {user}"}, timeout=60)
    ids = []
    for n in range(jobs):
        submitted = as_user.post(
            "/v1/jobs", json={"config": CONFIG, "tags": ["bench", f"t{n % 5}"]}
        )
        submitted.raise_for_status()
        ids.append(submitted.json()["id"])
    claimed = admin.post(
        "/v1/agent/claim", json={"agent_id": "seed", "capacity": {"cpus": 64, "gpus": 8}}
    ).json()
    job_id, lease = claimed["job"]["id"], claimed["lease"]["lease_token"]
    for start in range(0, 20_000, 4000):
        points = [
            {"name": name, "step": s, "value": 1.0 / (s + 1), "epoch": s // 1000}
            for s in range(start, start + 4000)
            for name in (["loss"] if s % 100 else ["loss", "acc", "lr"])
        ]
        admin.post(
            f"/v1/agent/jobs/{job_id}/metrics", json={"lease_token": lease, "points": points}
        ).raise_for_status()
    assert job_id in ids
    admin.close()
    as_user.close()
    return user, job_id


def run_wrk(wrk: str, url: str, token: str | None, connections: int, duration: float) -> dict:
    threads = min(connections, max(1, os.cpu_count() or 1))
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration:.0f}s", "--latency"]
    if token:
        command += ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout

    def latency(q: str) -> float:
        m = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")

    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(rate.group(1)) if rate else float("nan"),
        "requests": int(total.group(1)) if total else 0,
        "p50": latency("50"),
        "p99": latency("99"),
        "errors": (int(errors.group(1)) if errors else 0),
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per route")
    parser.add_argument("--workers", type=int, default=2, help="API processes (uvicorn workers)")
    parser.add_argument("--jobs", type=int, default=120, help="jobs to seed")
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument(
        "--routes",
        default="healthz,get,list,metrics",
        help="comma-separated subset of healthz,get,list,metrics (run in that order)",
    )
    args = parser.parse_args(argv)
    wanted = [r.strip() for r in args.routes.split(",") if r.strip()]
    unknown = set(wanted) - {"healthz", "get", "list", "metrics"}
    if unknown:
        parser.error(f"unknown routes: {', '.join(sorted(unknown))}")
    wrk = find_wrk()
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    print(
        f"wrk, {args.connections} connections, {args.duration:.0f} s per route; "
        f"xsam serve --workers {args.workers}; loopback; {os.cpu_count()} cores"
    )
    print(
        f"{'db':9} {'route':22} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
        f"{'cpu ms':>8} {'db ms':>8}"
    )
    for kind in kinds:
        with fresh_database(kind) as (url, data_dir):
            proc, base = start_server(url, data_dir, workers=args.workers)
            try:
                token, job_id = seed(base, args.jobs)
                every = {
                    "healthz": ("/healthz", f"{base}/healthz", None),
                    "get": ("get job", f"{base}/v1/jobs/{job_id}", token),
                    "list": ("list (50 jobs)", f"{base}/v1/jobs?limit=50", token),
                    "metrics": (
                        "metrics (20k, 500)",
                        f"{base}/v1/jobs/{job_id}/metrics?max_points=500",
                        token,
                    ),
                }
                routes = [every[k] for k in wanted]
                results = {}
                for name, route, auth in routes:
                    api, db = tree_cpu(proc.pid), database_cpu(url)
                    r = results[name] = run_wrk(wrk, route, auth, args.connections, args.duration)
                    api, db = tree_cpu(proc.pid) - api, database_cpu(url) - db
                    per = 1000 / r["requests"] if r["requests"] else float("nan")
                    print(
                        f"{kind:9} {name:22} {r['rps']:9.1f} {r['p50']:8.1f} {r['p99']:8.1f} "
                        f"{r['errors']:7d} {(api + db) * per:8.3f} {db * per:8.3f} "
                        f"{r['socket_errors']}",
                        flush=True,
                    )
                if "get job" in results and "/healthz" in results:
                    ratio = results["get job"]["rps"] / results["/healthz"]["rps"]
                    print(f"{kind:9} get job ÷ /healthz: {ratio:.2f}", flush=True)
            finally:
                stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
