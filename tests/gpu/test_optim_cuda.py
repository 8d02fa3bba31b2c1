"""XSAM on CUDA: the float64 CPU reference's trajectory, and no host sync outside a search."""

from __future__ import annotations

import copy

import pytest
import torch
from optim_reference import GRID, reference_step
from torch import Tensor, nn

from xsam.optim import XSAM

pytestmark = pytest.mark.gpu

STEPS, SEARCH_AT = 6, {0, 3}


def cpu_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).to(
        torch.float64
    )


def batches(n: int, size: int = 24, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 6, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (size,), generator=gen),
        )
        for _ in range(n)
    ]


def closure_for(model: nn.Module, x: Tensor, y: Tensor):
    def closure(backward: bool = True) -> Tensor:
        model.zero_grad(set_to_none=False)
        loss = nn.functional.cross_entropy(model(x), y)
        if backward:
            loss.backward()
        return loss

    return closure


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def follow_reference(device: str, foreach: bool, k: int) -> int:
    """Train a float32 copy on ``device`` beside the float64 reference on the CPU; assert they
    agree step by step; return how many searches picked exactly the reference's α.

    A search is judged against the reference's probe curve, not its argmax alone: adjacent grid
    points can differ by 1e-6 of the loss, where fp32 rounding may pick the neighbour. The α
    chosen must be an argmax of the float64 curve up to that rounding; the reference then steps
    with that α, so the two trajectories stay comparable.
    """
    ref_model = cpu_model()
    model = copy.deepcopy(ref_model).to(device, torch.float32)
    opt = XSAM(
        model.parameters(), sgd(model), rho=0.2, steps=k, alpha="dynamic", model=model,
        foreach=foreach,
    )  # fmt: skip
    ref_base, ref_alpha, exact = sgd(ref_model), 1.0, 0
    for i, (x, y) in enumerate(batches(STEPS)):
        search = i in SEARCH_AT
        xd, yd = x.to(device, torch.float32), y.to(device)
        loss = opt.step(closure_for(model, xd, yd), search_alpha=search)
        stats = opt.last_stats
        assert stats["phi"].device.type == torch.device(device).type
        if search:
            probe_model, probe_base = copy.deepcopy((ref_model, ref_base))
            curve = reference_step(
                probe_model, probe_base, closure_for(probe_model, x, y), rho=0.2, k=k,
                alpha=ref_alpha, rho_max=0.4, search=True,
            )["probe_losses"]  # fmt: skip
            assert stats["probe_alphas"] == pytest.approx(GRID)
            assert [float(v) for v in stats["probe_losses"]] == pytest.approx(curve, rel=1e-5)
            chosen = min(range(len(GRID)), key=lambda j: abs(GRID[j] - opt.alpha))
            assert abs(GRID[chosen] - opt.alpha) < 1e-9, opt.alpha
            top = max(curve)
            assert curve[chosen] >= top - 1e-5 * abs(top), (f"step {i}", opt.alpha, curve)
            exact += curve.index(top) == chosen
            ref_alpha = GRID[chosen]
        ref = reference_step(
            ref_model, ref_base, closure_for(ref_model, x, y), rho=0.2, k=k, alpha=ref_alpha,
            rho_max=0.4, search=False,
        )  # fmt: skip
        assert float(loss.detach()) == pytest.approx(ref["clean"], rel=1e-5)
        assert float(stats["phi"]) == pytest.approx(ref["phi"], rel=1e-4, abs=1e-6)
        assert float(stats["ascent_grad_norm"]) == pytest.approx(ref["ascent_grad_norm"], rel=1e-4)
        for (name, got), want in zip(
            model.state_dict().items(), ref_model.state_dict().values(), strict=True
        ):
            torch.testing.assert_close(
                got.cpu().to(want.dtype), want, rtol=1e-4, atol=1e-5, msg=f"step {i}: {name}"
            )
    assert opt.alpha != 1.0, "the searches should have moved α for this test to bite"
    return exact


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("k", [1, 2])
def test_cuda_float32_follows_the_float64_cpu_reference(foreach, k):
    # torch's default fp32 matmuls on CUDA are IEEE (no TF32): fp32 rounding is the only gap.
    follow_reference("cuda", foreach, k)


def small_resnet() -> nn.Module:
    from xsam.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", input_shape=(3, 32, 32), num_classes=10, width=8)
    return model.to("cuda").to(memory_format=torch.channels_last)


@pytest.mark.parametrize("foreach", [True, False])
def test_step_does_not_sync_with_the_host_outside_a_search(foreach):
    # As fit() trains on CUDA: channels_last, bf16 autocast, grads zeroed in place.
    model = small_resnet()
    base = sgd(model)
    opt = XSAM(model.parameters(), base, alpha="dynamic", model=model, foreach=foreach)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=gen).to("cuda")
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), generator=gen).to("cuda")

    def closure(backward: bool = True) -> Tensor:
        base.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        if backward:
            loss.backward()
        return loss.detach()

    opt.step(closure, search_alpha=True)  # allocates the scratch buffers and momentum
    opt.step(closure)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step(closure)
        # The detector bites: a search reads the probe losses back, by design.
        with pytest.raises(RuntimeError, match="synchroniz"):
            opt.step(closure, search_alpha=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
