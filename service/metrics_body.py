"""The metrics ingest body, parsed straight from its bytes: the ingest route's hot path.

A metrics batch is thousands of points. FastAPI would parse it with Python's json, walk it for
unstorable values (service/deps.py), validate it into a model per point and dump each back to a
dict: about 6 µs of CPU per point, as much as PostgreSQL spends storing it. Here pydantic-core
parses and validates the bytes in one pass into plain dicts (about 1.1 µs per point, the time
texts included; `python bench/ingest_cpu.py --parse`). The only strings a valid body holds are the lease token and the series names, so the
unstorable check is one look at each distinct name.

Any body the fast pass refuses, or that holds a name or token it cannot store, is parsed again
the ordinary way (Python's json, `find_unstorable`, `MetricsIngest`), so a bad body gets exactly
the 422 every other route gives: the field and the reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, NotRequired, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from service.schemas import MAX_BIGINT, MAX_INT, MetricsIngest, UTCTime
from service.storable import find_unstorable

_Endpoint = TypeVar("_Endpoint", bound=Callable[..., Any])


class _Point(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    name: Annotated[str, Field(min_length=1, max_length=128)]
    step: Annotated[int, Field(ge=0, le=MAX_BIGINT)]
    value: Annotated[float, Field(allow_inf_nan=False)]
    epoch: NotRequired[Annotated[int, Field(ge=0, le=MAX_INT)] | None]
    # Parsed by _parse_times, once per distinct text (a batch shares a time per step).
    time: NotRequired[Annotated[str, Strict()] | None]


class _Batch(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    lease_token: Annotated[str, Field(max_length=64)]
    points: list[_Point]


_FAST = TypeAdapter(_Batch)
_TIME = TypeAdapter(UTCTime)

#: The route's requestBody in /openapi.json (FastAPI documents only bodies it parses itself).
OPENAPI_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/MetricsIngest"}}},
    }
}


def document_body(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` (the app's OpenAPI document) with `MetricsIngest` and its parts in components."""
    body = MetricsIngest.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(body.pop("$defs", {}))
    components["MetricsIngest"] = body
    return schema


def checks_own_body(endpoint: _Endpoint) -> _Endpoint:
    """Mark a route that reads and checks its body itself (the app-wide check skips it)."""
    endpoint.checks_own_body = True  # type: ignore[attr-defined]
    return endpoint


def _storable_text(text: str) -> bool:
    return "\x00" not in text and (text.isascii() or find_unstorable(text) is None)


def parse_metrics(body: bytes) -> tuple[str, list[dict[str, Any]]]:
    """(lease_token, points) of a metrics ingest body; RequestValidationError (a 422 naming the
    field) for a body that is not a valid batch."""
    try:
        batch = _FAST.validate_json(body)
    except ValidationError:
        pass  # the ordinary path below finds and names the problem
    else:
        points: list[dict[str, Any]] = batch["points"]  # type: ignore[assignment]
        if (
            _storable_text(batch["lease_token"])
            and all(_storable_text(name) for name in {p["name"] for p in points})
            and _parse_times(points)
        ):
            return batch["lease_token"], points
    model = _slow_parse(body)
    # Reached only if the ordinary path accepts what the fast one refused (it should not).
    return model.lease_token, [p.model_dump() for p in model.points]


def _parse_times(points: list[dict[str, Any]]) -> bool:
    """Replace the points' time texts by UTC datetimes (`UTCTime`, as the model parses them),
    parsing each distinct text once; False if one is not a time."""
    parsed: dict[str, datetime] = {}
    for p in points:
        text = p.get("time")
        if text is None:
            continue
        t = parsed.get(text)
        if t is None:
            try:
                t = parsed[text] = _TIME.validate_python(text)
            except ValidationError:
                return False
        p["time"] = t
    return True


def _slow_parse(body: bytes) -> MetricsIngest:
    if not body:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
        )
    try:
        data = json.loads(body)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        pos = getattr(exc, "pos", 0)
        why = getattr(exc, "msg", str(exc))
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body", pos), "msg": "JSON decode error",
              "input": {}, "ctx": {"error": why}}]
        ) from None  # fmt: skip
    found = find_unstorable(data)
    if found is not None:
        path, why = found
        raise RequestValidationError(
            [{"type": "unstorable_value", "loc": ("body", *path), "msg": why, "input": None}]
        )
    try:
        return MetricsIngest.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from None
