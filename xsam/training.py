"""The training loop: `fit(config)` trains one TrainConfig, alone or on every DDP rank.

The loop reads top to bottom (nanoGPT style). Each step: take this rank's next batch, augment
it on the device, run the optimizer arm (``sgd``: one forward+backward and an SGD step;
``sgd+``/``sam``/``xsam``: `XSAM.step` with k+1 passes and, when due, the α search), and add
its loss, accuracy and finiteness to device accumulators — no host synchronisation, no
collective. Every ``log_every`` steps (and at each epoch's end, and at once when a
single-process run is asked to stop) the window is read back: one host sync and, under DDP,
one tiny all-reduce so that all ranks agree on "a step was not finite" (→ `DivergedError`
naming the step) and "stop requested". Each epoch ends with the LR scheduler step, an
evaluation when due, and a checkpoint, always after a read, so a non-finite step is never
checkpointed.

The contract (arguments, report records, checkpoints, errors) is docs/internals.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

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
from xsam.cuda_graph import GraphedStep
from xsam.data import (
    epoch_shard,
    load_dataset,
    per_rank_batch_size,
    steps_per_epoch,
)
from xsam.distributed import releases_ddp, wrap_ddp
from xsam.errors import ConfigurationError, DivergedError
from xsam.evaluation import (
    accuracy_summary,
    evaluate,
    evaluate_ranks,
    load_trained,
    weights_file,
)
from xsam.models import build_model
from xsam.nonfinite import all_finite, zero_unless_finite_
from xsam.records import FitEvent, FitOutcome, FitRecord, FitSummary
from xsam.schedules import build_scheduler
from xsam.step_stats import StepStats

__all__ = ["evaluate", "fit", "load_trained"]

log = logging.getLogger(__name__)

Report = Callable[[FitRecord], None]


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
) -> FitSummary:
    """Train ``config``; return the summary (see docs/internals.md)."""
    started = time.perf_counter()
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    main = rank == 0
    device = _pick_device(config, device)
    # Collectives carry tiny flag tensors; gloo wants them on the CPU, NCCL on the GPU.
    comm = device if distributed and dist.get_backend() == "nccl" else torch.device("cpu")

    def emit(record: FitRecord) -> None:
        if main and report is not None:
            report(record)

    def event(type_: FitEvent, message: str, data: dict | None = None, key: str | None = None):
        emit({"kind": "event", "type": type_, "message": message, "data": data or {}, "key": key})

    def metrics(step: int, epoch: int, values: dict[str, float]) -> None:
        emit({"kind": "metrics", "step": step, "epoch": epoch, "values": values})

    # --- data, model, optimizer -----------------------------------------------------------
    if config.data.batch_size % world:
        # TrainConfig refuses this against resources.num_workers; the launcher may differ.
        raise ConfigurationError(
            f"data.batch_size: must be divisible by the {world} ranks (got "
            f"{config.data.batch_size}); an uneven split would change the batch silently"
        )
    data = load_dataset(config, data_root=data_root, device=device)
    batch = per_rank_batch_size(config.data.batch_size, world)
    spe = steps_per_epoch(len(data.y_train), config.data.batch_size, world)
    epochs = config.schedule.epochs
    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP broadcasts anyway)
    model = build_model(config, input_shape=data.input_shape, num_classes=data.num_classes)
    model = model.to(device)
    if rank > 0:
        # Dropout draws from the global RNG: one shared seed would give every rank the same
        # masks. Rank 0 keeps the stream a single-process run has.
        torch.manual_seed(_mix(config.seed, 0, rank))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
    channels_last = device.type == "cuda" and data.x_train.ndim == 4
    if channels_last:
        # Module.to takes memory_format at run time; torch's overloads leave it out.
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    # Autocast's weight cache must be off inside a CUDA-graph capture; the numbers are the same.
    autocast = _autocast(config, device, cache=not config.cuda_graphs)

    ckpt = load_checkpoint(resume_from) if resume_from is not None else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    if distributed and config.sync_batchnorm:
        model = _sync_batchnorm(model, device)
    # DDP broadcasts rank 0's weights at construction; every pass's backward all-reduces grads.
    net: nn.Module = wrap_ddp(model, device) if distributed else model
    if config.compile_model:
        # same parameters and buffers: the optimizer sees `model`. (A compiled Module is an
        # OptimizedModule, a Module; torch.compile's overloads only say Callable.)
        net = cast(nn.Module, torch.compile(net))
    base, opt = _build_optimizer(config, model)
    scheduler = build_scheduler(base, config.schedule)
    arm = config.optimizer.name
    dynamic = arm != "sgd" and config.optimizer.effective_alpha == "dynamic"
    graphed = _graphed_step(config, device, distributed, world, net, base, opt, autocast, batch)

    epoch0, batch0, step, epochs_done = 0, 0, 0, 0
    final: dict[str, float] = {}
    accuracies: list[float] = []  # test/acc of every evaluation so far, for best and last-5
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        epoch0, batch0, step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        epochs_done, final = ckpt["epochs_completed"], dict(ckpt["metrics"])
        accuracies = list(ckpt.get("val_accuracies", []))
        rngs = ckpt["rng"]
        set_rng_state(rngs[rank] if len(rngs) == world else rngs[0], device)

    event(
        FitEvent.STARTED,
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
            "label_noise_fraction": data.label_noise_fraction,
            "num_test": len(data.y_test),
            "num_val": 0 if data.y_val is None else len(data.y_val),
        },
    )

    def save_checkpoint(position: tuple[int, int]) -> None:
        if stats.pending:  # every call site follows a read, which raised on a non-finite step
            raise RuntimeError(f"checkpoint with {stats.pending} unchecked step(s) at {step}")
        if checkpoint_dir is None:
            return
        # Collective: every rank contributes its RNG state; only rank 0 writes.
        rngs: list[dict[str, torch.Tensor] | None] = [rng_state(device)]
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
            "val_accuracies": accuracies,
            "rng": rngs,
            "config": config.model_dump(mode="json"),
        }
        path = atomic_save(state, checkpoint_path(checkpoint_dir))
        info = {"epoch": epochs_done, "step": step, "position": list(position)}
        event(
            FitEvent.CHECKPOINT,
            f"checkpoint at step {step}",
            {"path": str(path), **info},
            key=f"checkpoint:{step}",
        )
        if on_checkpoint is not None:
            on_checkpoint(path, info)

    # --- the loop ---------------------------------------------------------------------------
    generator = torch.Generator(device=device)
    stats = StepStats(device)
    status = FitOutcome.COMPLETED
    requested = False  # this rank was asked to stop; acted on at the next read
    for epoch in range(epoch0, epochs):
        net.train()
        shard = epoch_shard(len(data.y_train), epoch, seed=config.seed, rank=rank, world_size=world)
        shard = shard.to(device)
        epoch_loss, epoch_count = 0.0, 0
        stop = False
        done = first = batch0 if epoch == epoch0 else 0
        for i in range(first, spe):
            idx = shard[i * batch : (i + 1) * batch]
            x, y = data.x_train[idx], data.y_train[idx]
            if data.augment:
                # Seeded by (seed, step, rank): a resumed run augments exactly the same way.
                generator.manual_seed(_mix(config.seed, step, rank))
                x = data.augment_batch(x, generator)  # pads black, as the reference does
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            every = config.optimizer.search_every
            search = dynamic and (i == 0 if every == "epoch" else step % every == 0)

            if graphed is not None:  # replays a captured step, or runs it eagerly when due
                loss, correct, finite = graphed.step(x, y, search)
            else:
                loss, correct, finite = _train_step(net, base, opt, x, y, autocast, search)
            step += 1
            done = i + 1
            stats.add(loss, correct, len(y), finite, step)  # on the device: no host sync
            if search:
                _report_search(opt, step, epoch + 1, distributed, world, comm, event, metrics)

            # should_stop() is a host call, cheap; under DDP the ranks only agree at a read.
            requested = requested or (bool(should_stop()) if should_stop is not None else False)
            report_due = step % config.log_every == 0 or done == spe
            if not (report_due or (requested and not distributed)):
                continue
            window = stats.read(stop_requested=requested, distributed=distributed, comm=comm)
            if window.first_bad_step is not None:
                bad = window.first_bad_step
                raise DivergedError(
                    f"the loss or the update became NaN or infinite at step {bad} (epoch "
                    f"{(bad - 1) // spe + 1}); try a smaller optimizer.lr (now "
                    f"{config.optimizer.lr})"
                )
            epoch_loss, epoch_count = epoch_loss + window.loss_sum, epoch_count + window.count
            # Not at a stop between two reports: a resumed run's series stays evenly spaced.
            if report_due:
                values = {
                    "train/loss": window.loss_sum / window.count,
                    "train/acc": window.correct / window.count,
                    "lr": float(base.param_groups[0]["lr"]),
                    "throughput/samples_per_s": window.count * world / window.seconds,
                }
                if arm != "sgd":
                    values.update(_xsam_stats(opt))
                metrics(step, epoch + 1, values)
            if window.stop:
                stop = True
                break

        if epoch_count:
            final["train/loss"] = epoch_loss / epoch_count
        if done == spe:
            scheduler.step()
            epochs_done = epoch + 1
            data_event: dict[str, Any] = {"epoch": epochs_done, "step": step}
            if epochs_done % config.eval_every == 0 or epochs_done == epochs:
                val = evaluate_ranks(model, data, autocast, channels_last, distributed, rank, world)
                accuracies.append(val["test/acc"])
                val.update(accuracy_summary(accuracies))
                final.update(val)
                metrics(step, epochs_done, val)
                data_event.update(val)
            event(
                FitEvent.EPOCH_DONE,
                f"epoch {epochs_done}/{epochs} done",
                data_event,
                key=f"epoch_done:{epochs_done}",
            )
            save_checkpoint((epoch + 1, 0))
        elif stop:
            save_checkpoint((epoch, done))
        if stop and not (done == spe and epochs_done == epochs):
            status = FitOutcome.STOPPED
            event(FitEvent.STOPPED, f"stopped at step {step}", {"step": step, "epoch": epoch + 1})
            break

    if graphed is not None:
        log.info("CUDA graphs: steps by kind %s", graphed.counts)
    summary: FitSummary = {
        "status": status,
        "epochs_completed": epochs_done,
        "steps": step,
        "metrics": dict(final),
        "fit_seconds": time.perf_counter() - started,
        "alpha": float(opt.alpha) if arm != "sgd" else None,
    }
    if weights_out is not None and main and status is FitOutcome.COMPLETED:
        atomic_save(weights_file(model, config, data, final), weights_out)
    if status is FitOutcome.COMPLETED:
        event(FitEvent.FINISHED, f"finished after {step} steps", dict(summary), key="finished")
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


def _autocast(config: TrainConfig, device: torch.device, cache: bool = True):
    if config.precision == "bf16":
        if device.type == "cuda":
            return lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
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


def _graphed_step(
    config: TrainConfig, device, distributed, world, net, base, opt, autocast, batch
) -> GraphedStep | None:
    """The CUDA-graphed step of ``cuda_graphs: true`` (docs/training.md), or None for eager."""
    if not config.cuda_graphs:
        return None
    if device.type != "cuda":
        raise ConfigurationError(f"cuda_graphs: needs a CUDA device (this run trains on {device})")
    if world > 1:
        raise ConfigurationError(
            f"cuda_graphs: single-GPU runs only (this run has {world} DDP ranks); DDP's "
            "all-reduce in every backward is not captured"
        )
    if distributed:
        # A process group of one (Ray Train sets one up even for one worker): DDP still
        # all-reduces through NCCL in every backward, which this capture does not cover.
        log.warning("cuda_graphs: a DDP process group is initialised; training eagerly")
        return None

    def step(x: torch.Tensor, y: torch.Tensor, search: bool):
        return _train_step(net, base, opt, x, y, autocast, search)

    return GraphedStep(step, opt, batch_size=batch, device=device)


def _train_step(net, base, opt, x, y, autocast, search: bool):
    """One optimizer step on (x, y); returns (clean loss, correct count, update finite) as
    device tensors, without waiting for the device."""
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
        grads = [p.grad for g in base.param_groups for p in g["params"] if p.grad is not None]
        finite = all_finite(grads)
        zero_unless_finite_(grads, finite)  # as XSAM does: NaN/inf never reaches the weights
        base.step()
    else:
        opt.step(closure, search_alpha=search)
        finite = opt.last_stats["finite"]
    return first["loss"].float(), first["correct"], finite


def _xsam_stats(opt) -> dict[str, float]:
    s = opt.last_stats
    phi, grad_norm, s_norm, clean, perturbed = torch.stack(
        [
            s[k].to(torch.float32)
            for k in ("phi", "grad_norm", "ascent_grad_norm", "clean_loss", "perturbed_loss")
        ]
    ).tolist()  # one host sync, at a read point
    return {
        "xsam/phi": phi,
        "xsam/alpha": float(s["alpha"]),
        "xsam/grad_norm": grad_norm,
        "xsam/ascent_grad_norm": s_norm,
        "xsam/sharpness": perturbed - clean,
    }


def _report_search(opt, step, epoch, distributed, world, comm, event, metrics) -> None:
    stats = opt.last_stats
    alpha = float(opt.alpha)
    alphas = [float(a) for a in stats.get("probe_alphas", [])]
    # JSON has no NaN: a diverging step's probes (reported before the read that fails the run)
    # become null.
    losses = [v if math.isfinite(v) else None for v in map(float, stats.get("probe_losses", []))]
    event(
        FitEvent.ALPHA_SEARCH,
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
            FitEvent.ALPHA_CHECK,
            f"α agrees on {world} ranks" if consistent else "α differs by rank",
            {"step": step, "alphas": ranks, "consistent": consistent},
            key=f"alpha_check:{step}",
        )
        values["xsam/alpha_rank_spread"] = max(ranks) - min(ranks)
    metrics(step, epoch, values)


def _sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm over the global batch, as on one GPU; same state_dict keys as before."""
    if device.type != "cuda":
        # torch's SyncBatchNorm all-gathers statistics with CUDA kernels only.
        raise ConfigurationError(
            f"sync_batchnorm: needs CUDA devices (this rank trains on {device.type})"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _mix(seed: int, step: int, rank: int) -> int:
    return ((seed * 1_000_003 + step) * 1_009 + rank) % (2**63 - 1)
