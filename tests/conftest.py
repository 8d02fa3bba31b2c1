"""Session-wide test settings. Area fixtures live in tests/<area>/conftest.py."""

from __future__ import annotations

import os

import pytest

# Keep every Ray process the tests start (and their children) on 127.0.0.1: without this Ray
# resolves "127.0.0.1" to the machine's own interface address and talks over it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _one_torch_thread_per_test():
    # Two cores per machine: keep each test's intra-op threads bounded and deterministic.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield
