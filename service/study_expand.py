"""A study's expansion: arms × grid × seeds → cells and validated job configs, seed-major.

Pure (no database): every config is built and validated here before the caller stores
anything, so one bad cell refuses the whole study.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from service.errors import StudyInvalid, StudyTooLarge, UnknownPath
from service.study_schemas import StudyCreate, json_text
from xsam.config import TrainConfig, describe_errors

#: At most this many problems are listed in one 422 (the rest are counted).
MAX_LISTED_ERRORS = 10


@dataclass(frozen=True)
class Cell:
    """One arm at one grid point. ``params`` is the grid point only."""

    key: str
    arm: str
    params: dict[str, Any]
    #: The arm's ``set`` and then the grid point: what is applied to ``base``.
    overrides: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class PlannedJob:
    cell: Cell
    seed: int
    config: TrainConfig


def cell_key(arm: str, params: dict[str, Any]) -> str:
    """``arm`` without a grid, else ``arm|path=value|…`` in grid order, values as JSON text."""
    return "|".join([arm, *(f"{p}={json_text(v)}" for p, v in params.items())])


def job_count(spec: StudyCreate) -> int:
    """How many jobs `spec` expands into (known before anything is expanded)."""
    points = math.prod(len(values) for values in spec.grid.values())
    return len(spec.arm_list) * points * len(spec.seeds)


def cells_of(spec: StudyCreate) -> list[Cell]:
    """The cells in expansion order: arm by arm, grid points in request order."""
    paths = list(spec.grid)
    cells = []
    for arm in spec.arm_list:
        for values in itertools.product(*(spec.grid[p] for p in paths)):
            params = dict(zip(paths, values, strict=True))
            cells.append(Cell(cell_key(arm.name, params), arm.name, params, {**arm.set, **params}))
    return cells


def _check_path(base: dict[str, Any], path: str, where: str) -> None:
    node: Any = base
    for i, part in enumerate(path.split(".")):
        if not isinstance(node, dict) or part not in node:
            known = ", ".join(sorted(node)) if isinstance(node, dict) else "none: not an object"
            at = ".".join(path.split(".")[:i]) or "the config"
            raise UnknownPath(
                f"{where}: unknown path {path!r}: {at} has no field {part!r} (fields: {known})"
            )
        node = node[part]


def _apply(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(config)
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            node = node[part]
        node[leaf] = copy.deepcopy(value)
    return out


def expand(spec: StudyCreate, *, max_jobs: int) -> tuple[list[Cell], list[PlannedJob]]:
    """(cells, jobs): every config validated; jobs seed-major (every cell of a seed, then the next).

    Raises `StudyTooLarge` above `max_jobs`, `UnknownPath` for a path no config has, and
    `StudyInvalid` naming the arm, the grid point and the field of every bad cell.
    """
    total = job_count(spec)
    if total > max_jobs:
        raise StudyTooLarge(
            f"the study expands into {total} jobs ({len(spec.arm_list)} arms × "
            f"{total // len(spec.arm_list) // len(spec.seeds)} grid points × {len(spec.seeds)} "
            f"seeds); this server accepts at most {max_jobs} per study"
        )
    # Every field present, defaults included, so a dotted path can be checked against it.
    base = spec.base.model_dump(mode="json")
    for arm in spec.arm_list:
        for path in arm.set:
            _check_path(base, path, f"arm {arm.name!r}")
    for path in spec.grid:
        _check_path(base, path, "grid")

    cells = cells_of(spec)
    configs: dict[str, TrainConfig] = {}
    problems: list[str] = []
    for cell in cells:
        raw = _apply(base, cell.overrides)
        raw["seed"] = spec.seeds[0]
        try:
            configs[cell.key] = TrainConfig.model_validate(raw)
        except ValidationError as exc:
            point = ", ".join(f"{p}={json_text(v)}" for p, v in cell.params.items()) or "none"
            problems += [
                f"cell {cell.key!r} (arm {cell.arm!r}, grid point {point}): {line}"
                for line in describe_errors(exc)
            ]
    if problems:
        listed = "; ".join(problems[:MAX_LISTED_ERRORS])
        more = len(problems) - MAX_LISTED_ERRORS
        raise StudyInvalid(listed + (f"; and {more} more" if more > 0 else ""))

    jobs = [
        PlannedJob(cell, seed, configs[cell.key].model_copy(update={"seed": seed}))
        for seed in spec.seeds
        for cell in cells
    ]
    return cells, jobs
