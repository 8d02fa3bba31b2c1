"""What the metrics table's foreign key to jobs cost PostgreSQL per inserted point (why
migration 0007 dropped it).

Two copies of the metrics table in a fresh database, one with ``job_id REFERENCES jobs(id)`` (as
before 0007) and one without (as now), receive the same 1000-point batches through the same
``INSERT ... SELECT FROM unnest(...)`` the ingest route uses, alternating; the backend's CPU time
comes from /proc (the database must run on this host). Reported: µs of backend CPU per point for
each, and their ratio, from the same run.

    python bench/pg_foreign_key.py --batches 100 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._databases import fresh_database
from bench._server import process_cpu
from bench.metrics_store import SERIES

_INSERT = """
    INSERT INTO {table} (job_id, name, step, value, epoch, time)
    SELECT %s, p.name, p.step, p.value, p.epoch, now()
    FROM unnest(%s::varchar[], %s::bigint[], %s::float8[], %s::integer[])
        AS p(name, step, value, epoch)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=100, help="1000-point batches per round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    import psycopg

    used = {"with the key": 0.0, "without": 0.0}
    points = 0
    with fresh_database("postgres") as (url, _):
        dsn = url.replace("postgresql+psycopg://", "postgresql://", 1)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE jobs (id bigserial PRIMARY KEY)")
            conn.execute("INSERT INTO jobs SELECT FROM generate_series(1, 10)")
            for table, key in (("m_key", " REFERENCES jobs(id)"), ("m_none", "")):
                conn.execute(
                    f"CREATE TABLE {table} (job_id bigint{key}, name varchar(128), step bigint, "
                    "value float8, epoch integer, time timestamp, PRIMARY KEY (job_id, name, step))"
                )
            (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone() or (0,)
            step = 0
            for job in range(1, args.rounds + 1):
                for _ in range(args.batches):
                    i = range(step, step + 1000)
                    batch = (
                        [SERIES[n % len(SERIES)] for n in i], [n // len(SERIES) for n in i],
                        [1.0 / (1 + n % 977) for n in i], [1] * 1000,
                    )  # fmt: skip
                    step += 1000
                    points += 1000
                    for name, table in (("with the key", "m_key"), ("without", "m_none")):
                        before = process_cpu(pid)
                        conn.execute(_INSERT.format(table=table), (job, *batch))
                        used[name] += process_cpu(pid) - before
    print(f"load average {os.getloadavg()[0]:.1f}; PostgreSQL backend µs of CPU per point")
    for name, seconds in used.items():
        print(f"{name:14} {1e6 * seconds / points:6.2f}")
    print(f"with ÷ without: {used['with the key'] / used['without']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
