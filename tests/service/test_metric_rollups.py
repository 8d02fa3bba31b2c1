"""Rollups answer exactly what a scan of the raw points would, over the same bucket edges."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service import metric_ingest_pg, metric_rollups, metric_series, queue
from service.db.engine import make_engine, make_sessionmakers, run_in_transaction
from xsam.config import TrainConfig

CONFIG = TrainConfig.model_validate({"model": {"name": "mlp"}, "data": {"name": "digits"}})
NOW = datetime(2026, 11, 28, tzinfo=UTC)


@pytest.fixture
def sessions(db_url):
    engine = make_engine(db_url, pool_size=2, max_overflow=0)
    yield make_sessionmakers(engine)
    engine.dispose()


@st.composite
def histories(draw: st.DrawFn) -> dict[str, Any]:
    """A series or two, sent as shuffled batches with replays, and a query over a range."""
    stride = draw(st.sampled_from([1, 3, 64, 4099]))  # dense to sparse: every level is used
    steps = draw(st.lists(st.integers(0, 3000), min_size=1, max_size=300, unique=True))
    names = draw(st.lists(st.sampled_from(["loss", "acc"]), min_size=1, max_size=2, unique=True))
    points = [
        {"name": n, "step": s * stride, "value": draw(st.floats(-1e3, 1e3)), "epoch": s // 100}
        for n in names
        for s in steps
    ]
    order = draw(st.permutations(points))
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(order) - 1)), max_size=6)))
    batches = [order[a:b] for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True)]
    batches = [b for b in batches if b]
    # Replays: a batch sent again later, with other values (the stored ones must stay).
    for index in draw(st.lists(st.integers(0, len(batches) - 1), max_size=3)):
        batches.append([{**p, "value": p["value"] + 1} for p in batches[index]])
    top = max(steps) * stride
    return {
        "batches": batches,
        "since": draw(st.none() | st.integers(0, top + 10)),
        "until": draw(st.none() | st.integers(0, top + 10)),
        "max_points": draw(st.integers(1, 40)),
    }


def brute_force(
    stored: dict[tuple[str, int], dict[str, Any]],
    since: int | None,
    until: int | None,
    max_points: int,
) -> dict[str, list[dict[str, Any]]]:
    expected: dict[str, list[dict[str, Any]]] = {}
    for name in sorted({n for n, _ in stored}):
        series = sorted((p for (n, _), p in stored.items() if n == name), key=lambda p: p["step"])
        lo = series[0]["step"] if since is None else max(series[0]["step"], since)
        hi = series[-1]["step"] if until is None else min(series[-1]["step"], until)
        inside = [p for p in series if lo <= p["step"] <= hi]
        if not inside:
            continue
        if len(inside) <= max_points:
            expected[name] = [{"step": p["step"], "value": p["value"]} for p in inside]
            continue
        expected[name] = []
        for start, end in metric_rollups.bucket_edges(lo, hi, max_points):
            bucket = [p for p in inside if start <= p["step"] <= end]
            if bucket:
                values = [p["value"] for p in bucket]
                expected[name].append(
                    {
                        "step": bucket[-1]["step"],
                        "value": bucket[-1]["value"],
                        "epoch": bucket[-1]["epoch"],
                        "min": min(values),
                        "max": max(values),
                        "mean": math.fsum(values) / len(values),
                        "count": len(values),
                        "step_min": bucket[0]["step"],
                        "step_max": bucket[-1]["step"],
                    }
                )
    return expected


POLICY = queue.LeasePolicy(heartbeat_interval_s=5, lease_timeout_s=3600)


def ingest_in_transactions(sessions: Any, job_id: int, batches: list[list[dict]]) -> None:
    """Each batch as the ingest route stores it on SQLite: one transaction, no lease."""
    writer, _ = sessions
    for batch in batches:
        run_in_transaction(writer, lambda s, b=batch: metric_series.ingest(s, job_id, b, now=NOW))


def ingest_fenced(sessions: Any, job_id: int, batches: list[list[dict]]) -> None:
    """Each batch as the ingest route stores it on PostgreSQL: one statement under the lease
    (a replayed point sends the batch down the general path)."""
    writer, reader = sessions
    job = run_in_transaction(
        writer, lambda s: queue.claim_next(s, agent_id="t", cpus=8, gpus=0, policy=POLICY)
    )
    assert job is not None and job.id == job_id and job.lease_token
    for batch in batches:
        timed = [{**p, "time": NOW} for p in batch]
        with reader() as session:
            new = metric_ingest_pg.ingest_fenced(
                session, job_id, job.lease_token, timed, lease_s=3600
            )
        assert new is not None and 0 <= new <= len(batch)
        with reader() as session:  # a stale lease writes nothing
            stale = [{**p, "value": p["value"] - 7} for p in timed]
            assert (
                metric_ingest_pg.ingest_fenced(session, job_id, "stale", stale, lease_s=1) is None
            )


INGESTS = [
    pytest.param(ingest_in_transactions, id="transaction"),
    pytest.param(ingest_fenced, id="fenced"),
]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@pytest.mark.parametrize("ingest", INGESTS)
@given(history=histories())
def test_rollup_answer_equals_brute_force_downsampling(sessions, db_url, ingest, history):
    writer, reader = sessions
    if ingest is ingest_fenced and not db_url.startswith("postgresql"):
        pytest.skip("the one-statement ingest is PostgreSQL's")
    job_id = run_in_transaction(writer, lambda s: queue.enqueue(s, owner="t", config=CONFIG)[0].id)
    stored: dict[tuple[str, int], dict[str, Any]] = {}
    ingest(sessions, job_id, history["batches"])
    for batch in history["batches"]:
        for p in batch:
            stored.setdefault((p["name"], p["step"]), p)  # the first stored value stays

    since, until, max_points = history["since"], history["until"], history["max_points"]
    with reader() as session:
        answer = metric_series.query(
            session, job_id, since_step=since, until_step=until, max_points=max_points
        )
        latest = metric_series.latest(session, [job_id])[job_id]
    expected = brute_force(stored, since, until, max_points)

    assert answer.keys() == expected.keys()
    for name, points in answer.items():
        assert len(points) <= max_points
        assert len(points) == len(expected[name])
        for got, want in zip(points, expected[name], strict=True):
            for key, value in want.items():
                if key == "mean":
                    assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), (name, key)
                else:
                    assert got[key] == value, (name, key, got, want)
    # The latest point of each series is its highest step, whatever the order of arrival.
    for name in {n for n, _ in stored}:
        top = max(s for n, s in stored if n == name)
        assert latest[name]["step"] == top
        assert latest[name]["value"] == stored[(name, top)]["value"]
