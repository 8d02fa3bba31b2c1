"""DDP with the NCCL backend at world size 1: fit() and XSAM under DDP, then a clean teardown
(xsam.distributed: every DDP module released before the group is destroyed).

The rank is a spawned process with a deadline (process_support.run_ranks): a hang in NCCL's
init or teardown fails this test instead of stalling the whole GPU check.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
from process_support import free_port, run_ranks
from torch import nn

pytestmark = pytest.mark.gpu

DEADLINE_S = 100


def _config():
    from xsam.config import TrainConfig

    return TrainConfig.model_validate(
        {
            "model": {"name": "resnet18", "options": {"width": 8}},
            "data": {
                "name": "synthetic",
                "batch_size": 64,
                "options": {"shape": [3, 32, 32], "num_train": 256, "num_test": 64},
            },
            "optimizer": {"name": "xsam"},
            "schedule": {"epochs": 2},
            "resources": {"use_gpu": True},
            "precision": "bf16",
            # The CUDA-only switches: SyncBatchNorm's forward and backward run only here.
            "sync_batchnorm": True,
            "cudnn_benchmark": True,
            "log_every": 1,
        }
    )


def _xsam_steps(model: nn.Module, batches, search_at) -> float:
    from xsam.optim import XSAM

    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt = XSAM(model.parameters(), base, rho=0.1, alpha="dynamic", model=net)
    for i, (x, y) in enumerate(batches):

        def closure(backward=True, x=x, y=y):
            base.zero_grad(set_to_none=False)
            loss = nn.functional.cross_entropy(model(x), y)
            if backward:
                loss.backward()
            return loss.detach()

        opt.step(closure, search_alpha=i in search_at)
    return opt.alpha


def _rank(rank: int, port: int, out: str) -> None:
    from xsam.distributed import process_group, wrap_ddp
    from xsam.training import fit

    torch.cuda.set_device(0)
    # One rank on one host: NCCL's bootstrap may use the loopback interface (the lent GPU
    # machines reach nothing outside themselves).
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    init = f"tcp://127.0.0.1:{port}"
    # process_group releases every DDP module (ours below, fit()'s own) before it destroys
    # the group: in the other order a rank can hang at exit (xsam/distributed.py says why).
    with process_group("nccl", rank=rank, world_size=1, init_method=init, timeout_s=60):
        records: list[dict] = []
        summary = fit(_config(), report=records.append, data_root=out)

        # XSAM under a DDP module we hold, against the same steps without DDP.
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
        plain = plain.cuda()
        wrapped = wrap_ddp(copy.deepcopy(plain), torch.device("cuda", 0))
        gen = torch.Generator().manual_seed(1)
        batches = [
            (
                torch.randn(32, 6, generator=gen).cuda(),
                torch.randint(0, 3, (32,), generator=gen).cuda(),
            )
            for _ in range(4)
        ]
        alphas = (_xsam_steps(wrapped, batches, {0, 2}), _xsam_steps(plain, batches, {0, 2}))
        torch.save(
            {
                "summary": summary,
                "records": records,
                "alphas": alphas,
                "ddp": {k: v.cpu() for k, v in wrapped.module.state_dict().items()},
                "plain": {k: v.cpu() for k, v in plain.state_dict().items()},
                "backend": dist.get_backend(),
            },
            os.path.join(out, "rank0.pt"),
        )
        torch.cuda.synchronize()


@pytest.mark.timeout(DEADLINE_S + 30)
def test_fit_and_xsam_under_nccl_ddp_at_world_size_1(tmp_path):
    run_ranks(_rank, (free_port(), str(tmp_path)), nprocs=1, timeout_s=DEADLINE_S)
    got = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert got["backend"] == "nccl"
    summary = got["summary"]
    assert summary["status"] == "completed" and summary["steps"] == 8, summary
    events = [r for r in got["records"] if r["kind"] == "event"]
    started = next(e for e in events if e["type"] == "started")
    assert started["data"]["world_size"] == 1 and started["data"]["device"].startswith("cuda")
    checks = [e["data"] for e in events if e["type"] == "alpha_check"]
    assert len(checks) == 2 and all(c["consistent"] and len(c["alphas"]) == 1 for c in checks)
    # One rank's DDP averages over one rank: the same steps as without DDP.
    assert got["alphas"][0] == got["alphas"][1]
    for name, value in got["plain"].items():
        torch.testing.assert_close(got["ddp"][name], value, rtol=1e-5, atol=1e-6, msg=name)
