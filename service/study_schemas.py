"""Request and response bodies of /v1/studies (DESIGN.md "Studies"); field names are the contract."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, model_validator

from service.schemas import MAX_BIGINT, Tag, _Body, _In
from xsam.config import TrainConfig

#: A dotted path into a TrainConfig, e.g. ``optimizer.rho``.
DottedPath = Annotated[
    str, Field(min_length=1, max_length=200, pattern=r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$")
]
#: An arm's name: part of every cell key, so no ``|`` or ``=``.
ArmName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.+-]+$")]
Seed = Annotated[int, Field(ge=0, le=MAX_BIGINT)]

#: The arm a study without ``arms`` has: the base config itself.
BASE_ARM = "base"


def json_text(value: Any) -> str:
    """A value as the JSON text that cell keys use (and uniqueness is judged by)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class ArmIn(_In):
    """One arm: a name and the dotted-path settings that make it differ from ``base``."""

    name: ArmName
    set: dict[DottedPath, Any] = Field(default_factory=dict, max_length=100)


class StudyCreate(_Body):
    """A study: ``base`` expanded into arms × grid × seeds, one ordinary job per combination."""

    name: str | None = Field(default=None, max_length=200)
    base: TrainConfig
    arms: list[ArmIn] | None = Field(default=None, min_length=1, max_length=100)
    grid: dict[DottedPath, Annotated[list[Any], Field(min_length=1, max_length=1000)]] = Field(
        default_factory=dict, max_length=10
    )
    seeds: list[Seed] = Field(min_length=1, max_length=10_000)
    baseline: ArmName | None = None
    priority: int = Field(default=0, ge=-1000, le=1000, description="higher is claimed first")
    max_attempts: int = Field(default=3, ge=1, le=100)
    tags: list[Tag] = Field(default_factory=list, max_length=32)

    @model_validator(mode="after")
    def _consistent(self) -> StudyCreate:
        # "field: reason" messages: the error handler appends the field to loc.
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: must not contain duplicates")
        names = [a.name for a in self.arm_list]
        if len(set(names)) != len(names):
            raise ValueError("arms: arm names must be unique")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline: {self.baseline!r} is not an arm (arms: {names})")
        for path, values in self.grid.items():
            if len({json_text(v) for v in values}) != len(values):
                raise ValueError(f"grid: the values of {path} must not contain duplicates")
        paths = [*self.grid, *(p for a in self.arm_list for p in a.set)]
        if "seed" in paths:
            raise ValueError("seeds: a job's seed comes from seeds, not from set or grid")
        return self

    @property
    def arm_list(self) -> list[ArmIn]:
        """The arms; without ``arms``, the one arm ``base``."""
        return self.arms if self.arms is not None else [ArmIn(name=BASE_ARM)]
