"""The training loop: `fit(config)` trains one TrainConfig, alone or on every DDP rank.

The loop reads top to bottom (nanoGPT style). Each step: take this rank's next batch, augment
it on the device, run the optimizer arm (``sgd``: one forward+backward and an SGD step;
``sgd+``/``sam``/``xsam``: `XSAM.step` with k+1 passes and, when due, the α search), then one
tiny all-reduce so that every rank agrees on "the loss is not finite" and "stop requested".
Each epoch ends with the LR scheduler step, an evaluation when due, and a checkpoint.

The contract (arguments, report records, checkpoints, errors) is docs/internals.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from xsam.checkpoint import (
    FORMAT_VERSION,
    atomic_save,
    checkpoint_path,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from xsam.config import TrainConfig
from xsam.data import (
    augment_images,
    epoch_shard,
    load_dataset,
    per_rank_batch_size,
    steps_per_epoch,
)
from xsam.distributed import releases_ddp, wrap_ddp
from xsam.errors import ConfigurationError, DivergedError
from xsam.evaluation import evaluate, evaluate_ranks, load_trained, weights_file
from xsam.models import build_model
from xsam.schedules import build_scheduler

__all__ = ["evaluate", "fit", "load_trained"]

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]


@releases_ddp  # before the caller destroys the process group, even when fit raises
def fit(
    config: TrainConfig,
    *,
    report: Report | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    should_stop: Callable[[], bool] | None = None,
    data_root: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    on_checkpoint: Callable[[Path, dict[str, Any]], None] | None = None,
    weights_out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train ``config``; return the summary (see docs/internals.md)."""
    started = time.perf_counter()
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    main = rank == 0
    device = _pick_device(config, device)
    # Collectives carry tiny flag tensors; gloo wants them on the CPU, NCCL on the GPU.
    comm = device if distributed and dist.get_backend() == "nccl" else torch.device("cpu")

    def emit(record: dict[str, Any]) -> None:
        if main and report is not None:
            report(record)

    def event(type_: str, message: str, data: dict | None = None, key: str | None = None):
        emit({"kind": "event", "type": type_, "message": message, "data": data or {}, "key": key})

    def metrics(step: int, epoch: int, values: dict[str, float]) -> None:
        emit({"kind": "metrics", "step": step, "epoch": epoch, "values": values})

    # --- data, model, optimizer -----------------------------------------------------------
    data = load_dataset(config, data_root=data_root, device=device)
    batch = per_rank_batch_size(config.data.batch_size, world)
    spe = steps_per_epoch(len(data.y_train), config.data.batch_size, world)
    epochs = config.schedule.epochs
    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP broadcasts anyway)
    model = build_model(config, input_shape=data.input_shape, num_classes=data.num_classes)
    model = model.to(device)
    channels_last = device.type == "cuda" and data.x_train.ndim == 4
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    autocast = _autocast(config, device)

    ckpt = load_checkpoint(resume_from) if resume_from is not None else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    # DDP broadcasts rank 0's weights at construction; every pass's backward all-reduces grads.
    net: nn.Module = wrap_ddp(model, device) if distributed else model
    base, opt = _build_optimizer(config, model)
    scheduler = build_scheduler(base, config.schedule)
    arm = config.optimizer.name
    dynamic = arm != "sgd" and config.optimizer.effective_alpha == "dynamic"

    epoch0, batch0, step, epochs_done = 0, 0, 0, 0
    final: dict[str, float] = {}
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        epoch0, batch0, step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        epochs_done, final = ckpt["epochs_completed"], dict(ckpt["metrics"])
        rngs = ckpt["rng"]
        set_rng_state(rngs[rank] if len(rngs) == world else rngs[0], device)

    event(
        "started",
        f"training {config.model.name} on {config.data.name} with {arm}"
        + (f", resumed at epoch {epoch0 + 1} step {step}" if ckpt else ""),
        {
            "epochs": epochs,
            "steps_per_epoch": spe,
            "total_steps": epochs * spe,
            "start_step": step,
            "world_size": world,
            "device": str(device),
            "num_train": len(data.y_train),
            "num_test": len(data.y_test),
            "num_val": 0 if data.y_val is None else len(data.y_val),
        },
    )

    def save_checkpoint(position: tuple[int, int]) -> None:
        if checkpoint_dir is None:
            return
        # Collective: every rank contributes its RNG state; only rank 0 writes.
        rngs = [rng_state(device)]
        if distributed:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state(device))
        if not main:
            return
        state = {
            "format": FORMAT_VERSION,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": position[0],
            "batch": position[1],
            "step": step,
            "epochs_completed": epochs_done,
            "metrics": final,
            "rng": rngs,
            "config": config.model_dump(mode="json"),
        }
        path = atomic_save(state, checkpoint_path(checkpoint_dir))
        info = {"epoch": epochs_done, "step": step, "position": list(position)}
        event(
            "checkpoint",
            f"checkpoint at step {step}",
            {"path": str(path), **info},
            key=f"checkpoint:{step}",
        )
        if on_checkpoint is not None:
            on_checkpoint(path, info)

    # --- the loop ---------------------------------------------------------------------------
    generator = torch.Generator(device=device)
    status = "completed"
    for epoch in range(epoch0, epochs):
        net.train()
        shard = epoch_shard(len(data.y_train), epoch, seed=config.seed, rank=rank, world_size=world)
        shard = shard.to(device)
        window = _Window()
        epoch_loss, epoch_count = 0.0, 0
        stop = False
        done = first = batch0 if epoch == epoch0 else 0
        for i in range(first, spe):
            idx = shard[i * batch : (i + 1) * batch]
            x, y = data.x_train[idx], data.y_train[idx]
            if data.augment:
                # Seeded by (seed, step, rank): a resumed run augments exactly the same way.
                generator.manual_seed(_mix(config.seed, step, rank))
                x = augment_images(x, generator)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            every = config.optimizer.search_every
            search = dynamic and (i == 0 if every == "epoch" else step % every == 0)

            loss, correct = _train_step(net, base, opt, x, y, autocast, search)
            step += 1
            done = i + 1

            # Sync point (one per step): all ranks agree on divergence and on stopping, so
            # they raise or stop at the same step instead of deadlocking in the next all-reduce.
            requested = bool(should_stop()) if should_stop is not None else False
            flags = torch.stack(
                [
                    (~torch.isfinite(loss)).float().to(comm),
                    torch.tensor(float(requested), device=comm),
                ]
            )
            if distributed:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            diverged, stop = (bool(f) for f in flags.tolist())
            if diverged:
                raise DivergedError(
                    f"loss became {float(loss)} at step {step} (epoch {epoch + 1}); "
                    f"try a smaller optimizer.lr (now {config.optimizer.lr})"
                )

            loss_value = float(loss)
            window.add(loss_value, int(correct), len(y))
            epoch_loss, epoch_count = epoch_loss + loss_value * len(y), epoch_count + len(y)
            if search:
                _report_search(opt, step, epoch + 1, distributed, world, comm, event, metrics)
            if step % config.log_every == 0 or done == spe:
                values = window.values(world, base.param_groups[0]["lr"])
                if arm != "sgd":
                    values.update(_xsam_stats(opt))
                metrics(step, epoch + 1, values)
                window = _Window()
            if stop:
                break

        if epoch_count:
            final["train/loss"] = epoch_loss / epoch_count
        if done == spe:
            scheduler.step()
            epochs_done = epoch + 1
            data_event: dict[str, Any] = {"epoch": epochs_done, "step": step}
            if epochs_done % config.eval_every == 0 or epochs_done == epochs:
                val = evaluate_ranks(model, data, autocast, channels_last, distributed, rank, world)
                final.update(val)
                metrics(step, epochs_done, val)
                data_event.update(val)
            event(
                "epoch_done",
                f"epoch {epochs_done}/{epochs} done",
                data_event,
                key=f"epoch_done:{epochs_done}",
            )
            save_checkpoint((epoch + 1, 0))
        elif stop:
            save_checkpoint((epoch, done))
        if stop and not (done == spe and epochs_done == epochs):
            status = "stopped"
            event("stopped", f"stopped at step {step}", {"step": step, "epoch": epoch + 1})
            break

    summary = {
        "status": status,
        "epochs_completed": epochs_done,
        "steps": step,
        "metrics": dict(final),
        "fit_seconds": time.perf_counter() - started,
        "alpha": float(opt.alpha) if arm != "sgd" else None,
    }
    if weights_out is not None and main and status == "completed":
        atomic_save(weights_file(model, config, data, final), weights_out)
    if status == "completed":
        event("finished", f"finished after {step} steps", dict(summary), key="finished")
    return summary


# --- building blocks -----------------------------------------------------------------------


def _pick_device(config: TrainConfig, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if not config.resources.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigurationError("resources.use_gpu: true, but no CUDA device is available")
    # The caller (Ray Train, a launcher) has set this rank's device.
    return torch.device("cuda", torch.cuda.current_device())


def _autocast(config: TrainConfig, device: torch.device):
    if config.precision == "bf16":
        if device.type == "cuda":
            return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
        log.warning("precision bf16 applies on CUDA only; training in fp32 on %s", device)
    return contextlib.nullcontext


def _build_optimizer(config: TrainConfig, model: nn.Module):
    o = config.optimizer
    try:
        base = torch.optim.SGD(
            model.parameters(),
            lr=o.lr,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            nesterov=o.nesterov,
        )
    except ValueError as exc:
        raise ConfigurationError(f"optimizer.nesterov: {exc}") from exc
    if o.name == "sgd":
        return base, base
    from xsam.optim import XSAM

    opt = XSAM(
        model.parameters(),
        base,
        rho=o.rho,
        steps=o.steps,
        alpha=o.effective_alpha,
        rho_max=o.effective_rho_max,
        alpha_max=o.alpha_max,
        alpha_delta=o.alpha_delta,
        model=model,
    )
    return base, opt


def _train_step(net, base, opt, x, y, autocast, search: bool):
    """One optimizer step on (x, y); returns (clean loss, correct count) as tensors."""
    first: dict[str, torch.Tensor] = {}

    def closure(backward: bool = True) -> torch.Tensor:
        base.zero_grad(set_to_none=False)  # in place: XSAM and DDP buckets keep their views
        with autocast():
            out = net(x)
            loss = F.cross_entropy(out, y)
        if backward:
            loss.backward()
        if not first:  # the first pass is the clean one, at θ₀
            first["loss"] = loss.detach()
            first["correct"] = (out.argmax(1) == y).sum()
        return loss.detach()

    if opt is base:
        closure()
        base.step()
    else:
        opt.step(closure, search_alpha=search)
    return first["loss"].float(), first["correct"]


class _Window:
    """Train metrics accumulated between two reports (rank 0's shard)."""

    def __init__(self) -> None:
        self.loss = 0.0
        self.correct = 0
        self.count = 0
        self.t0 = time.perf_counter()

    def add(self, loss: float, correct: int, count: int) -> None:
        self.loss += loss * count
        self.correct += correct
        self.count += count

    def values(self, world: int, lr: float) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        return {
            "train/loss": self.loss / self.count,
            "train/acc": self.correct / self.count,
            "lr": float(lr),
            "throughput/samples_per_s": self.count * world / elapsed,
        }


def _xsam_stats(opt) -> dict[str, float]:
    s = opt.last_stats
    values = {
        "xsam/phi": float(s["phi"]),
        "xsam/alpha": float(s["alpha"]),
        "xsam/grad_norm": float(s["grad_norm"]),
        "xsam/ascent_grad_norm": float(s["ascent_grad_norm"]),
        "xsam/sharpness": float(s["perturbed_loss"]) - float(s["clean_loss"]),
    }
    return values


def _report_search(opt, step, epoch, distributed, world, comm, event, metrics) -> None:
    stats = opt.last_stats
    alpha = float(opt.alpha)
    alphas = [float(a) for a in stats.get("probe_alphas", [])]
    losses = [float(v) for v in stats.get("probe_losses", [])]
    event(
        "alpha_search",
        f"α = {alpha:g} at step {step}",
        {"step": step, "epoch": epoch, "alpha": alpha, "alphas": alphas, "losses": losses},
        key=f"alpha_search:{step}",
    )
    values = {"xsam/alpha": alpha}
    if distributed:
        # Sync point: gather every rank's α to prove they agree (XSAM averages probe losses).
        mine = torch.tensor([alpha], dtype=torch.float64, device=comm)
        every = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        ranks = [float(t) for t in every]
        consistent = max(ranks) == min(ranks)
        event(
            "alpha_check",
            f"α agrees on {world} ranks" if consistent else "α differs by rank",
            {"step": step, "alphas": ranks, "consistent": consistent},
            key=f"alpha_check:{step}",
        )
        values["xsam/alpha_rank_spread"] = max(ranks) - min(ranks)
    metrics(step, epoch, values)


def _mix(seed: int, step: int, rank: int) -> int:
    return ((seed * 1_000_003 + step) * 1_009 + rank) % (2**63 - 1)
