"""The rollup rows a batch of new points contributes, computed column-wise with numpy.

Same rows as the definition in service/metric_rollups.py: level L (1..LEVELS) has a row per
non-empty bucket ``step >> 3L`` of a series, level 0 one row per series; each row holds the count,
sum, min, max, first and last step and the last point (value, epoch, time) of its points. The
points are sorted once by (series, step); level 1 is a segmented reduction of them, each next
level a segmented reduction of the one below (8 × fewer rows), so a 1000-point batch costs a few
dozen numpy calls instead of a Python loop over its points and levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
from numpy.typing import NDArray

#: Each level's buckets are 2**LEVEL_BITS times wider than the one below.
LEVEL_BITS = 3
#: Levels 1..LEVELS: buckets of 8 to 8**8 (16.8 M) steps.
LEVELS = 8
#: The level holding one row per series.
SERIES_LEVEL = 0

#: The columns of `rollup_columns`' answer, in the table's order (without job_id).
COLUMNS = (
    "level", "name", "bucket", "count", "sum", "min", "max", "first_step", "last_step",
    "last_value", "last_epoch", "last_time",
)  # fmt: skip

_Ints = NDArray[np.int64]


def _segments(*keys: _Ints) -> tuple[_Ints, _Ints]:
    """(first, last) index of every run of equal `keys` in sorted columns."""
    n = len(keys[0])
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    first = np.flatnonzero(change)
    last = np.append(first[1:], n) - 1
    return first, last


class _Level:
    """One level's rows for a batch, sorted by (series code, bucket)."""

    def __init__(self, **columns: NDArray[Any]) -> None:
        self.c = columns

    def up(self, bucket: _Ints, grouped_by_code_only: bool = False) -> _Level:
        c = self.c
        first, last = _segments(c["code"]) if grouped_by_code_only else _segments(c["code"], bucket)
        return _Level(
            code=c["code"][first],
            bucket=np.zeros(len(first), np.int64) if grouped_by_code_only else bucket[first],
            count=np.add.reduceat(c["count"], first),
            sum=np.add.reduceat(c["sum"], first),
            min=np.minimum.reduceat(c["min"], first),
            max=np.maximum.reduceat(c["max"], first),
            first_step=c["first_step"][first],
            last_step=c["last_step"][last],
            last_value=c["last_value"][last],
            source=c["source"][last],
        )


def rollup_columns(
    names: Sequence[str],
    steps: Sequence[int],
    values: Sequence[float],
    epochs: Sequence[int | None],
    times: Sequence[datetime | None],
) -> dict[str, list[Any]]:
    """The rollup rows (every level) that the points — each new to its series, no (name, step)
    twice — contribute, as columns (`COLUMNS`), in key order (level, name, bucket)."""
    if not steps:
        return {c: [] for c in COLUMNS}
    series = sorted(set(names))
    code_of = {name: i for i, name in enumerate(series)}
    code = np.fromiter((code_of[n] for n in names), np.int64, len(names))
    step = np.asarray(steps, dtype=np.int64)
    value = np.asarray(values, dtype=np.float64)
    order = np.lexsort((step, code))
    code, step, value = code[order], step[order], value[order]
    ones = np.ones(len(step), np.int64)
    # The points as rows of width-1 buckets; each level merges 8 buckets of the one below.
    below = _Level(
        code=code, bucket=step, count=ones, sum=value, min=value, max=value, first_step=step,
        last_step=step, last_value=value, source=order,
    )  # fmt: skip
    levels: list[tuple[int, _Level]] = []
    for level in range(1, LEVELS + 1):
        below = below.up(below.c["bucket"] >> LEVEL_BITS)
        levels.append((level, below))
    levels.insert(0, (SERIES_LEVEL, below.up(below.c["bucket"], grouped_by_code_only=True)))

    out: dict[str, list[Any]] = {c: [] for c in COLUMNS}
    for level, rows in levels:
        c = rows.c
        n = len(c["code"])
        out["level"].extend([level] * n)
        out["name"].extend(series[i] for i in c["code"].tolist())
        out["bucket"].extend(c["bucket"].tolist())
        for column in ("count", "sum", "min", "max", "first_step", "last_step", "last_value"):
            out[column].extend(c[column].tolist())
        sources = c["source"].tolist()
        out["last_epoch"].extend(epochs[i] for i in sources)
        out["last_time"].extend(times[i] for i in sources)
    return out
