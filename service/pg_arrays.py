"""PostgreSQL array parameters in the binary wire format, built a batch at a time.

The metrics ingest statement takes a batch as a dozen arrays (`unnest`). Written as text, every
number is formatted by Python (``repr`` of every float) and parsed again by PostgreSQL; psycopg's own list dumper works element by element in Python. Here each
array is packed in one go (numpy for numbers, one cached encoding per distinct name or time)
and sent as binary: PostgreSQL copies the values in. `ARRAY` objects are bound like any other
parameter; psycopg picks the dumper registered below by their class.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format

# (element oid, array oid) of the types the metrics tables use.
_INT2, _INT4, _INT8 = (21, 1005), (23, 1007), (20, 1016)
_FLOAT8, _TIMESTAMP, _VARCHAR = (701, 1022), (1114, 1115), (1043, 1015)
_PG_EPOCH = datetime(2000, 1, 1)
_MICROSECOND = timedelta(microseconds=1)


class ARRAY:
    """A one-dimensional PostgreSQL array, already in the binary wire format."""

    __slots__ = ("oid", "payload")

    def __init__(self, oid: int, payload: bytes) -> None:
        self.oid = oid
        self.payload = payload


class _ArrayDumper(Dumper):
    format = Format.BINARY

    def dump(self, obj: ARRAY) -> bytes:
        return obj.payload

    def get_key(self, obj: ARRAY, format: Any) -> Any:
        return (type(obj), obj.oid)  # one dumper per array type, so each states its oid

    def upgrade(self, obj: ARRAY, format: Any) -> Dumper:
        dumper = _ArrayDumper(ARRAY)
        dumper.oid = obj.oid
        return dumper


psycopg.adapters.register_dumper(ARRAY, _ArrayDumper)


def _header(types: tuple[int, int], n: int, has_null: bool) -> bytes:
    return struct.pack(">iiiii", 1, int(has_null), types[0], n, 1)


def _fixed(types: tuple[int, int], dtype: str, values: Sequence[Any]) -> ARRAY:
    """Numbers of a fixed width; None is NULL."""
    n = len(values)
    if any(v is None for v in values):
        size = np.dtype(dtype).itemsize
        parts = [
            b"\xff\xff\xff\xff"
            if v is None
            else struct.pack(">i", size) + np.array(v, dtype).tobytes()
            for v in values
        ]
        return ARRAY(types[1], _header(types, n, True) + b"".join(parts))
    rows = np.empty(n, dtype=[("size", ">i4"), ("value", dtype)])
    rows["size"] = rows.dtype["value"].itemsize
    rows["value"] = values
    return ARRAY(types[1], _header(types, n, False) + rows.tobytes())


def int2(values: Sequence[int | None]) -> ARRAY:
    return _fixed(_INT2, ">i2", values)


def int4(values: Sequence[int | None]) -> ARRAY:
    return _fixed(_INT4, ">i4", values)


def int8(values: Sequence[int | None]) -> ARRAY:
    return _fixed(_INT8, ">i8", values)


def float8(values: Sequence[float | None]) -> ARRAY:
    return _fixed(_FLOAT8, ">f8", values)


def timestamp(values: Sequence[datetime | None]) -> ARRAY:
    """Times as PostgreSQL `timestamp` (naive UTC; an aware time is converted to UTC)."""
    # A batch's points share a few time objects (one per step, service/metrics_body.py):
    # each object is converted once, found by identity (hashing an aware time is not cheap).
    micros: dict[int, int] = {}
    out: list[int | None] = []
    for t in values:
        if t is None:
            out.append(None)
            continue
        m = micros.get(id(t))
        if m is None:
            naive = t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t
            m = micros[id(t)] = (naive - _PG_EPOCH) // _MICROSECOND
        out.append(m)
    return _fixed(_TIMESTAMP, ">i8", out)


def varchar(values: Sequence[str]) -> ARRAY:
    """Text (no NULLs); a batch repeats a few series names, each encoded once."""
    encoded: dict[str, bytes] = {}
    parts = []
    for v in values:
        e = encoded.get(v)
        if e is None:
            raw = v.encode()
            e = encoded[v] = struct.pack(">i", len(raw)) + raw
        parts.append(e)
    return ARRAY(_VARCHAR[1], _header(_VARCHAR, len(values), False) + b"".join(parts))
