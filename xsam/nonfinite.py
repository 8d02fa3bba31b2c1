"""Keeping NaN and inf out of the weights without waiting for the host.

Asking "is this finite?" with ``bool(tensor)`` stalls the GPU pipeline once per step. Instead
the answer stays on the device as a 0-dim bool tensor: a non-finite update is replaced by zero
there (``torch.where``), and the training loop reads the flag back only every ``log_every``
steps, where it fails the run ``diverged`` before anything is reported or checkpointed.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["all_finite", "zero_unless_finite_"]


def all_finite(tensors: list[Tensor]) -> Tensor:
    """A 0-dim bool tensor on the tensors' device: every element of every tensor is finite.

    One pass of norms: a norm is finite exactly when its tensor holds no NaN or inf (a finite
    tensor too large for the dtype's norm overflows to inf and counts as non-finite, which is
    the right call for a gradient).
    """
    if not tensors:
        raise ValueError("tensors: need at least one tensor (got an empty list)")
    norms = torch._foreach_norm(tensors, 2)
    return torch.isfinite(torch.stack([n.float() for n in norms])).all()


def zero_unless_finite_(tensors: list[Tensor], finite: Tensor) -> None:
    """In place: every tensor becomes zero where ``finite`` is false, else stays bit-identical.

    A multiply by 0/1 would keep NaN (NaN·0 = NaN), hence ``where``; one small kernel per
    tensor, no host synchronisation.
    """
    zeros: dict[tuple[torch.dtype, torch.device], Tensor] = {}
    for t in tensors:
        zero = zeros.get((t.dtype, t.device))
        if zero is None:
            zero = zeros[t.dtype, t.device] = torch.zeros((), dtype=t.dtype, device=t.device)
        torch.where(finite, t, zero, out=t)
