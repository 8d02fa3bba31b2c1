"""Per-step wall time of SGD, SAM (XSAM with α = 1) and XSAM (dynamic α), and XSAM's own cost.

    python bench/step_time.py                      # 1-D CNN with BatchNorm, MNIST-1D shape
    python bench/step_time.py --model resnet18     # CIFAR-shaped synthetic data
    python bench/step_time.py --optimizer-only     # the optimizer alone, ResNet-18-sized params
    python bench/step_time.py --count-ops          # aten ops one XSAM step issues by itself
    python bench/step_time.py --device cuda        # any of the above on a GPU (skips without)
    python bench/step_time.py --device cuda --model resnet18 --batch 125 512 \
        --precision bf16 --json out.json              # what bench/gpu_check.sh runs

Timing: every arm trains its own copy of the model on the same synthetic batches (batch 125 by
default; several ``--batch`` values run one after the other); the arms run interleaved, one
block of steps each per round, so that a slow spell of a shared machine hits all of them. XSAM
searches α on the first step of each block and the per-step time charges one search per
``--search-every`` steps: ``(t_search + (N − 1)·t_plain) / N``. Ratios are taken within each
round, then the median over rounds is printed (a figure, not a pass/fail test).

On CUDA the defaults are what `fit()` does with a default config: channels_last for image
models, fp32 unless ``--precision bf16`` (fit's ``precision: bf16``), and one search per epoch
(``--search-every epoch``: ⌈epoch size ÷ batch⌉ steps, the epoch being CIFAR's 50 000 images
for image models and MNIST-1D's 4 000 for cnn1d; 400 steps at batch 125). On the CPU the
search period stays 32 steps, as in the figures docs/results.md quotes. On CUDA each arm also
reports its peak memory (``torch.cuda.max_memory_allocated`` over its own blocks; it includes
the other arms' resident weights and optimizer state) and the GPU's busy time ÷ wall time over
``--profile-steps`` steady-state steps under torch.profiler (the union of the CUDA kernels'
intervals; the profiler's own CPU overhead makes this a lower bound when the step is
launch-bound, so the busy time over the unprofiled wall time is reported beside it).

``--cuda-graph`` (CUDA only; fit()'s ``cuda_graphs: true``): each arm's step runs through
`xsam.cuda_graph.GraphedStep`: the same arms, data and search schedule, XSAM's search steps
eagerly, every other step a replay of a captured graph. Each block starts with a fresh capture
(fit() re-captures once an epoch, after the LR step and after the search), so a block is one
capture step (capture + replay), XSAM's eager search step, and replays; the per-step time
charges one capture and (XSAM) one search per ``--search-every`` steps:
``(t_search + t_capture + (N − 2)·t_replay) / N`` for XSAM, ``(t_capture + (N − 1)·t_replay) / N``
for SGD and SAM. The warm-up round holds the graphs' eager warm-up steps. GPU busy ÷ wall is
measured over replays; beside it, the GPU time between CUDA events recorded around each step
(graph replay and input copies) over the wall time, a check that does not depend on the
profiler tracing the kernels inside graph replays.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from xsam.optim import XSAM

try:  # the project's model registry, when present
    from xsam.models import build_model
except ImportError:  # pragma: no cover - only before xsam/models.py existed
    build_model = None


def inline_cnn1d(channels: int = 32) -> nn.Module:
    """Strided Conv1d–BN–ReLU ×3 and a linear head, for (1, 40) inputs and 10 classes."""
    layers: list[nn.Module] = []
    in_ch = 1
    for i in range(3):
        layers += [
            nn.Conv1d(in_ch, channels, 5 if i == 0 else 3, stride=2, padding=2 if i == 0 else 1),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
        ]
        in_ch = channels
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 5, 10))


def make_model(name: str) -> tuple[nn.Module, tuple[int, ...], str]:
    shape = (1, 40) if name == "cnn1d" else (3, 32, 32)
    if build_model is not None:
        return build_model(name, input_shape=shape, num_classes=10), shape, "xsam.models"
    if name == "cnn1d":
        return inline_cnn1d(), shape, "inline (xsam.models not available)"
    raise SystemExit(f"--model {name} needs xsam.models.build_model, which is not available")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_arms(model: nn.Module, args: argparse.Namespace) -> dict[str, tuple[nn.Module, object]]:
    arms = {}
    for name in ("SGD", "SAM", "XSAM"):
        m = copy.deepcopy(model)
        base = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        if name == "SGD":
            opt = base
        else:
            alpha = 1.0 if name == "SAM" else "dynamic"
            opt = XSAM(m.parameters(), base, rho=0.15, alpha=alpha, model=m)
        arms[name] = (m, opt)
    return arms


def one_step(
    name: str, model: nn.Module, opt, x, y, search: bool, autocast=None, set_to_none: bool = True
) -> None:
    def closure(backward: bool = True):
        # A captured graph needs the same .grad tensors every step: zero them in place (fit()
        # always does).
        opt.zero_grad(set_to_none=set_to_none)
        with autocast() if autocast is not None else contextlib.nullcontext():
            loss = nn.functional.cross_entropy(model(x), y)
        if backward:
            loss.backward()
        return loss

    if name == "SGD":
        closure()
        opt.step()
    else:
        opt.step(closure, search_alpha=search)


#: Training-set size that "one epoch" stands for, per model's data shape (see the docstring).
EPOCH_SIZE = {"cnn1d": 4000, "resnet18": 50_000}


def search_period(args: argparse.Namespace, batch: int) -> int:
    if args.search_every == "epoch":
        return math.ceil(EPOCH_SIZE[args.model] / batch)
    return args.search_every


def gpu_busy(spans: list[tuple[float, float]], wall_s: float) -> dict[str, float]:
    """Busy time of the GPU from its kernels' ``(start µs, end µs)``: the union of the intervals
    (overlapping kernels count once) and their plain sum, over ``wall_s``."""
    union, total, reach = 0.0, 0.0, -math.inf
    for start, end in sorted(spans):
        total += end - start
        if end > reach:
            union += end - max(start, reach)
            reach = end
    return {"busy_s": union / 1e6, "kernel_sum_s": total / 1e6, "wall_s": wall_s}


#: Chrome-trace categories of work on the GPU (kineto's names).
GPU_TRACE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def gpu_spans(prof) -> list[tuple[float, float]]:
    """The GPU's kernel, memcpy and memset intervals in µs, read from the profiler's Chrome
    trace (kineto's own output, stable across torch versions), else from its events."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    spans = [
        (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in GPU_TRACE_CATEGORIES and e.get("dur", 0) > 0
    ]
    if spans:
        return spans
    return [
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start
    ]


def time_training(args: argparse.Namespace, device: torch.device, batch: int) -> dict:
    model, shape, source = make_model(args.model)
    model.to(device).train()
    # As fit() does: channels_last for 4-D image batches on CUDA, bf16 autocast on CUDA only.
    channels_last = args.channels_last
    if channels_last is None:
        channels_last = device.type == "cuda" and len(shape) == 3
    if channels_last and len(shape) != 3:
        raise SystemExit(f"--channels-last needs an image model; {args.model} takes {shape}")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    autocast = None
    if args.precision == "bf16":
        if device.type == "cuda":
            # No autocast weight cache inside a graph capture (same numbers; as fit() does).
            cache = not args.cuda_graph
            autocast = lambda: torch.autocast(  # noqa: E731
                "cuda", dtype=torch.bfloat16, cache_enabled=cache
            )
        else:
            print("--precision bf16 applies on CUDA only (as in fit()); timing fp32")
    precision = "bf16" if autocast is not None else "fp32"
    every = search_period(args, batch)
    block = min(args.block, every)
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(8):
        x = torch.randn(batch, *shape, generator=gen).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        data.append((x, torch.randint(0, 10, (batch,), generator=gen).to(device)))
    arms = make_arms(model, args)
    graphs = make_graphs(arms, args, device, batch, autocast) if args.cuda_graph else {}

    def step(name: str, x, y, search: bool) -> None:
        if graphs:
            graphs[name].step(x, y, search)
        else:
            m, opt = arms[name]
            one_step(name, m, opt, x, y, search, autocast=autocast)

    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = sum(1 for _ in model.parameters())
    layout = "channels_last" if channels_last else "contiguous (NCHW)"
    print(
        f"model: {args.model} from {source}, {n_params:,} parameters in {n_tensors} tensors; "
        f"batch {batch}, input {shape}, device {device}, {layout}, {precision}"
    )
    print(
        f"rounds: {args.rounds} (+{args.warmup_rounds} warm-up), block: {block} steps per arm "
        f"per round, XSAM searches once per {every} steps"
        + (" (one epoch)" if args.search_every == "epoch" else "")
        + (
            "; CUDA graphs: one capture per block, other non-search steps replayed"
            if graphs
            else ""
        )
    )
    cuda = device.type == "cuda"
    peak = {name: 0 for name in arms}
    working = {name: 0 for name in arms}

    def run_block(name: str) -> dict[str, list]:
        times: dict[str, list] = {"wall": [], "cpu": [], "action": []}
        if graphs:
            graphs[name].forget()  # fit() re-captures once an epoch (the LR step)
        if cuda:
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        for i in range(block):
            x, y = data[i % len(data)]
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step(name, x, y, search=name == "XSAM" and i == 0)
            sync(device)
            times["wall"].append(time.perf_counter() - t0)
            times["cpu"].append(time.process_time() - c0)
            times["action"].append(graphs[name].last_action if graphs else "eager")
        if cuda:
            top = torch.cuda.max_memory_allocated(device)
            peak[name] = max(peak[name], top)
            working[name] = max(working[name], top - before)
        return times

    clocks = ("wall", "cpu")
    per_step = {c: {name: [] for name in arms} for c in clocks}
    ratios = {c: {"SAM/SGD": [], "XSAM/SGD": [], "XSAM/SAM": []} for c in clocks}
    search_times: list[float] = []
    capture_times: dict[str, list[float]] = {name: [] for name in arms}
    replay_times: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for r in range(args.warmup_rounds + args.rounds):
        order = names[r % 3 :] + names[: r % 3]  # rotate who goes first
        got = {name: run_block(name) for name in order}
        if r < args.warmup_rounds:
            continue
        search_times.append(got["XSAM"]["wall"][0])
        for name in names if graphs else ():
            capture_times[name].append(step_times(got[name], "wall", "capture")[0])
            replay_times[name].append(statistics.fmean(step_times(got[name], "wall", "replay")))
        for c in clocks:
            if graphs:
                t = graphed_per_step(got, c, every)
            else:
                t = {name: statistics.fmean(got[name][c]) for name in ("SGD", "SAM")}
                xs = got["XSAM"][c]
                plain = statistics.fmean(xs[1:]) if len(xs) > 1 else t["SAM"]
                t["XSAM"] = (xs[0] + (every - 1) * plain) / every
            for name in names:
                per_step[c][name].append(t[name])
            ratios[c]["SAM/SGD"].append(t["SAM"] / t["SGD"])
            ratios[c]["XSAM/SGD"].append(t["XSAM"] / t["SGD"])
            ratios[c]["XSAM/SAM"].append(t["XSAM"] / t["SAM"])

    median_wall = {name: statistics.median(per_step["wall"][name]) for name in names}
    if graphs:  # the profiled steps are replays: compare with the replays' own wall time
        median_wall = {name: statistics.median(replay_times[name]) for name in names}
    busy = profile_arms(args, device, step, list(arms), data, median_wall) if cuda else {}

    print()
    print("| arm | median wall ms/step | images/s | median CPU ms/step | peak MiB | GPU busy |")
    print("|---|---|---|---|---|---|")
    result_arms = {}
    for name in names:
        wall, cpu = (1e3 * statistics.median(per_step[c][name]) for c in clocks)
        row = {
            "ms_per_step": wall,
            "images_per_s": batch / (wall / 1e3),
            "cpu_ms_per_step": cpu,
            "peak_mib": peak[name] / 2**20 if cuda else None,
            "step_mib": working[name] / 2**20 if cuda else None,
            **busy.get(name, {}),
        }
        if graphs:
            row["replay_ms_per_step"] = 1e3 * statistics.median(replay_times[name])
            row["capture_ms"] = 1e3 * statistics.median(capture_times[name])
            row["steps_by_kind"] = dict(graphs[name].counts)
        result_arms[name] = row
        mem = f"{row['peak_mib']:.0f}" if cuda else "n/a"
        util = f"{100 * row['gpu_busy_fraction']:.1f} %" if "gpu_busy_fraction" in row else "n/a"
        print(f"| {name} | {wall:.2f} | {row['images_per_s']:.0f} | {cpu:.2f} | {mem} | {util} |")
    search_ms = 1e3 * statistics.median(search_times)
    print(f"| (XSAM search step alone) | {search_ms:.2f} | | | | |")
    if graphs:
        print()
        print(
            "| arm (CUDA graphs) | replay wall ms/step | capture step ms | GPU time (events) ÷ wall |"
        )
        print("|---|---|---|---|")
        for name in names:
            row = result_arms[name]
            ev = row.get("gpu_event_fraction")
            ev_text = "n/a" if ev is None else f"{100 * ev:.1f} %"
            print(
                f"| {name} | {row['replay_ms_per_step']:.2f} | {row['capture_ms']:.1f} | "
                f"{ev_text} |"
            )
    print()
    print("| ratio | wall: median over rounds (min–max) | CPU time: median (min–max) |")
    print("|---|---|---|")
    for key in ratios["wall"]:
        cells = [
            f"{statistics.median(v):.3f} ({min(v):.2f}–{max(v):.2f})"
            for v in (ratios[c][key] for c in clocks)
        ]
        print(f"| {key} | {cells[0]} | {cells[1]} |")
    print()
    return {
        "model": args.model,
        "batch": batch,
        "input_shape": list(shape),
        "parameters": n_params,
        "channels_last": channels_last,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "precision": precision,
        "search_every": every,
        "cuda_graph": bool(graphs),
        "rounds": args.rounds,
        "block": block,
        "arms": result_arms,
        "search_step_ms": search_ms,
        "ratios": {
            key: {
                "median": statistics.median(v),
                "min": min(v),
                "max": max(v),
                "cpu_median": statistics.median(ratios["cpu"][key]),
            }
            for key, v in ratios["wall"].items()
        },
    }


def make_graphs(arms, args, device, batch: int, autocast) -> dict:
    """A `GraphedStep` per arm, stepping the arm's model and optimizer as `one_step` does."""
    from xsam.cuda_graph import WARMUP_STEPS, GraphedStep

    if args.warmup_rounds < 1 or min(args.block, search_period(args, batch)) < WARMUP_STEPS + 3:
        raise SystemExit(
            f"--cuda-graph needs --warmup-rounds >= 1 and blocks of >= {WARMUP_STEPS + 3} steps "
            "(the graphs' warm-up and first capture happen in the warm-up round)"
        )
    graphs = {}
    for name, (m, opt) in arms.items():

        def step_fn(x, y, search, name=name, m=m, opt=opt):
            one_step(name, m, opt, x, y, search, autocast=autocast, set_to_none=False)

        graphs[name] = GraphedStep(step_fn, opt, batch_size=batch, device=device)
    return graphs


def step_times(got: dict[str, list], clock: str, action: str) -> list[float]:
    """The ``clock`` times of a block's steps that ran as ``action``; fails loudly if none did."""
    picked = [t for t, a in zip(got[clock], got["action"], strict=True) if a == action]
    if not picked:
        raise SystemExit(f"FAILED: no {action} step in a timed block (actions: {got['action']})")
    return picked


def graphed_per_step(got: dict[str, dict[str, list]], clock: str, every: int) -> dict[str, float]:
    """Per-step time of each arm with CUDA graphs: one capture per ``every`` steps, and for
    XSAM one eager search; every other step a replay."""
    out = {}
    for name, block in got.items():
        captures = step_times(block, clock, "capture")
        if len(captures) != 1:
            raise SystemExit(f"FAILED: {name}: {len(captures)} captures in one block, expected 1")
        replay = statistics.fmean(step_times(block, clock, "replay"))
        if name == "XSAM":
            search = step_times(block, clock, "eager")[0]
            out[name] = (search + captures[0] + (every - 2) * replay) / every
        else:
            out[name] = (captures[0] + (every - 1) * replay) / every
    return out


def profile_arms(args, device, step, names, data, median_wall) -> dict[str, dict[str, float]]:
    """GPU busy ÷ wall per arm over ``--profile-steps`` steady-state steps (no α search)."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name in names:
        n = args.profile_steps
        if n < 1:
            continue
        sync(device)
        try:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                for i in range(n):
                    x, y = data[i % len(data)]
                    step(name, x, y, search=False)
                sync(device)
                wall = time.perf_counter() - t0
            got = gpu_busy(gpu_spans(prof), wall)
        except Exception as exc:  # no profiler here must not cost the timings above
            print(f"{name}: torch.profiler failed, no GPU busy figure: {exc!r}")
            out[name] = {"gpu_busy_error": repr(exc)}
            continue
        out[name] = {
            "gpu_busy_fraction": got["busy_s"] / wall,
            "gpu_kernel_sum_fraction": got["kernel_sum_s"] / wall,
            # The same busy time over the unprofiled wall time: free of the profiler's overhead.
            "gpu_busy_fraction_unprofiled_wall": got["busy_s"] / (n * median_wall[name]),
            "profiled_steps": n,
        }
        if args.cuda_graph:
            try:
                out[name]["gpu_event_fraction"] = event_busy(device, step, name, data, n)
            except Exception as exc:  # a figure beside the others: never at their cost
                print(f"{name}: CUDA-event timing failed: {exc!r}")
                out[name]["gpu_event_error"] = repr(exc)
    return out


def event_busy(device, step, name: str, data, n: int) -> float:
    """GPU time between CUDA events recorded around each of ``n`` steps, over their wall time.

    With graph replays there are no launch gaps inside a step, so this is the GPU's busy share
    without relying on the profiler to trace kernels inside graph replays.
    """
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    sync(device)
    t0 = time.perf_counter()
    for i in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        x, y = data[i % len(data)]
        start.record()
        step(name, x, y, search=False)
        end.record()
        events.append((start, end))
    sync(device)
    wall = time.perf_counter() - t0
    return sum(s.elapsed_time(e) for s, e in events) / 1e3 / wall


def resnet18_shapes(num_classes: int = 10) -> list[tuple[int, ...]]:
    """The 62 parameter shapes of a CIFAR ResNet-18 (11.17 M parameters)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 3, 3), (64,), (64,)]
    in_ch = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first = block == 0
            shapes += [(width, in_ch if first else width, 3, 3), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            if first and (stride != 1 or in_ch != width):
                shapes += [(width, in_ch, 1, 1), (width,), (width,)]
        in_ch = width
    return [*shapes, (num_classes, 512), (num_classes,)]


def fake_training(device: torch.device, foreach: bool | None, alpha, seed: int = 0):
    """Parameters of ResNet-18's shapes, and a closure that only copies stored gradients in."""
    gen = torch.Generator().manual_seed(seed)
    params = [
        nn.Parameter(torch.randn(s, generator=gen).to(device) * 0.05) for s in resnet18_shapes()
    ]
    stored = [
        [torch.randn(s, generator=gen).to(device) * 1e-3 for s in resnet18_shapes()]
        for _ in range(2)
    ]
    for p in params:
        p.grad = torch.zeros_like(p)
    base = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt = XSAM(params, base, rho=0.15, alpha=alpha, foreach=foreach) if alpha is not None else base
    calls = [0]

    def closure(backward: bool = True) -> torch.Tensor:
        if backward:  # alternate between two gradients so that φ is not 0
            torch._foreach_copy_([p.grad for p in params], stored[calls[0] % 2])
            calls[0] += 1
        return torch.zeros((), device=device)

    return params, base, opt, closure


def time_optimizer(args: argparse.Namespace, device: torch.device) -> None:
    params, _, sgd, copy_grads = fake_training(device, None, None)
    n = sum(p.numel() for p in params)
    print(f"ResNet-18-sized parameters: {n:,} in {len(params)} tensors, device {device}")
    calls: dict[str, Callable[[], object]] = {
        "copy": copy_grads,
        "sgd": lambda: (copy_grads(), sgd.step()),
    }
    for foreach in (True, False):
        for alpha in (1.0, "dynamic"):
            _, _, opt, closure = fake_training(device, foreach, alpha)
            calls[f"XSAM α={alpha} foreach={foreach}"] = lambda o=opt, c=closure: o.step(c)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(args.repeats + 1):  # interleaved; the first round warms up
        for name, call in calls.items():
            sync(device)
            t0 = time.perf_counter()
            call()
            sync(device)
            if r:
                times[name].append(time.perf_counter() - t0)
    t = {name: statistics.median(v) for name, v in times.items()}
    base_step = t["sgd"] - t["copy"]
    print()
    print("| what | median ms | × SGD base step |")
    print("|---|---|---|")
    print(f"| gradient copy (the fake backward) | {1e3 * t['copy']:.2f} | |")
    print(f"| SGD base step (momentum, weight decay) | {1e3 * base_step:.2f} | 1.00 |")
    for name in list(calls)[2:]:
        own = t[name] - 2 * t["copy"] - base_step  # k + 1 = 2 fake backwards
        print(f"| {name}: own work | {1e3 * own:.2f} | {own / base_step:.2f} |")
    _, _, opt, closure = fake_training(device, None, "dynamic")
    opt.step(closure)
    scratch = sum(t.numel() * t.element_size() for t in opt._theta0 + opt._disp)
    momentum = sum(
        st["momentum_buffer"].numel() * st["momentum_buffer"].element_size()
        for st in opt.state.values()
    )
    print()
    print(
        f"memory beyond the base optimizer: {scratch / 2**20:.1f} MiB "
        f"({scratch / (n * params[0].element_size()):.0f}× the parameters: θ₀ and the "
        f"displacement); the base's momentum: {momentum / 2**20:.1f} MiB"
    )


def count_ops(args: argparse.Namespace, device: torch.device) -> None:
    """Top-level aten ops of XSAM's own work in one step (closures and the base step excluded)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for search in (False, True):
        _, _, opt, closure = fake_training(device, None, "dynamic")

        def marked(backward: bool = True, closure=closure):
            with record_function("closure"):
                return closure(backward)

        opt.step(marked)  # allocate the scratch buffers outside the profile
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            opt.step(marked, search_alpha=search)
        excluded = ("closure", "Optimizer.step#SGD.step", "Optimizer.zero_grad")
        counts: dict[str, int] = {}
        for event in prof.events():
            if not event.name.startswith("aten::"):
                continue
            parent, top, skip = event.cpu_parent, True, False
            while parent is not None:
                if parent.name.startswith("aten::"):
                    top = False
                if any(parent.name.startswith(e) for e in excluded):
                    skip = True
                parent = parent.cpu_parent
            if top and not skip:
                counts[event.name] = counts.get(event.name, 0) + 1
        foreach = {k: v for k, v in counts.items() if k.startswith("aten::_foreach_")}
        other = {k: v for k, v in counts.items() if k not in foreach}
        kernels = ""
        if device.type == "cuda":
            n_kernels = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
            kernels = (
                f"; CUDA kernels in the whole step (closures and base step included): {n_kernels}"
            )
        print(
            f"XSAM step, k=1, {'with' if search else 'without'} α search "
            f"(grid of {len(opt.alpha_grid)}): {sum(foreach.values())} foreach ops, "
            f"{sum(other.values())} other aten ops (0-dim scalar math, stack, ...){kernels}"
        )
        print("  foreach: " + ", ".join(f"{k[6:]}×{v}" for k, v in sorted(foreach.items())))
        print("  other:   " + ", ".join(f"{k[6:]}×{v}" for k, v in sorted(other.items())))


def search_every_arg(text: str) -> int | str:
    if text == "epoch":
        return text
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 'epoch' or a step count >= 1 (got {text})")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn1d", choices=["cnn1d", "resnet18"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[125], help="batch size(s), timed in turn"
    )
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (median over them)")
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--block", type=int, default=32, help="steps per arm per round")
    parser.add_argument(
        "--search-every",
        type=search_every_arg,
        default=None,
        help="XSAM's search period: 'epoch' or a step count (default: epoch on CUDA, 32 on CPU)",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last weights and inputs (default: on for image models on CUDA, as fit())",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16 = autocast to bfloat16 on CUDA (fit()'s precision: bf16); default fp32",
    )
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="torch.backends.cudnn.benchmark = True (TrainConfig's cudnn_benchmark: true)",
    )
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=8,
        help="CUDA: steps per arm under torch.profiler for GPU busy ÷ wall (0: skip)",
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="CUDA: replay each arm's non-search steps from a captured CUDA graph "
        "(fit()'s cuda_graphs: true); search steps stay eager",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures here as JSON")
    parser.add_argument("--repeats", type=int, default=20, help="for --optimizer-only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--optimizer-only", action="store_true")
    parser.add_argument("--count-ops", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.cuda_graph and device.type != "cuda":
        parser.error("--cuda-graph needs --device cuda")
    if args.cuda_graph and (args.optimizer_only or args.count_ops):
        parser.error("--cuda-graph times training steps: not with --optimizer-only/--count-ops")
    if args.search_every is None:
        args.search_every = "epoch" if device.type == "cuda" else 32
    if args.block < 1:
        parser.error("--block must be >= 1")
    if isinstance(args.search_every, int) and args.block > args.search_every:
        parser.error("--block must be in [1, --search-every]")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine; skipping.")
        if args.json:
            write_json(args.json, {"skipped": "CUDA is not available on this machine"})
        return
    torch.set_num_threads(args.threads)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    machine = (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs{f', {gpu}' if gpu else ''}"
    )
    print(f"machine: {machine}; torch {torch.__version__}, {args.threads} thread(s)")
    if args.count_ops:
        count_ops(args, device)
    elif args.optimizer_only:
        time_optimizer(args, device)
    else:
        runs: list[dict] = []
        for batch in args.batch:
            runs.append(time_training(args, device, batch))
            if args.json:  # after every batch size: a later failure keeps the earlier figures
                write_json(
                    args.json,
                    {
                        "machine": machine,
                        "device": str(device),
                        "gpu": gpu,
                        "torch": torch.__version__,
                        "cuda": torch.version.cuda,
                        "threads": args.threads,
                        "runs": runs,
                    },
                )


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
