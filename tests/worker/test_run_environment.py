"""The run environment a rank records: versions, GPU, host; sent once per attempt and rank."""

from __future__ import annotations

import platform
import socket

import pytest

torch = pytest.importorskip("torch")

from worker.run_environment import describe, record_environment  # noqa: E402


def test_describe_names_the_versions_the_gpu_and_the_host():
    env = describe(rank=1, attempt=2)
    assert env["attempt"] == 2 and env["rank"] == 1
    assert env["host"] == socket.gethostname()
    assert env["python"] == platform.python_version() and env["torch"] == torch.__version__
    assert env["xsam"] and env["ray"]
    if not torch.cuda.is_available():
        assert env["gpu"] is None and env["gpus"] == 0 and env["cuda"] is None


def test_record_sends_one_keyed_event_and_never_raises():
    sent = []

    class Client:
        def ingest_events(self, job_id, lease_token, events):
            sent.append((job_id, lease_token, events))

    record_environment(Client(), 5, "lease", 2, 0)
    [(job_id, lease, [event])] = sent
    assert (job_id, lease, event["type"], event["key"]) == (5, "lease", "environment",
                                                            "environment:2:0")  # fmt: skip
    assert event["data"]["rank"] == 0 and "python" in event["message"]

    class Broken:
        def ingest_events(self, *args):
            raise RuntimeError("service down")

    record_environment(Broken(), 5, "lease", 2, 0)  # logged, not raised
