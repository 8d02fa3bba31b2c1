"""One training step captured in a CUDA graph and replayed, to take the host off the GPU's path.

An eager ResNet-18 step at batch 125 issues hundreds of small kernels per forward/backward;
on an H100/H200 the host launching them is slower than the GPU running them (wall time ≈ CPU
time, GPU busy ≈ 12 % of the step). `GraphedStep` records one whole step — the closure's
forward/backward passes, XSAM's geometry and the base optimizer's update, or SGD's
forward/backward and update — into a `torch.cuda.CUDAGraph` over static input buffers, and
from then on copies each batch into those buffers and replays the graph: one launch a step.

What the graph bakes in, and so when it is captured again (`CapturePlan`):

- The base optimizer's hyperparameters (``lr`` above all) and XSAM's α are Python floats read
  at capture time. The plan keys the graph on them: a changed ``lr`` (the scheduler's step,
  once an epoch) or α means a new capture before the next replay.
- An α-search step always runs eagerly (it reads the probe losses back to the host to pick
  α) and drops the graph, so the step after a search captures afresh. With one search an
  epoch and a per-epoch LR schedule that is one capture an epoch.
- A batch of another shape (an epoch's short last batch) runs eagerly and keeps the graph.
- Before the first capture, ``warmup`` steps run eagerly on the capture's side stream, as
  torch's CUDA-graph notes ask: they create the optimizer's lazy state (momentum buffers,
  XSAM's scratch buffers, BatchNorm snapshots), let cuDNN benchmark its algorithms and set up
  cuBLAS on that stream. Later captures reuse the same stream, shapes and state.

Every step — eager, warm-up or replay — is a real training step on the caller's batch, so a
graphed run takes the same steps as an eager one; replays run the same kernels on the same
tensors. Data augmentation stays outside the graph (the caller augments, then hands the batch
over). The step's outputs (whatever ``step_fn`` returns: in fit() the clean loss, the correct
count and the finite flag, all device tensors) are the graph's static outputs after a replay:
read them (or add them to device accumulators) before the next step overwrites them. Nothing
in the captured step may read the device back to the host (`float`, `.item()`, ``bool``):
XSAM's step outside a search does not (tests/gpu/test_optim_cuda.py checks it under
``torch.cuda.set_sync_debug_mode("error")``).

Python-side state that a replay does not run: XSAM's ``steps_taken`` (restored after the
capture, then counted once per replay) and ``last_stats`` (the captured step's tensors, which
each replay refills, put back after any eager step replaced them).

Streams: warm-up steps and the capture run on one side stream; before each, it waits for the
current stream, and the current stream waits for it afterwards. Blocks the caching allocator
hands out on the side stream are reused only by later side-stream work, which starts after
that wait, so tensors passed between the streams need no ``record_stream``. Replays run on the
current stream, in order with the caller's copies and accumulators.

Only a single-process CUDA run uses graphs (``TrainConfig.cuda_graphs``; see
docs/training.md): under DDP every backward all-reduces through NCCL, which this capture does
not cover. Autocast must run with ``cache_enabled=False`` inside a capture (torch's CUDA-graph
notes); its cache only saves re-casting a weight used twice in one forward, so the numbers are
the same. Random ops inside the step (dropout) would draw from the graph-safe Philox stream,
which differs from the eager sequence; the models here have none in training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["WARMUP_STEPS", "CaptureError", "CapturePlan", "GraphedStep", "graph_key"]

log = logging.getLogger(__name__)

#: Eager steps on the side stream before the first capture (torch's examples use 3).
WARMUP_STEPS = 3

Action = Literal["eager", "warmup", "capture", "replay"]
#: ``step_fn(x, y, search)``: one training step on (x, y); returns device tensors (or None).
StepFn = Callable[[Tensor, Tensor, bool], Any]


class CaptureError(RuntimeError):
    """Capturing the training step in a CUDA graph failed; train with cuda_graphs: false."""


def graph_key(optimizer: torch.optim.Optimizer, *inputs: Tensor) -> tuple[Hashable, ...]:
    """What a captured step bakes in: every param group's number-valued hyperparameters (lr,
    momentum, weight decay, …), XSAM's α (None for a plain optimizer) and the inputs' shape,
    dtype and strides. A graph may be replayed only while this key is unchanged."""
    groups = tuple(
        tuple(
            sorted(
                (name, value)
                for name, value in group.items()
                if name != "params" and isinstance(value, bool | int | float | str | None)
            )
        )
        for group in optimizer.param_groups
    )
    alpha = getattr(optimizer, "alpha", None)
    shapes = tuple((tuple(t.shape), t.dtype, t.stride()) for t in inputs)
    return (groups, None if alpha is None else float(alpha), shapes)


class CapturePlan:
    """Decides, step by step, whether to run eagerly, warm up, capture or replay.

    Pure bookkeeping, no CUDA: `next` takes the step's `graph_key` and flags and returns the
    action, remembering the key of the graph it asked to capture.
    """

    def __init__(self, warmup: int = WARMUP_STEPS) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup: must be an integer >= 0 (got {warmup!r})")
        self.warmup = warmup
        self.warmed = 0  # warm-up steps taken so far
        self.captured: tuple[Hashable, ...] | None = None  # the key of the live graph

    def next(self, key: tuple[Hashable, ...], *, search: bool, full_batch: bool) -> Action:
        if search:
            # The search reads back to the host and may change α: eager, and a fresh capture
            # after it (even when α stays, which keeps the rule simple).
            self.captured = None
            return "eager"
        if not full_batch:
            return "eager"  # a short last batch: not worth a graph of its own
        if self.warmed < self.warmup:
            self.warmed += 1
            return "warmup"
        if key == self.captured:
            return "replay"
        self.captured = key
        return "capture"

    def forget(self) -> None:
        """Drop the live graph: the next full step captures again."""
        self.captured = None


class GraphedStep:
    """Runs ``step_fn`` eagerly, on the side stream, or as a CUDA-graph replay, as `CapturePlan`
    decides; see the module docstring.

    Args:
        step_fn: ``step_fn(x, y, search)``, one training step; its tensors' outputs must not be
            read back to the host inside it.
        optimizer: the optimizer ``step_fn`` steps (XSAM or the base); its param groups and α
            key the graph.
        batch_size: the full batch; batches of another length run eagerly.
        warmup: eager side-stream steps before the first capture.

    Attributes:
        counts (dict): how many steps ran ``eager``, ``warmup``, ``capture`` (a capture and
            its first replay: one step) and ``replay``.
        last_action (str): the action of the latest step.
    """

    def __init__(
        self,
        step_fn: StepFn,
        optimizer: torch.optim.Optimizer,
        *,
        batch_size: int,
        device: torch.device,
        warmup: int = WARMUP_STEPS,
    ) -> None:
        if device.type != "cuda":
            raise ValueError(f"device: CUDA graphs need a CUDA device (got {device})")
        self._step_fn = step_fn
        self._optimizer = optimizer
        self._batch_size = batch_size
        self._plan = CapturePlan(warmup)
        self._stream = torch.cuda.Stream(device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[Tensor, Tensor] | None = None
        self._outputs: Any = None
        self._stats: dict[str, Any] | None = None
        self.counts = {"eager": 0, "warmup": 0, "capture": 0, "replay": 0}
        self.last_action: Action | None = None

    def step(self, x: Tensor, y: Tensor, search: bool = False) -> Any:
        """One training step on (x, y); returns ``step_fn``'s outputs (static after a replay)."""
        key = graph_key(self._optimizer, x, y)
        action = self._plan.next(key, search=search, full_batch=len(x) == self._batch_size)
        self.last_action = action
        self.counts[action] += 1
        if action == "eager":
            if search:
                self._release()
            return self._step_fn(x, y, search)
        if action == "warmup":
            return self._on_side_stream(x, y)
        if action == "capture":
            self._capture(x, y)
        return self._replay(x, y)

    def forget(self) -> None:
        """Drop the graph; the next full, non-search step captures again."""
        self._plan.forget()
        self._release()

    # -- internals -------------------------------------------------------------------------

    def _release(self) -> None:
        self._graph, self._outputs, self._stats = None, None, None

    def _on_side_stream(self, x: Tensor, y: Tensor) -> Any:
        current = torch.cuda.current_stream()
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            outputs = self._step_fn(x, y, False)
        current.wait_stream(self._stream)
        return outputs

    def _capture(self, x: Tensor, y: Tensor) -> None:
        self._release()  # the old graph's memory pool goes before the new one is drawn
        static = (x.clone(), y.clone())  # clone keeps channels_last strides
        opt = self._optimizer
        steps_taken = getattr(opt, "steps_taken", None)
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream()
        self._stream.wait_stream(current)
        try:
            # Records the kernels without running them: the weights do not move here.
            with torch.cuda.graph(graph, stream=self._stream):
                outputs = self._step_fn(static[0], static[1], False)
        except Exception as exc:
            # torch.cuda.graph leaves its stream current when capture_end raises: put ours back.
            torch.cuda.set_stream(current)
            raise CaptureError(
                f"capturing the training step in a CUDA graph failed ({type(exc).__name__}: "
                f"{exc}); train with cuda_graphs: false"
            ) from exc
        finally:
            if steps_taken is not None:
                # the replays count the steps (an XSAM attribute: `opt` is any Optimizer here)
                opt.steps_taken = steps_taken  # type: ignore[attr-defined]
        current.wait_stream(self._stream)
        self._graph, self._static, self._outputs = graph, static, outputs
        stats = getattr(opt, "last_stats", None)
        self._stats = dict(stats) if isinstance(stats, dict) else None
        log.debug("captured the training step in a CUDA graph (key %s)", self._plan.captured)

    def _replay(self, x: Tensor, y: Tensor) -> Any:
        assert self._graph is not None and self._static is not None
        self._static[0].copy_(x)
        self._static[1].copy_(y)
        self._graph.replay()
        opt = self._optimizer
        if self._stats is not None:
            opt.last_stats = dict(self._stats)  # type: ignore[attr-defined]
        if hasattr(opt, "steps_taken"):
            opt.steps_taken += 1
        return self._outputs
