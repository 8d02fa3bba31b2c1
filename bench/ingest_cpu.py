"""CPU per ingested point on PostgreSQL: the client process plus the PostgreSQL backend.

Wall-clock rates swing with the machine's load; CPU time per point much less. Each variant
stores `--batches` batches of `--batch` points into a fresh running job, `--rounds` times,
interleaved; the backend's CPU time is read from /proc (the database must run on this host).

* ``transaction`` — hold_lease + metric_series.ingest in one transaction (the SQLite route);
* ``fenced`` — metric_ingest_pg.ingest_fenced, one autocommit statement (PostgreSQL's route);
* ``fenced, replayed`` — the same, each batch sent twice (the second takes the general path).

    python bench/ingest_cpu.py --batches 20 --rounds 2

`--parse` measures instead what the API spends turning a request body into points (no
database): the ordinary way FastAPI would (Python's json, the storable walk, a model per point,
model_dump) against service/metrics_body.py's parse from bytes, on the same encoded bodies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import text

from bench._databases import fresh_database
from bench._server import process_cpu
from bench.metrics_store import POLICY, _points, _running_job
from service import metric_ingest_pg, metric_series, queue
from service.db.engine import db_now, make_engine, make_sessionmakers
from service.db.migrate import upgrade
from service.metrics_body import parse_metrics
from service.schemas import MetricsIngest
from service.storable import find_unstorable


def in_transaction(writer, reader, job_id, token, rows):  # type: ignore[no-untyped-def]
    with writer() as session, session.begin():
        now = db_now(session)
        queue.hold_lease(session, job_id, token, POLICY, now=now)
        metric_series.ingest(session, job_id, rows, now=now)


def fenced(writer, reader, job_id, token, rows):  # type: ignore[no-untyped-def]
    with reader() as session:
        assert metric_ingest_pg.ingest_fenced(session, job_id, token, rows, lease_s=3600)


def fenced_replayed(writer, reader, job_id, token, rows):  # type: ignore[no-untyped-def]
    fenced(writer, reader, job_id, token, rows)
    with reader() as session:
        assert metric_ingest_pg.ingest_fenced(session, job_id, token, rows, lease_s=3600) == 0


VARIANTS: dict[str, Callable] = {
    "transaction": in_transaction,
    "fenced": fenced,
    "fenced, replayed": fenced_replayed,
}


def parse_cpu(batches: int, batch: int) -> int:
    """µs of CPU per point to parse `batches` encoded bodies, the ordinary way and from bytes."""
    bodies = [
        json.dumps({"lease_token": "t" * 32, "points": _points(a, a + batch, iso=True)}).encode()
        for a in range(0, batches * batch, batch)
    ]

    def ordinary(body: bytes) -> list[dict]:
        data = json.loads(body)
        assert find_unstorable(data) is None
        return [p.model_dump() for p in MetricsIngest.model_validate(data).points]

    def from_bytes(body: bytes) -> list[dict]:
        return parse_metrics(body)[1]

    print(
        f"load average {os.getloadavg()[0]:.1f}; µs of CPU per point, parsing {batch}-point bodies"
    )
    for name, parse in (("ordinary", ordinary), ("from bytes", from_bytes)):
        parse(bodies[0])
        began = time.process_time()
        for body in bodies:
            assert len(parse(body)) == batch
        used = time.process_time() - began
        print(f"{name:18} {1e6 * used / (batches * batch):6.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--parse", action="store_true", help="time body parsing only")
    args = parser.parse_args(argv)
    if args.parse:
        return parse_cpu(args.batches * args.rounds, args.batch)
    totals = {name: [0.0, 0.0, 0] for name in VARIANTS}
    with fresh_database("postgres") as (url, _):
        upgrade(url)
        engine = make_engine(url, pool_size=1, max_overflow=0)
        writer, reader = make_sessionmakers(engine)
        with writer() as session:  # one pooled connection: every variant uses this backend
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        for _ in range(args.rounds):
            for name, store in VARIANTS.items():
                job_id, token = _running_job(writer)
                n = args.batch
                batches = [_points(a, a + n) for a in range(0, (args.batches + 1) * n, n)]
                store(writer, reader, job_id, token, batches[0])  # warm the statement caches
                client, backend = time.process_time(), process_cpu(pid)
                for rows in batches[1:]:
                    store(writer, reader, job_id, token, rows)
                totals[name][0] += time.process_time() - client
                totals[name][1] += process_cpu(pid) - backend
                totals[name][2] += args.batches * n
        engine.dispose()
    print(f"load average {os.getloadavg()[0]:.1f}; µs of CPU per point")
    for name, (client, backend, points) in totals.items():
        c, b = 1e6 * client / points, 1e6 * backend / points
        print(f"{name:18} client {c:6.1f}  postgres {b:6.1f}  total {c + b:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
