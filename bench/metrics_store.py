"""Metric storage: ingest rate and downsampled-query latency on a long series, SQLite and PostgreSQL.

Measures the storage layer exactly as the ingest route uses it — per batch one transaction that
checks the lease and inserts the points (`service.metric_series.ingest`) — and the query that
``GET /v1/jobs/{id}/metrics?max_points=1000`` runs. HTTP and JSON costs are not included
(bench/api_load.py measures those).

    python bench/metrics_store.py                    # 1 000 000 points, both databases
    python bench/metrics_store.py --points 200000 --db sqlite
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._databases import fresh_database, percentile
from service import metric_series, queue
from service.db.engine import (
    db_now,
    make_engine,
    make_sessionmakers,
    run_in_transaction,
)
from service.db.migrate import upgrade
from xsam.config import TrainConfig

CONFIG = {"model": {"name": "mlp"}, "data": {"name": "digits"}}


def run_one(kind: str, points: int, batch: int, queries: int, max_points: int) -> dict[str, float]:
    with fresh_database(kind) as (url, _):
        upgrade(url)
        engine = make_engine(url, pool_size=2, max_overflow=0)
        writer, reader = make_sessionmakers(engine)
        policy = queue.LeasePolicy(heartbeat_interval_s=5, lease_timeout_s=3600)
        config = TrainConfig.model_validate(CONFIG)
        job_id = run_in_transaction(
            writer, lambda s: queue.enqueue(s, owner="bench", config=config)[0].id
        )
        job = run_in_transaction(
            writer, lambda s: queue.claim_next(s, agent_id="bench", cpus=8, gpus=0, policy=policy)
        )
        assert job is not None and job.id == job_id
        token = job.lease_token
        assert token is not None

        def ingest(start: int) -> int:
            rows = [
                {"name": "loss", "step": s, "value": 1.0 / (1 + s % 977), "epoch": 1 + s // 10_000}
                for s in range(start, min(start + batch, points))
            ]

            def work(session):  # what POST /v1/agent/jobs/{id}/metrics does in its transaction
                now = db_now(session)
                queue.hold_lease(session, job_id, token, policy, now=now)
                return metric_series.ingest(session, job_id, rows, now=now)

            return run_in_transaction(writer, work)

        began = time.perf_counter()
        stored = sum(ingest(start) for start in range(0, points, batch))
        ingest_s = time.perf_counter() - began
        assert stored == points, (stored, points)

        latencies = []
        for _ in range(queries):
            t0 = time.perf_counter()
            with reader() as session:
                series = metric_series.query(session, job_id, max_points=max_points)
            latencies.append(time.perf_counter() - t0)
        buckets = series["loss"]
        assert len(buckets) <= max_points and sum(b["count"] for b in buckets) == points
        latencies.sort()
        engine.dispose()
        return {
            "points_per_s": points / ingest_s,
            "ingest_s": ingest_s,
            "query_p50_ms": 1000 * percentile(latencies, 50),
            "query_max_ms": 1000 * latencies[-1],
            "query_mean_ms": 1000 * statistics.fmean(latencies),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1000, help="points per ingest transaction")
    parser.add_argument("--queries", type=int, default=10, help="downsampled queries to time")
    parser.add_argument("--max-points", type=int, default=1000)
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    args = parser.parse_args(argv)
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    print(
        f"series of {args.points} points, batches of {args.batch}, "
        f"query max_points={args.max_points} x{args.queries}"
    )
    print(
        f"{'db':9} {'ingest pts/s':>13} {'ingest s':>9} {'query p50 ms':>13} {'query max ms':>13}"
    )
    for kind in kinds:
        r = run_one(kind, args.points, args.batch, args.queries, args.max_points)
        print(
            f"{kind:9} {r['points_per_s']:13,.0f} {r['ingest_s']:9.1f} "
            f"{r['query_p50_ms']:13.1f} {r['query_max_ms']:13.1f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
