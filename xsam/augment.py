"""The CIFAR training augmentation, done on the device in whole batches.

The reference pipeline (the SAM papers' and the XSAM authors' code) works on PIL images, then
normalises, then applies Cutout:

    RandomCrop(32, padding=4) → RandomHorizontalFlip → ToTensor → Normalize → Cutout(16, p=0.5)

Our images are stored already normalised, so the one place the order matters is the crop's
padding: in the reference it is black (pixel 0) because it happens before normalisation. Here it
is filled with ``pad_value``, the normalised value of a black pixel per channel (-mean/std, see
`xsam.data.Dataset.pad_value`). Cutout comes after normalisation in the reference too, so its
hole is 0, the channel mean. Every random draw comes from ``generator``, on ``x``'s device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Zero padding on each side before the random 32×32 crop.
CROP_PADDING = 4
#: Side of the Cutout square (clipped at the image border, as in the reference).
CUTOUT_SIZE = 16
#: Probability that a sample gets a Cutout hole at all (the reference's ``Cutout(p=0.5)``).
CUTOUT_P = 0.5


def augment_images(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    pad_value: float | Sequence[float] = 0.0,
    cutout_p: float = CUTOUT_P,
) -> torch.Tensor:
    """Random crop (padding 4, filled with ``pad_value``), horizontal flip and Cutout(16).

    ``x`` is a batch ``(N, C, H, W)``; each sample draws its own crop offset, flip and, with
    probability ``cutout_p``, a Cutout hole centred uniformly in the image (filled with 0).
    ``pad_value`` is one number or one per channel. Same generator state, same output.
    """
    if not 0.0 <= cutout_p <= 1.0:
        raise ValueError(f"cutout_p: must be in [0, 1] (got {cutout_p})")
    n, c, h, w = x.shape
    dev = x.device
    pad = CROP_PADDING
    fill = torch.as_tensor(pad_value, dtype=x.dtype, device=dev).reshape(-1)
    if fill.numel() not in (1, c):
        raise ValueError(f"pad_value: need 1 or {c} values (one per channel), got {fill.numel()}")
    padded = fill.reshape(1, -1, 1, 1).expand(n, c, h + 2 * pad, w + 2 * pad).clone()
    padded[:, :, pad : pad + h, pad : pad + w] = x
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]  # (n, h, 1)
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]  # (n, 1, w)
    batch = torch.arange(n, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(n, generator=generator, device=dev) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(3), out)
    # Positions are drawn for every sample, kept or not: with the same generator a hole kept
    # at cutout_p = 0.5 is the hole cutout_p = 1 would cut (a test relies on it).
    cy = torch.randint(0, h, (n,), generator=generator, device=dev)
    cx = torch.randint(0, w, (n,), generator=generator, device=dev)
    keep = torch.rand(n, generator=generator, device=dev) < cutout_p
    half = CUTOUT_SIZE // 2
    ys = torch.arange(h, device=dev)[None, :, None]
    xs = torch.arange(w, device=dev)[None, None, :]
    hole = ((ys >= cy[:, None, None] - half) & (ys < cy[:, None, None] + half)) & (
        (xs >= cx[:, None, None] - half) & (xs < cx[:, None, None] + half)
    )
    hole &= keep[:, None, None]
    return out.masked_fill(hole[:, None, :, :], 0.0).contiguous()
