"""The closure XSAM's tests hand to `step`: cross-entropy of `model` on (x, y), with the backward
pass unless XSAM asks for a forward only (`closure(backward=False)`, its α search)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


def closure_for(
    model: nn.Module, x: Tensor, y: Tensor, calls: list[bool] | None = None
) -> Callable[..., Tensor]:
    """The closure; `calls`, when given, records each call's `backward` flag."""

    def closure(backward: bool = True) -> Tensor:
        if calls is not None:
            calls.append(backward)
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if backward:
            loss.backward()
        return loss

    return closure
