"""The metrics ingest body's fast parse (service/metrics_body.py) accepts exactly what the model
accepts, gives the same points, and refuses a bad body naming the field, as the model would."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.exceptions import RequestValidationError
from hypothesis import given, settings
from hypothesis import strategies as st

from service.metrics_body import parse_metrics
from service.schemas import MAX_BIGINT, MAX_INT, MetricsIngest

TOKEN = "t" * 32

names = st.text(min_size=1, max_size=12)  # any text: surrogates and NUL included
points = st.lists(
    st.fixed_dictionaries(
        {"name": names, "step": st.integers(-1, MAX_BIGINT + 1), "value": st.floats()},
        optional={
            "epoch": st.none() | st.integers(-1, MAX_INT + 1),
            "time": st.none()
            | st.datetimes(timezones=st.none() | st.just(UTC) | st.timezones()).map(
                lambda t: t.isoformat()
            )
            | st.just("not a time"),
        },
    ),
    max_size=20,
)


def ordinary(body: bytes) -> list[dict] | None:
    """What the model makes of `body` (None: refused)."""
    try:
        data = json.loads(body)
        return [p.model_dump() for p in MetricsIngest.model_validate(data).points]
    except ValueError:
        return None


def filled(p: dict) -> dict:
    return {"epoch": None, "time": None, **p}


@settings(max_examples=300, deadline=None)
@given(points)
def test_the_fast_parse_agrees_with_the_model(batch):
    body = json.dumps({"lease_token": TOKEN, "points": batch}, allow_nan=True).encode()
    expected = ordinary(body)
    try:
        token, got = parse_metrics(body)
    except RequestValidationError as exc:
        assert expected is None, exc.errors()
        assert all(e["loc"][0] == "body" for e in exc.errors())
        return
    assert expected is not None and token == TOKEN
    assert [filled(p) for p in got] == expected


def test_points_come_back_as_plain_dicts_with_times_in_utc():
    body = {
        "lease_token": TOKEN,
        "points": [
            {"name": "loss", "step": 3, "value": 1},
            {"name": "acc", "step": 4, "value": 0.5, "epoch": 2, "time": "2026-01-01T01:00+01:00"},
        ],
    }
    token, got = parse_metrics(json.dumps(body).encode())
    assert token == TOKEN
    assert got[0] == {"name": "loss", "step": 3, "value": 1.0}
    assert got[1]["time"] == datetime(2026, 1, 1, tzinfo=UTC) and got[1]["epoch"] == 2
    assert got[1]["time"].utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("body", "loc", "kind"),
    [
        (b"", ["body"], "missing"),
        (b'{"lease_token": "t", "points": [', ["body", 32], "json_invalid"),
        (b'{"lease_token": "t", "points": [{"name": "l", "step": 1, "value": NaN}]}',
         ["body", "points", 0, "value"], "unstorable_value"),
        (b'{"lease_token": "t", "points": [{"name": "l", "step": 1, "value": 1e999}]}',
         ["body", "points", 0, "value"], "unstorable_value"),
        (b'{"lease_token": "t", "points": [{"name": "l", "step": 1, "value": 1},'
         b' {"name": "x\\ud800", "step": 1, "value": 1}]}',
         ["body", "points", 1, "name"], "unstorable_value"),
        (b'{"lease_token": "t", "points": [{"name": "a\\u0000b", "step": 1, "value": 1}]}',
         ["body", "points", 0, "name"], "unstorable_value"),
        (b'{"lease_token": "t\\u0000", "points": []}', ["body", "lease_token"],
         "unstorable_value"),
        (b'{"lease_token": "t", "points": [{"name": "l", "step": -1, "value": 1}]}',
         ["body", "points", 0, "step"], "greater_than_equal"),
        (b'{"lease_token": "t", "points": [{"name": "l", "step": 1, "value": 1, "x": 1}]}',
         ["body", "points", 0, "x"], "extra_forbidden"),
        (b'{"points": []}', ["body", "lease_token"], "missing"),
        (b'{"lease_token": "t", "points": [{"name": "l", "step": 1, "value": 1,'
         b' "time": "0001-01-01T00:00:00+05:00"}]}', ["body", "points", 0, "time"], "value_error"),
    ],
)  # fmt: skip
def test_a_bad_body_is_refused_naming_the_field(body, loc, kind):
    with pytest.raises(RequestValidationError) as raised:
        parse_metrics(body)
    first = raised.value.errors()[0]
    assert [first["type"], list(first["loc"])] == [kind, loc]


def test_the_openapi_document_describes_the_body(app):
    doc = app.openapi()
    route = doc["paths"]["/v1/agent/jobs/{job_id}/metrics"]["post"]
    schema = route["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/MetricsIngest"}
    schemas = doc["components"]["schemas"]
    points = schemas["MetricsIngest"]["properties"]["points"]
    assert points["items"] == {"$ref": "#/components/schemas/PointIn"}
    assert set(schemas["PointIn"]["required"]) == {"name", "step", "value"}
