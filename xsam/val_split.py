"""The validation split: part of the training set held out to choose hyperparameters on.

``data.val_fraction`` moves that share of the training set into a validation set. Which samples
move is fixed by ``data.val_seed`` alone (not by the run's ``seed``), so every job of a study,
every rank of a job and every retry hold out the same samples: a study that picks ρ on
``val/acc`` compares arms on one validation set and never looks at the test set
(``test/acc``), which is only reported.
"""

from __future__ import annotations

import torch

from xsam.errors import ConfigurationError


def hold_out(
    x: torch.Tensor, y: torch.Tensor, fraction: float, *, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Split ``(x, y)`` into ``(x_train, y_train, x_val, y_val)``.

    ``round(fraction * len(y))`` samples, drawn by a permutation seeded with ``seed``, form the
    validation set; both parts keep the original order of their samples. ``fraction == 0``
    returns the inputs and no validation set.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigurationError(f"data.val_fraction: must be in [0, 1) (got {fraction})")
    if fraction == 0.0:
        return x, y, None, None
    n = len(y)
    n_val = round(fraction * n)
    if n_val < 1 or n_val >= n:
        raise ConfigurationError(
            f"data.val_fraction: {fraction} of {n} training samples leaves "
            f"{n_val} for validation and {n - n_val} for training; both must be >= 1"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[order[:n_val]] = True
    keep = (~is_val).nonzero().squeeze(1)
    held = is_val.nonzero().squeeze(1)
    return x[keep], y[keep], x[held], y[held]
