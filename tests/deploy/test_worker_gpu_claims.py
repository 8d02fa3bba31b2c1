"""The ray-worker command's GPU claims, run for real (bash and flock) with stand-ins for `python`
(which reports the GPU count) and `ray` (which records what it was given and holds on), so the
`--scale ray-worker=N` behaviour is checked without Docker or GPUs: each replica gets GPUs of its
own, a replica too many is refused, and a dead replica's GPUs are free again."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from compose_file import interpolate, load

FAKE_PYTHON = '#!/bin/sh\necho "$FAKE_GPUS"\n'
# Records its environment's GPU choice and arguments, then holds the inherited locks like
# `ray start --block` does.
FAKE_RAY = (
    "#!/bin/sh\n"
    'echo "${CUDA_VISIBLE_DEVICES-unset}|$*" > "$RECORD.tmp" && mv "$RECORD.tmp" "$RECORD"\n'
    "exec sleep 120\n"
)


@pytest.fixture
def replica(tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in [("python", FAKE_PYTHON), ("ray", FAKE_RAY)]:
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "locks").mkdir()
    secrets = {"POSTGRES_PASSWORD": "x", "XSAM_ADMIN_TOKEN": "x", "XSAM_AGENT_TOKEN": "x"}
    started: list[subprocess.Popen[str]] = []
    count = 0

    def start(
        gpus: int, per_worker: str = "1", extra: str = ""
    ) -> tuple[subprocess.Popen[str], Path]:
        nonlocal count
        count += 1
        variables = {
            **secrets,
            "RAY_AUTH_TOKEN": "x",
            "GPU_LOCKS_DIR": str(tmp_path / "locks"),
            "RAY_GPUS_PER_WORKER": per_worker,
            "RAY_WORKER_EXTRA_ARGS": extra,
        }
        worker = interpolate(load(), variables)["services"]["ray-worker"]
        record = tmp_path / f"record-{count}"
        env = {
            **os.environ,
            **worker["environment"],
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "FAKE_GPUS": str(gpus),
            "RECORD": str(record),
        }
        proc = subprocess.Popen(
            worker["command"], env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        started.append(proc)
        return proc, record

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def recorded(proc: subprocess.Popen[str], record: Path) -> tuple[str, str]:
    """(CUDA_VISIBLE_DEVICES, ray's arguments) once the replica has started `ray`."""
    deadline = time.monotonic() + 20
    while not record.exists():
        assert proc.poll() is None, f"the replica exited: {proc.stderr.read()}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the replica never started ray"
        time.sleep(0.05)
    devices, _, args = record.read_text().strip().partition("|")
    return devices, args


def refused(proc: subprocess.Popen[str]) -> tuple[int, str]:
    return proc.wait(timeout=20), proc.stderr.read()  # type: ignore[union-attr]


def test_each_replica_claims_gpus_of_its_own(replica) -> None:
    first = replica(gpus=2)
    assert recorded(*first)[0] == "0"
    assert recorded(*replica(gpus=2))[0] == "1"
    third, _ = replica(gpus=2)
    code, stderr = refused(third)
    assert code == 1 and "only 0 of this host's 2 are free" in stderr
    # A replica that dies frees its GPU for the next one (the kernel drops its lock).
    os.killpg(first[0].pid, signal.SIGKILL)
    first[0].wait()
    assert recorded(*replica(gpus=2))[0] == "0"


def test_ray_start_gets_the_head_address_and_extra_args(replica) -> None:
    _, args = recorded(*replica(gpus=0, extra='--num-cpus=3 --resources={"node_b":1}'))
    assert args.split() == [
        "start",
        "--block",
        "--disable-usage-stats",
        "--address=ray-head:6379",
        "--num-cpus=3",
        '--resources={"node_b":1}',
    ]


@pytest.mark.parametrize(
    ("gpus", "per_worker", "devices"),
    [
        (0, "1", "unset"),  # a CPU-only host: nothing to claim, Ray finds no GPU
        (4, "all", "unset"),  # one replica takes every GPU of the host
        (4, "2", "0,1"),  # several GPUs per replica
    ],
)
def test_gpus_per_worker(replica, gpus: int, per_worker: str, devices: str) -> None:
    assert recorded(*replica(gpus=gpus, per_worker=per_worker))[0] == devices


def test_a_bad_gpu_count_is_refused(replica) -> None:
    code, stderr = refused(replica(gpus=2, per_worker="two")[0])
    assert code == 2 and "RAY_GPUS_PER_WORKER must be 'all' or a count" in stderr
