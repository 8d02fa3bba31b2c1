"""API load: N concurrent clients submit jobs, poll them and query metrics over loopback.

Starts `xsam serve --no-agent` (one uvicorn process) on a free port with a fresh data dir (and,
for PostgreSQL, a fresh database), seeds one job with a 20 000-point series, then runs N client
threads, each looping submit → get-job (one of its jobs) → metrics query of the seeded series
(max_points=500) until the duration ends.
Reports p50/p99 latency and requests/s per operation. Clients and server share this machine.

    python bench/api_load.py                          # 64 clients, 20 s, both databases
    python bench/api_load.py --clients 16 --duration 10 --db sqlite
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._databases import fresh_database, percentile  # noqa: E402

CONFIG = {"model": {"name": "mlp"}, "data": {"name": "digits"}, "schedule": {"epochs": 2}}
ADMIN = "bench-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(url: str, data_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XSAM_")}
    env["XSAM_ADMIN_TOKEN"] = ADMIN
    proc = subprocess.Popen(
        [sys.executable, "-m", "xsam", "serve", "--no-agent", "--port", str(port),
         "--data-dir", str(data_dir), "--database-url", url, "--log-level", "warning"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.terminate()
    raise TimeoutError("server did not become ready")


def seed(base: str) -> tuple[str, int]:
    """A user token, and a job with a 20 000-point series to query."""
    admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    user = admin.post("/v1/tokens", json={"name": "bench", "role": "user"}).json()["token"]
    job = httpx.post(
        f"{base}/v1/jobs", json={"config": CONFIG}, headers={"Authorization": f"Bearer {user}"}
    ).json()
    lease = admin.post(
        "/v1/agent/claim", json={"agent_id": "seed", "capacity": {"cpus": 64, "gpus": 8}}
    ).json()["lease"]["lease_token"]
    for start in range(0, 20_000, 5000):
        points = [
            {"name": "loss", "step": s, "value": 1.0 / (s + 1)} for s in range(start, start + 5000)
        ]
        admin.post(
            f"/v1/agent/jobs/{job['id']}/metrics", json={"lease_token": lease, "points": points}
        )
    admin.close()
    return user, job["id"]


def run_load(
    base: str, token: str, seeded: int, clients: int, duration: float
) -> dict[str, list[float]]:
    results: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(n: int) -> None:
        rng = random.Random(n)
        mine: list[int] = []
        local: dict[str, list[float]] = defaultdict(list)
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as http:
            start.wait()
            while time.monotonic() < stop_at[0]:
                for op in ("submit", "get_job", "metrics"):
                    t0 = time.perf_counter()
                    if op == "submit":
                        r = http.post("/v1/jobs", json={"config": CONFIG, "tags": [f"c{n}"]})
                        if r.status_code == 201:
                            mine.append(r.json()["id"])
                    elif op == "get_job":
                        r = http.get(f"/v1/jobs/{rng.choice(mine)}")
                    else:
                        r = http.get(
                            f"/v1/jobs/{rng.choice(mine)}/metrics", params={"max_points": 500}
                        )
                    elapsed = time.perf_counter() - t0
                    if r.is_success:
                        local[op].append(elapsed)
                    else:
                        with lock:
                            errors[f"{op} {r.status_code}"] += 1
        with lock:
            for op, values in local.items():
                results[op].extend(values)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + duration
    start.wait()
    began = time.monotonic()
    for t in threads:
        t.join()
    results["_wall"] = [time.monotonic() - began]
    if errors:
        print(f"  errors: {dict(errors)}")
    return results


def metrics_of_seeded(base: str, job_id: int, n: int = 50) -> list[float]:
    """Latency of a downsampled query on the seeded 20 000-point series (sequential)."""
    out = []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as h:
        for _ in range(n):
            t0 = time.perf_counter()
            h.get(f"/v1/jobs/{job_id}/metrics", params={"max_points": 500}).raise_for_status()
            out.append(time.perf_counter() - t0)
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    args = parser.parse_args(argv)
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    print(f"{args.clients} clients, {args.duration:.0f} s, one uvicorn process, loopback")
    print(f"{'db':9} {'operation':18} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for kind in kinds:
        with fresh_database(kind) as (url, data_dir):
            proc, base = start_server(url, data_dir)
            try:
                token, seeded = seed(base)
                results = run_load(base, token, seeded, args.clients, args.duration)
                wall = results.pop("_wall")[0]
                for op in ("submit", "get_job", "metrics"):
                    values = sorted(results[op])
                    print(
                        f"{kind:9} {op:18} {len(values):9d} {len(values) / wall:8.1f} "
                        f"{1000 * percentile(values, 50):8.1f} {1000 * percentile(values, 99):8.1f}"
                    )
                seq = metrics_of_seeded(base, seeded)
                print(
                    f"{kind:9} {'metrics 20k idle':18} {len(seq):9d} {'':>8} "
                    f"{1000 * percentile(seq, 50):8.1f} {1000 * percentile(seq, 99):8.1f}",
                    flush=True,
                )
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
