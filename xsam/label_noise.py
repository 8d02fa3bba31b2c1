"""Symmetric label noise on a training set, as SAM papers use to test robustness.

``data.label_noise`` = p replaces each training label, independently with probability p, by one
of the *other* classes drawn uniformly. The draws depend only on the seed and the number of
labels, so every DDP rank and every retry of a run sees the same noisy labels.
"""

from __future__ import annotations

import torch

from xsam.errors import ConfigurationError


def symmetric_label_noise(
    labels: torch.Tensor, num_classes: int, rate: float, *, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noisy labels, changed mask)``: each label, with probability ``rate``, becomes a
    uniformly drawn *other* class.

    "Other" so that ``rate`` is the expected fraction of wrong labels, the noise level the
    papers report (drawing from all classes would leave 1/C of the flips correct). The draws
    depend only on ``seed`` and the number of labels, and the flipped set at a lower rate is a
    subset of the one at a higher rate.
    """
    if rate == 0:
        return labels, torch.zeros_like(labels, dtype=torch.bool)
    if num_classes < 2:
        raise ConfigurationError("data.label_noise: needs at least 2 classes to swap between")
    # A generator of its own, so the noise never moves with the weight init or the batch
    # order; the seed is mixed so the stream is not epoch_shard's permutation (seed + epoch).
    g = torch.Generator().manual_seed((seed * 1_000_003 + 0x4E015E) % (2**63 - 1))
    flip = torch.rand(len(labels), generator=g) < rate
    shift = torch.randint(1, num_classes, (len(labels),), generator=g)
    noisy = torch.where(flip, (labels.cpu() + shift) % num_classes, labels.cpu())
    return noisy.to(labels.device), flip.to(labels.device)
