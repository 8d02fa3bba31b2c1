"""Response bodies of /v1/studies (DESIGN.md "Studies"): status, summary statistics, curves."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from service.contract.vocabulary import StudyStatus

#: Whether a larger metric value is better (max) or a smaller one (min).
Mode = Literal["max", "min"]


class StudyCounts(BaseModel):
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0


class StudyCellPublic(BaseModel):
    key: str
    arm: str
    params: dict[str, Any]
    job_ids: list[int]


class StudyPublic(BaseModel):
    id: int
    name: str | None
    owner: str
    status: StudyStatus
    baseline: str | None
    seeds: list[int]
    created_at: datetime
    finished_at: datetime | None
    counts: StudyCounts
    cells: list[StudyCellPublic]


class StudiesPublic(BaseModel):
    items: list[StudyPublic]
    next_cursor: str | None


class Stat(BaseModel):
    """Mean, sample sd (ddof 1) and the 95 % CI half-width t(0.975, n−1)·sd/√n."""

    mean: float | None
    sd: float | None
    ci95: float | None


class SeedValues(BaseModel):
    final: float
    best: float
    last5: float


class Pair(BaseModel):
    """Cell − baseline over the seeds both succeeded on, with a two-sided paired t-test."""

    mean_diff: float | None
    t: float | None
    p: float | None
    wins: int


class VsBaseline(BaseModel):
    baseline_key: str
    n_pairs: int
    final: Pair
    best: Pair
    last5: Pair


class ToTarget(BaseModel):
    reached: int
    steps: Stat
    wall_s: Stat


class AlphaStats(BaseModel):
    """XSAM cells: the final α, and how often a search picked an end of its α grid."""

    final: Stat
    searches: int
    edge_hits: int
    edge_share: float | None


class SummaryCell(BaseModel):
    key: str
    arm: str
    params: dict[str, Any]
    n: int
    final: Stat
    best: Stat
    last5: Stat
    wall_s: Stat
    per_seed: dict[str, SeedValues]
    vs_baseline: VsBaseline | None
    to_target: ToTarget | None
    alpha: AlphaStats | None


class StudySummary(BaseModel):
    study_id: int
    metric: str
    mode: Mode
    target: float | None
    cells: list[SummaryCell]


class CurvePoint(BaseModel):
    step: int
    mean: float
    sd: float | None
    min: float
    max: float
    n: int


class StudyCurves(BaseModel):
    study_id: int
    name: str
    cells: dict[str, list[CurvePoint]]
