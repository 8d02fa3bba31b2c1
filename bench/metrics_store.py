"""Metric storage: ingest rate (HTTP and storage layer) and query latency by series length.

Three measures per database:

* **ingest, storage layer** — `--ingest-points` points in batches of `--batch`, each stored as
  the ingest route stores it (PostgreSQL: one fenced statement; SQLite: one transaction with
  the lease check, the insert and the rollups);
* **ingest, HTTP** — the same through ``POST /v1/agent/jobs/{id}/metrics`` on `xsam serve
  --workers W`, `--clients` threads each feeding its own running job; request bodies are
  encoded before the clock starts, so the figure is the server's, not the client's; with the
  server's CPU per point (API processes + PostgreSQL backends, /proc) and how many cores stood
  idle meanwhile (a rate with idle cores is bound by latency, not by CPU);
* **query** — ``max_points`` downsampled queries (storage layer, `--queries` each) over series of
  10 k, 100 k, 1 M and 10 M points (`--sizes`), loaded in SQL (generate_series / a recursive CTE,
  then `metric_rollups.rebuild`), so the growth of the cost with the series' length shows.

    python bench/metrics_store.py                               # both databases, all sizes
    python bench/metrics_store.py --db postgres --sizes 10000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import text

from bench._databases import fresh_database, percentile
from bench._server import ADMIN, database_cpu, start_server, stop_server, tree_cpu
from service import metric_ingest_pg, metric_rollups, metric_series, queue
from service.db.engine import (
    db_now,
    make_engine,
    make_sessionmakers,
    run_in_transaction,
)
from service.db.migrate import upgrade
from xsam.config import TrainConfig

CONFIG = {"model": {"name": "mlp"}, "data": {"name": "digits"}}
POLICY = queue.LeasePolicy(heartbeat_interval_s=5, lease_timeout_s=3600)


def _running_job(writer) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    config = TrainConfig.model_validate(CONFIG)
    job_id = run_in_transaction(
        writer, lambda s: queue.enqueue(s, owner="bench", config=config)[0].id
    )
    job = run_in_transaction(
        writer, lambda s: queue.claim_next(s, agent_id="bench", cpus=8, gpus=0, policy=POLICY)
    )
    assert job is not None and job.id == job_id and job.lease_token
    return job_id, job.lease_token


#: What a training run reports each step (worker/reporter.py): several series, one time per step.
SERIES = ("train/loss", "train/acc", "lr", "xsam/alpha", "xsam/phi")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _points(start: int, stop: int, *, iso: bool = False) -> list[dict]:
    """Points start..stop-1 of a run: point i is series i % 5 at step i // 5, with the time the
    reporter gives it (an ISO string in a request body, `iso`; else as the route parses it)."""
    points = []
    for i in range(start, stop):
        step = i // len(SERIES)
        time = T0 + timedelta(milliseconds=100 * step)
        points.append(
            {
                "name": SERIES[i % len(SERIES)],
                "step": step,
                "value": 1.0 / (1 + i % 977),
                "epoch": 1 + step // 10_000,
                "time": time.isoformat() if iso else time,
            }
        )
    return points


def ingest_storage(writer, reader, points: int, batch: int) -> float:  # type: ignore[no-untyped-def]
    """Points/s stored as the route stores them: on PostgreSQL one fenced statement per batch
    (`metric_ingest_pg`), on SQLite one transaction per batch (lease, insert, rollups)."""
    job_id, token = _running_job(writer)
    batches = [_points(a, min(a + batch, points)) for a in range(0, points, batch)]

    def work(session, rows):  # type: ignore[no-untyped-def]
        now = db_now(session)
        queue.hold_lease(session, job_id, token, POLICY, now=now)
        return metric_series.ingest(session, job_id, rows, now=now)

    def fenced(rows):  # type: ignore[no-untyped-def]
        with reader() as session:
            return metric_ingest_pg.ingest_fenced(session, job_id, token, rows, lease_s=3600)

    postgres = writer.kw["bind"].dialect.name == "postgresql"
    began = time.perf_counter()
    if postgres:
        stored = sum(fenced(b) for b in batches)
    else:
        stored = sum(run_in_transaction(writer, lambda s, b=b: work(s, b)) for b in batches)
    elapsed = time.perf_counter() - began
    assert stored == points, (stored, points)
    return points / elapsed


def ingest_http(url: str, data_dir: Path, points: int, batch: int, clients: int, workers: int):  # type: ignore[no-untyped-def]
    """Points/s through HTTP: `clients` threads, each posting pre-encoded batches to its job."""
    proc, base = start_server(url, data_dir, workers=workers)
    try:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        with httpx.Client(base_url=base, headers=admin, timeout=120) as http:
            jobs = []
            for _ in range(clients):
                http.post("/v1/jobs", json={"config": CONFIG}).raise_for_status()
                claimed = http.post(
                    "/v1/agent/claim",
                    json={"agent_id": "bench", "capacity": {"cpus": 64, "gpus": 8}},
                ).json()
                jobs.append((claimed["job"]["id"], claimed["lease"]["lease_token"]))
        per_client = points // clients
        bodies = [
            [
                json.dumps(
                    {
                        "lease_token": lease,
                        "points": _points(a, min(a + batch, per_client), iso=True),
                    }
                ).encode()
                for a in range(0, per_client, batch)
            ]
            for _, lease in jobs
        ]
        errors: list[str] = []
        barrier = threading.Barrier(clients + 1)

        def client(n: int) -> None:
            job_id = jobs[n][0]
            headers = {**admin, "Content-Type": "application/json"}
            with httpx.Client(base_url=base, headers=headers, timeout=120) as http:
                barrier.wait()
                for body in bodies[n]:
                    r = http.post(f"/v1/agent/jobs/{job_id}/metrics", content=body)
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:200]}")

        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for t in threads:
            t.start()
        barrier.wait()
        began = time.perf_counter()
        api, db, idle = tree_cpu(proc.pid), database_cpu(url), _idle_cpu()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - began
        api, db = tree_cpu(proc.pid) - api, database_cpu(url) - db
        idle = _idle_cpu() - idle
        if errors:
            raise RuntimeError(f"{len(errors)} failed batches, e.g. {errors[0]}")
        stored = per_client * clients
        return stored / elapsed, 1e6 * api / stored, 1e6 * db / stored, idle / elapsed
    finally:
        stop_server(proc)


def _idle_cpu() -> float:
    """Seconds the machine's cores have been idle (all cores summed), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


def load_series(engine, writer, points: int) -> int:  # type: ignore[no-untyped-def]
    """A job with a `points`-point series "loss", written in SQL, rolled up; its id."""
    job_id, _ = _running_job(writer)
    if engine.dialect.name == "postgresql":
        fill = """
            INSERT INTO metrics (job_id, name, step, value, epoch, time)
            SELECT :job_id, 'loss', s, 1.0 / (1 + s % 977), 1 + s / 10000, now()
            FROM generate_series(0, :n - 1) AS s
        """
    else:
        fill = """
            WITH RECURSIVE c(s) AS (SELECT 0 UNION ALL SELECT s + 1 FROM c WHERE s < :n - 1)
            INSERT INTO metrics (job_id, name, step, value, epoch, time)
            SELECT :job_id, 'loss', s, 1.0 / (1 + s % 977), 1 + s / 10000, datetime('now')
            FROM c
        """

    def work(session):  # type: ignore[no-untyped-def]
        session.execute(text(fill), {"job_id": job_id, "n": points})
        metric_rollups.rebuild(session, job_id)

    run_in_transaction(writer, work)
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE metrics"))
            conn.execute(text("VACUUM ANALYZE metric_rollups"))
    return job_id


def query_latency(reader, job_id: int, points: int, queries: int, max_points: int) -> list[float]:  # type: ignore[no-untyped-def]
    latencies = []
    for _ in range(queries + 2):
        t0 = time.perf_counter()
        with reader() as session:
            series = metric_series.query(session, job_id, max_points=max_points)
        latencies.append(time.perf_counter() - t0)
    buckets = series["loss"]
    assert len(buckets) <= max_points and sum(b.get("count", 1) for b in buckets) == points
    return sorted(latencies[2:])  # the first two warm the statement caches


def run_one(kind: str, args: argparse.Namespace) -> None:
    with fresh_database(kind) as (url, data_dir):
        upgrade(url)
        engine = make_engine(url, pool_size=2, max_overflow=0)
        writer, reader = make_sessionmakers(engine)
        if args.ingest_points:
            rate = ingest_storage(writer, reader, args.ingest_points, args.batch)
            print(f"{kind:9} ingest, storage layer     {rate:12,.0f} points/s", flush=True)
            rate, api, db, idle = ingest_http(
                url, data_dir, args.ingest_points, args.batch, args.clients, args.workers
            )
            print(
                f"{kind:9} ingest, HTTP ({args.clients} clients, {args.workers} workers)"
                f" {rate:12,.0f} points/s  server CPU µs/point: API {api:.1f}, database {db:.1f}"
                f"  ({idle:.2f} of {os.cpu_count()} cores idle)",
                flush=True,
            )
        for size in args.sizes:
            began = time.perf_counter()
            job_id = load_series(engine, writer, size)
            loaded = time.perf_counter() - began
            lat = query_latency(reader, job_id, size, args.queries, args.max_points)
            print(
                f"{kind:9} query {size:>10,} points      p50 {1000 * percentile(lat, 50):7.1f} ms"
                f"  p90 {1000 * percentile(lat, 90):7.1f} ms  (loaded in {loaded:.0f} s)",
                flush=True,
            )
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[10_000, 100_000, 1_000_000, 10_000_000],
        help="series lengths to query (comma-separated)",
    )
    parser.add_argument("--ingest-points", type=int, default=200_000, help="0: skip ingest")
    parser.add_argument("--batch", type=int, default=1000, help="points per ingest request")
    parser.add_argument("--clients", type=int, default=4, help="HTTP ingest threads (jobs)")
    parser.add_argument("--workers", type=int, default=2, help="API processes for HTTP ingest")
    parser.add_argument("--queries", type=int, default=20, help="queries timed per size")
    parser.add_argument("--max-points", type=int, default=1000)
    args = parser.parse_args(argv)
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    print(
        f"ingest {args.ingest_points} points in batches of {args.batch}; "
        f"query max_points={args.max_points} x{args.queries} per size"
    )
    for kind in kinds:
        run_one(kind, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
