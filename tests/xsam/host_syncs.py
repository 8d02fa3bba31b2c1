"""Count the places where Python code asks a tensor for a host value (a GPU pipeline stall).

On CUDA each of these waits for the device to finish its queue; on CPU they cost nothing but
are made by the same Python code, so counting them on CPU proves the loop's structure. For a
CUDA run, `torch.cuda.set_sync_debug_mode("error")` is the complementary check (it also sees
syncs made inside C++), e.g. around the steady-state steps of a GPU test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: Tensor methods that hand a value to the host: item(), tolist(), numpy(), and the
#: conversions behind ``if t:``, ``float(t)``, ``int(t)`` and ``range(t)``/indexing.
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


class HostSyncs:
    """A running count of host reads, by method name."""

    def __init__(self) -> None:
        self.by_method: dict[str, int] = dict.fromkeys(HOST_READS, 0)

    @property
    def total(self) -> int:
        return sum(self.by_method.values())


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Patch `torch.Tensor`'s host-read methods to count their calls within the block."""
    counts = HostSyncs()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name, original):
        def method(self, *args, **kwargs):
            counts.by_method[name] += 1
            return original(self, *args, **kwargs)

        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
