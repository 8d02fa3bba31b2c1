"""Health rules on a run's metric stream: a stalled run, and α pinned at an edge of its grid.

Both are pure: fed observations (and the clock, as a number) by their caller, they decide; the
caller acts. They run in the worker, beside what they watch and what they act on:

- `StallRule` runs in the agent's thread for the job (`worker.ray_run.JobRun`), fed the step
  rank 0 publishes through the job's control actor. No new step for
  ``max(multiple × median step time, min_s)`` means the run is stalled (a hung collective, a
  stopped or wedged rank, a dead file system): the agent sends a ``stalled`` event, aborts the
  run and ends the attempt as an infrastructure failure, so the service requeues the job as its
  next attempt, which resumes from the checkpoint. Only the agent can restart a run, and only it
  sees steps without a round trip through the service.
- `AlphaEdgeRule` runs on rank 0 (`worker.rank`), on fit's ``alpha_search`` records: α chosen
  at 0 or at α_max for ``searches`` consecutive searches gives one ``warning`` event (not one
  per search): the grid probably ends too early (α_max) or XSAM is acting as SGD+ (0).

The numbers come from the service's settings (``XSAM_STALL_STEP_MULTIPLE``,
``XSAM_STALL_MIN_S``, ``XSAM_ALPHA_EDGE_SEARCHES``), handed to the agent with each claim's lease
(``lease.health``), so every agent of a deployment applies the same rules.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from service.contract import EventType

#: How many recent per-step times the median is taken over.
STEP_TIMES_KEPT = 64


@dataclass(frozen=True)
class HealthSettings:
    """The rules' numbers; the defaults are the service's (service/settings.py)."""

    stall_step_multiple: float = 10.0
    stall_min_s: float = 60.0
    alpha_edge_searches: int = 5

    @classmethod
    def from_lease(cls, lease: Mapping[str, Any]) -> HealthSettings:
        """The lease's ``health`` (a service without it: the defaults)."""
        given = lease.get("health") or {}
        names = ("stall_step_multiple", "stall_min_s", "alpha_edge_searches")
        return cls(**{name: given[name] for name in names if given.get(name) is not None})


@dataclass(frozen=True)
class Stall:
    """What the stall rule saw: the last step, how long since, and the limit it crossed."""

    step: int
    silent_s: float
    limit_s: float
    median_step_s: float

    @property
    def message(self) -> str:
        return (
            f"no new step for {self.silent_s:.0f} s after step {self.step} (limit "
            f"{self.limit_s:.0f} s: the median step takes {self.median_step_s:.3g} s)"
        )

    def as_data(self) -> dict[str, float]:
        return {
            "step": self.step,
            "silent_s": round(self.silent_s, 3),
            "limit_s": round(self.limit_s, 3),
            "median_step_s": self.median_step_s,
        }


class StallRule:
    """No new step for ``max(multiple × median step time, min_s)`` → stalled.

    `observe` is fed the run's latest step with the time it was seen (any clock in seconds);
    the median step time is over the recent advances (seconds per step between two
    observations). The rule is armed by the first advance: start-up (data loading, Ray's
    worker group, a resume) and the time before a run's first step are never a stall.
    """

    def __init__(self, multiple: float, min_s: float) -> None:
        if not (multiple > 0 and min_s > 0):
            raise ValueError(
                f"stall rule: multiple and min_s must be > 0 (got {multiple}, {min_s})"
            )
        self.multiple, self.min_s = multiple, min_s
        self._step: int | None = None
        self._seen_at = 0.0
        self._step_times: deque[float] = deque(maxlen=STEP_TIMES_KEPT)

    def observe(self, step: int, now: float) -> None:
        if self._step is None or step < self._step:  # the first step seen, or a resumed run
            self._step, self._seen_at = step, now
            return
        if step > self._step:
            self._step_times.append((now - self._seen_at) / (step - self._step))
            self._step, self._seen_at = step, now

    def limit_s(self) -> float | None:
        """Seconds without a new step that make a stall; None until the rule is armed."""
        if not self._step_times:
            return None
        return max(self.multiple * statistics.median(self._step_times), self.min_s)

    def check(self, now: float) -> Stall | None:
        limit = self.limit_s()
        if limit is None or self._step is None or now - self._seen_at <= limit:
            return None
        median = statistics.median(self._step_times)
        return Stall(self._step, now - self._seen_at, limit, median)


class AlphaEdgeRule:
    """α at 0 or at α_max for ``searches`` consecutive α searches → one warning record.

    `observe` takes an ``alpha_search`` record's data (``alpha``, the probe grid ``alphas``,
    ``step``) and returns fit-style event record to report, once per stretch at an edge: a new
    one only after α has left the edge (or moved to the other one).
    """

    def __init__(self, searches: int, alpha_max: float | None = None) -> None:
        if searches < 1:
            raise ValueError(f"alpha edge rule: searches must be >= 1 (got {searches})")
        self.searches = searches
        self.alpha_max = alpha_max
        self._edge: str | None = None
        self._count = 0
        self._since_step: int | None = None
        self._warned = False

    def _edge_of(self, alpha: float, top: float) -> str | None:
        if math.isclose(alpha, 0.0, abs_tol=1e-12):
            return "0"
        if math.isclose(alpha, top, rel_tol=1e-9, abs_tol=1e-12):
            return "alpha_max"
        return None

    def observe(self, data: Mapping[str, Any]) -> dict[str, Any] | None:
        alpha = data.get("alpha")
        if alpha is None or not math.isfinite(float(alpha)):
            return None
        grid = [float(a) for a in data.get("alphas") or [] if a is not None]
        top = max(grid) if grid else self.alpha_max
        if top is None:
            return None
        edge = self._edge_of(float(alpha), top)
        if edge != self._edge:
            self._edge, self._count, self._warned = edge, 0, False
            self._since_step = data.get("step")
        if edge is None:
            return None
        self._count += 1
        if self._count < self.searches or self._warned:
            return None
        self._warned = True
        where = (
            "0 (XSAM is acting as SGD+)"
            if edge == "0"
            else (
                f"α_max = {top:g} (the best α may lie beyond the grid: raise optimizer.alpha_max)"
            )
        )
        return {
            "kind": "event",
            "type": EventType.WARNING.value,
            "message": f"α pinned at {where} for {self._count} consecutive α searches "
            f"(since step {self._since_step})",
            "data": {
                "rule": "alpha_pinned",
                "edge": edge,
                "alpha": float(alpha),
                "alpha_max": top,
                "searches": self._count,
                "since_step": self._since_step,
                "step": data.get("step"),
            },
            "key": f"alpha_pinned:{edge}:{self._since_step}",
        }


def watch_alpha(report: Callable[[dict[str, Any]], None], rule: AlphaEdgeRule):
    """fit's ``report`` callback ``report``, with ``rule`` fed every ``alpha_search`` record
    and its warning reported right after the search that raised it."""

    def watched(record: dict[str, Any]) -> None:
        report(record)
        if record.get("kind") == "event" and record.get("type") == "alpha_search":
            warning = rule.observe(record.get("data") or {})
            if warning is not None:
                report(warning)

    return watched
