"""Per-epoch learning-rate schedules (ScheduleConfig), as a LambdaLR on the base optimizer.

The factor for epoch e (0-based) is: linear warm-up (e+1)/W for e < W, then
- ``cosine``: ½(1 + cos(π·(e−W)/(E−W))), annealing to 0 at epoch E (the reference's
  CosineAnnealingLR(T_max=E) when W = 0);
- ``step``: ×0.1 from epoch ⌊E/2⌋ and ×0.01 from ⌊3E/4⌋;
- ``constant``: 1.
The scheduler steps once at the end of every epoch.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from xsam.config import ScheduleConfig


def lr_factor(epoch: int, schedule: ScheduleConfig) -> float:
    """Multiplier of the configured lr during epoch ``epoch`` (0-based)."""
    warmup, epochs = schedule.warmup_epochs, schedule.epochs
    if epoch < warmup:
        return (epoch + 1) / warmup
    if schedule.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))
    if schedule.lr_schedule == "step":
        return 0.1 ** sum(epoch >= m for m in (epochs // 2, (3 * epochs) // 4))
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: ScheduleConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, schedule=schedule))
