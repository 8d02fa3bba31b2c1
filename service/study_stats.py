"""A study's statistics (DESIGN.md "Studies"): per-cell Stats, paired comparison with the
baseline, time to target, XSAM's α statistics, and curves over seeds.

Pure functions over the series the caller read; the distributions come from scipy.stats
(``t.ppf`` for the 95 % CI, ``ttest_rel`` for the paired test), never hand-written.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from service.contract import (
    AlphaStats,
    CurvePoint,
    Pair,
    SeedValues,
    Stat,
    SummaryCell,
    ToTarget,
    VsBaseline,
)

Mode = Literal["max", "min"]
#: One point of a series: (step, value, time).
Point = tuple[int, float, datetime]


def _scipy_stats() -> Any:
    """scipy.stats, imported on first use: it was the largest import in every API process's
    start-up (`python -X importtime -c "import service.app"`); only study summaries need it."""
    from scipy import stats

    return stats


def stat(values: list[float]) -> Stat:
    """Mean, sample sd (ddof 1) and ci95 = t(0.975, n−1)·sd/√n; sd and ci95 null when n < 2."""
    n = len(values)
    if n == 0:
        return Stat(mean=None, sd=None, ci95=None)
    mean = math.fsum(values) / n
    if n < 2:
        return Stat(mean=mean, sd=None, ci95=None)
    sd = statistics.stdev(values)
    ci95 = float(_scipy_stats().t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return Stat(mean=mean, sd=sd, ci95=ci95)


def seed_values(series: list[Point], mode: Mode) -> SeedValues:
    """final: the value at the largest step; best: max (or min); last5: mean of the last five."""
    values = [v for _, v, _ in series]
    tail = values[-5:]
    return SeedValues(
        final=values[-1],
        best=max(values) if mode == "max" else min(values),
        last5=math.fsum(tail) / len(tail),
    )


def pair(cell: dict[int, float], baseline: dict[int, float], mode: Mode) -> Pair:
    """Cell − baseline over the seeds both have; t and p null below 2 pairs or without spread."""
    seeds = sorted(set(cell) & set(baseline))
    if not seeds:
        return Pair(mean_diff=None, t=None, p=None, wins=0)
    a = [cell[s] for s in seeds]
    b = [baseline[s] for s in seeds]
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    t = p = None
    # Equal differences (to rounding: 0.62 − 0.60 ≠ 0.66 − 0.64 in floating point) have no
    # spread, and a t-test on them would report a meaningless p ≈ 0.
    spread = not math.isclose(max(diffs), min(diffs), rel_tol=1e-9, abs_tol=1e-12)
    if len(seeds) >= 2 and spread:
        result = _scipy_stats().ttest_rel(a, b)
        t, p = float(result.statistic), float(result.pvalue)
    wins = sum(1 for d in diffs if (d > 0 if mode == "max" else d < 0))
    return Pair(mean_diff=math.fsum(diffs) / len(diffs), t=t, p=p, wins=wins)


def first_reach(
    series: list[Point], target: float, mode: Mode, started_at: datetime | None
) -> tuple[int, float | None] | None:
    """(step, seconds since the job started) of the first point at or beyond `target`."""
    for step, value, time in series:
        if (value >= target) if mode == "max" else (value <= target):
            wall = (time - started_at).total_seconds() if started_at is not None else None
            return step, wall
    return None


def alpha_stats(final_alphas: list[float], searches: Iterable[dict[str, Any]]) -> AlphaStats:
    """The final α's Stat, and the share of searches whose chosen α is an end of its α grid.

    A search is the data of one ``alpha_search`` event, ``{alpha, alphas, …}``: it hit an edge
    when ``alpha`` equals the smallest or the largest of the ``alphas`` it probed (then the
    optimum may lie outside the grid). Searches without a probed grid are not counted.
    """
    total = hits = 0
    for data in searches:
        alphas = [float(a) for a in data.get("alphas") or []]
        if not alphas or data.get("alpha") is None:
            continue
        total += 1
        alpha = float(data["alpha"])
        if math.isclose(alpha, min(alphas)) or math.isclose(alpha, max(alphas)):
            hits += 1
    return AlphaStats(
        final=stat(final_alphas),
        searches=total,
        edge_hits=hits,
        edge_share=hits / total if total else None,
    )


@dataclass
class CellRuns:
    """One cell's succeeded runs: per seed, the series and the job's start and finish."""

    key: str
    arm: str
    params: dict[str, Any]
    series: dict[int, list[Point]]
    started: dict[int, datetime | None]
    wall_s: list[float]
    alpha: AlphaStats | None = None


def summarize(
    cells: list[CellRuns], *, mode: Mode, target: float | None, baseline: str | None
) -> list[SummaryCell]:
    """The summary's cells, in the study's cell order."""
    per_cell = {
        c.key: {seed: seed_values(s, mode) for seed, s in c.series.items() if s} for c in cells
    }
    # The baseline's cell at each grid point (the grid point as JSON-comparable items).
    base_at = {
        _point_key(c.params): c.key for c in cells if baseline is not None and c.arm == baseline
    }
    out = []
    for c in cells:
        seeds = per_cell[c.key]
        vs = None
        base_key = base_at.get(_point_key(c.params))
        if base_key is not None and c.arm != baseline:
            base = per_cell[base_key]
            vs = VsBaseline(
                baseline_key=base_key,
                n_pairs=len(set(seeds) & set(base)),
                **{
                    what: pair(
                        {s: getattr(v, what) for s, v in seeds.items()},
                        {s: getattr(v, what) for s, v in base.items()},
                        mode,
                    )
                    for what in ("final", "best", "last5")
                },
            )
        to_target = None
        if target is not None:
            reached = [
                r
                for seed, s in c.series.items()
                if s and (r := first_reach(s, target, mode, c.started.get(seed))) is not None
            ]
            to_target = ToTarget(
                reached=len(reached),
                steps=stat([float(step) for step, _ in reached]),
                wall_s=stat([w for _, w in reached if w is not None]),
            )
        out.append(
            SummaryCell(
                key=c.key,
                arm=c.arm,
                params=c.params,
                n=len(seeds),
                final=stat([v.final for v in seeds.values()]),
                best=stat([v.best for v in seeds.values()]),
                last5=stat([v.last5 for v in seeds.values()]),
                wall_s=stat(c.wall_s),
                per_seed={str(seed): v for seed, v in seeds.items()},
                vs_baseline=vs,
                to_target=to_target,
                alpha=c.alpha,
            )
        )
    return out


def _point_key(params: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple((k, repr(v)) for k, v in params.items())


#: One job's value(s) at one curve point: (group, step, mean, min, max); group is the step
#: itself, or the bucket index when the steps were downsampled.
CurveRow = tuple[int, int, float, float, float]


def curve(rows_by_job: dict[int, list[CurveRow]]) -> list[CurvePoint]:
    """Per step (or bucket): mean and sd over the seeds of their values (bucket means), min
    and max over all their points, n seeds; the step is the bucket's largest."""
    groups: dict[int, list[CurveRow]] = {}
    for rows in rows_by_job.values():
        for row in rows:
            groups.setdefault(row[0], []).append(row)
    points = []
    for group in sorted(groups):
        rows = groups[group]
        means = [r[2] for r in rows]
        points.append(
            CurvePoint(
                step=max(r[1] for r in rows),
                mean=math.fsum(means) / len(means),
                sd=statistics.stdev(means) if len(means) >= 2 else None,
                min=min(r[3] for r in rows),
                max=max(r[4] for r in rows),
                n=len(rows),
            )
        )
    return points
