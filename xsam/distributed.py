"""Process groups and DDP modules, torn down in the one order that cannot deadlock.

A `DistributedDataParallel` module owns a C++ ``Reducer`` that holds a reference to the process
group. If the group is destroyed first (``dist.destroy_process_group()``), the Reducer holds the
*last* reference, and whenever the module is garbage-collected later the Reducer's destructor
runs ``~ProcessGroupGloo`` → ``std::thread::join`` on gloo's worker thread *while holding the
GIL*; that worker thread may itself be waiting for the GIL to drop a Python object
(``~AsyncWork`` → ``~ThreadLocalState``). The process then hangs forever at exit — about one run
in three of a two-rank test. The Python-side references to a group drop it without the GIL, so
the order below is safe:

1. release every DDP module's Reducer (and the Logger that holds it) while the group is alive;
2. collect garbage, so no cycle keeps a Reducer for later;
3. destroy the process group.

Everything in this project that builds a DDP module does it through `wrap_ddp`, and everything
that creates a process group does it through `process_group` (or calls `destroy_process_group`
from here), so no caller has to remember the order. `fit()` releases its own DDP module when it
returns or raises, so Ray Train's own ``destroy_process_group`` at the end of a run also finds
no Reducer alive.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import weakref
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["destroy_process_group", "process_group", "release_ddp", "releases_ddp", "wrap_ddp"]

P = ParamSpec("P")
R = TypeVar("R")

#: Every DDP module `wrap_ddp` built that is still alive (weakly: this keeps none of them).
_LIVE: weakref.WeakSet[nn.parallel.DistributedDataParallel] = weakref.WeakSet()


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model)`` on ``device``, remembered so it can be released.

    DDP broadcasts rank 0's parameters and buffers at construction; every backward through it
    all-reduces the gradients.
    """
    net = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    _LIVE.add(net)
    return net


def release_ddp(*nets: nn.Module) -> None:
    """Drop the Reducer of each DDP module in ``nets`` (all `wrap_ddp` built, if none given).

    The module stays usable as a container of the wrapped model (``net.module``), but can no
    longer run a distributed backward. Safe to call twice and on non-DDP modules.
    """
    targets = list(nets) if nets else list(_LIVE)
    for net in targets:
        if not isinstance(net, nn.parallel.DistributedDataParallel):
            continue
        # The Logger holds a strong reference to the Reducer (the Reducer's to it is weak).
        net.logger = None
        if getattr(net, "reducer", None) is not None:
            net.reducer = None  # type: ignore[assignment]  # (dropped on purpose: see above)
        _LIVE.discard(net)
    gc.collect()


def releases_ddp(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a function so the DDP modules it builds are released when it returns or raises.

    Without this, a raised exception's traceback keeps the function's frame, and with it the DDP
    module, alive past the caller's ``destroy_process_group()``.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        before = set(_LIVE)
        try:
            return fn(*args, **kwargs)
        finally:
            built = set(_LIVE) - before
            if built:
                release_ddp(*built)

    return wrapper


def destroy_process_group() -> None:
    """Release every DDP module, then destroy the default process group (if there is one)."""
    release_ddp()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(
    backend: str,
    *,
    rank: int,
    world_size: int,
    init_method: str | None = None,
    timeout_s: float | None = None,
) -> Iterator[None]:
    """The default process group for the duration of the block, torn down in the safe order.

    ``init_method`` defaults to ``env://`` (MASTER_ADDR / MASTER_PORT), as in
    ``dist.init_process_group``.
    """
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend, rank=rank, world_size=world_size, init_method=init_method, timeout=timeout
    )
    try:
        yield
    finally:
        destroy_process_group()
