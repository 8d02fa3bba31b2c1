"""The float64 reference of XSAM.md's "One training step": per tensor, no tricks, no foreach.

Shared by tests/xsam/test_optim.py (XSAM on the CPU, bit for bit up to rounding) and
tests/gpu/ (XSAM on CUDA against this reference run on the CPU in float64). A module with a
unique name at the top of tests/, importable from every test directory (tests/conftest.py puts
tests/ on sys.path).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

GRID = [i / 10 for i in range(21)]  # XSAM.md: 0, 0.1, …, 2.0


def norm(ts: list[Tensor]) -> float:
    return math.sqrt(sum(float((t * t).sum()) for t in ts))


def dot(xs: list[Tensor], ys: list[Tensor]) -> float:
    return sum(float((x * y).sum()) for x, y in zip(xs, ys, strict=True))


def angle(a: Tensor, b: Tensor) -> float:
    a, b = a / a.norm(), b / b.norm()
    return 2 * math.atan2(float((a - b).norm()), float((a + b).norm()))


def norm_buffers(model: nn.Module) -> list[Tensor]:
    return [b for name, b in model.named_buffers() if "running" in name or "batches" in name]


def reference_step(
    model: nn.Module,
    base: torch.optim.Optimizer,
    closure: Callable[..., Tensor],
    *,
    rho: float,
    k: int,
    alpha: float,
    rho_max: float,
    search: bool,
    eps: float = 1e-12,
) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    theta0 = [p.detach().clone() for p in params]
    clean = closure()
    bn_after_first_pass = [b.clone() for b in norm_buffers(model)]
    g0_norm = norm([p.grad for p in params])
    for _ in range(k):  # step 2: θᵢ₊₁ = θᵢ + (ρ/k)·gᵢ/(‖gᵢ‖+ε)
        g = [p.grad.clone() for p in params]
        n = norm(g)
        with torch.no_grad():
            for p, gi in zip(params, g, strict=True):
                p.add_(gi * (rho / k) / (n + eps))
        perturbed = closure()
    gk = [p.grad.clone() for p in params]  # step 3
    s = norm(gk)
    disp = [p.detach() - t0 for p, t0 in zip(params, theta0, strict=True)]  # step 4
    nd = norm(disp)
    v0 = [x / (nd + eps) for x in disp]
    v1 = [g / (s + eps) for g in gk]
    cos = dot(v0, v1) / (norm(v0) * norm(v1))  # step 5, the textbook way
    phi = math.acos(max(-1.0, min(1.0, cos)))

    def u(a: float) -> list[Tensor]:  # step 7
        return [
            (math.sin((1 - a) * phi) * x + math.sin(a * phi) * y) / math.sin(phi)
            for x, y in zip(v0, v1, strict=True)
        ]

    probe_losses = None
    if search:  # step 6
        probe_losses = []
        for a in GRID:
            with torch.no_grad():
                for p, t0, ui in zip(params, theta0, u(a), strict=True):
                    p.copy_(t0 + rho_max * ui)
                probe_losses.append(float(closure(backward=False)))
        alpha = GRID[probe_losses.index(max(probe_losses))]  # index() finds the smallest α
    with torch.no_grad():  # step 8
        for p, t0, ui in zip(params, theta0, u(alpha), strict=True):
            p.copy_(t0)
            p.grad = s * ui
        for b, saved in zip(norm_buffers(model), bn_after_first_pass, strict=True):
            b.copy_(saved)
    base.step()
    return dict(
        alpha=alpha,
        phi=phi,
        grad_norm=g0_norm,
        ascent_grad_norm=s,
        clean=float(clean.detach()),
        perturbed=float(perturbed.detach()),
        probe_losses=probe_losses,
    )
