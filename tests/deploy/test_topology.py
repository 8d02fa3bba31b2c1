"""The compose topology without Docker: the very command strings of docker-compose.yml's services,
interpolated with loopback values and free ports, run as processes on this machine.

A fresh database on the local PostgreSQL stands in for the `postgres` service; then `migrate`,
`api`, `ray-head` (Ray head + agent) and one `ray-worker` (a second Ray node, tagged with the
resource ``node_b``) start exactly as compose would start them, and a 2-rank DDP job submitted
through the API must succeed with one rank on each node. Each node offers one CPU and each rank
asks for one, so the placement is forced without touching the agent; the GCS actor table (what
`ray list actors` reads) then shows on which node each RayTrainWorker ran.

Everything started here runs in a session of its own and is killed by session at the end, with
the database dropped, whatever happened (never `ray stop`: it would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from compose_file import API_DOCKERFILE, REPO, dockerfile_instructions, interpolate, load

# Starting the topology (a PostgreSQL cluster, two Ray nodes, API, agent) takes ~30 s; the job
# ~50 s on an idle 2-core machine. 300 s leaves room for a loaded one, not for a hang.
pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.ray, pytest.mark.timeout(300)]

PG_HOST = os.environ.get("XSAM_TEST_PG_HOST", "127.0.0.1")
PG_ADMIN = f"host={PG_HOST} port=5432 user=postgres dbname=postgres"
BIN = Path(sys.executable).parent  # the venv's xsam, ray and alembic

JOB = {
    "name": "topology-ddp",
    "config": {
        "model": {"name": "cnn1d"},
        "data": {"name": "mnist1d", "num_train": 400, "batch_size": 50, "augment": False},
        "optimizer": {"name": "xsam"},
        "schedule": {"epochs": 2, "lr_schedule": "constant"},
        "resources": {"num_workers": 2, "cpus_per_worker": 1, "use_gpu": False},
        "log_every": 2,
    },
}

# A Ray driver that reads the cluster's nodes and its actor table from the GCS (ray.util.state
# needs the dashboard of ray[default], which the `agent` extra does not install).
PROBE = r"""
import json, sys
import ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = [{"id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()]
actors = [
    {"class": a["ActorClassName"], "state": a["State"], "node": a["Address"]["NodeID"]}
    for a in state.actors().values()
]
print("PROBE " + json.dumps({"nodes": nodes, "actors": actors}))
"""


# Services of the API image run with torch and ray unimportable, as they are in that image.
API_IMAGE_SITECUSTOMIZE = """
import sys


class NotInTheApiImage:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "ray"):
            raise ModuleNotFoundError(f"No module named {name!r} (the API image has none)")
        return None


sys.meta_path.insert(0, NotInTheApiImage())
"""


def pg_unavailable() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def pg_exec(statement: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(statement)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def session_members(sids: set[int]) -> list[int]:
    """Processes whose session is one of `sids` (ours: each service was started in its own)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields after "(comm)": state ppid pgrp session …; a zombie is dead already
        if int(fields[3]) in sids and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def kill_sessions(sids: set[int], grace: float = 15.0) -> None:
    for sig, wait in [(signal.SIGTERM, grace), (signal.SIGKILL, 5.0)]:
        pids = session_members(sids)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while session_members(sids) and time.monotonic() < deadline:
            time.sleep(0.2)


class Topology:
    """The compose services as processes: `run(service)` starts one with compose's command and
    environment, interpolated with `variables`."""

    def __init__(self, root: Path, variables: dict[str, str]) -> None:
        self.root = root
        self.variables = variables
        self.compose = interpolate(load(), variables)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def service(self, name: str) -> dict[str, Any]:
        return self.compose["services"][name]

    def env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "XSAM_"))}
        env.update({k: str(v) for k, v in (self.service(name).get("environment") or {}).items()})
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        if self.service(name).get("build", {}).get("dockerfile") == "docker/api.Dockerfile":
            site = self.root / "api-image-site"
            site.mkdir(exist_ok=True)
            (site / "sitecustomize.py").write_text(API_IMAGE_SITECUSTOMIZE)
            env["PYTHONPATH"] = str(site)
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        return env

    def argv(self, name: str) -> list[str]:
        command = self.service(name)["command"]
        assert isinstance(command, list), f"{name}: keep the command in list form"
        return command

    def run(self, name: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        log = self.logs[name] = self.root / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                self.argv(name),
                env=self.env(name),
                cwd=cwd or self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.processes[name] = proc
        return proc

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.logs.get(name)
        text = path.read_text(errors="replace") if path and path.exists() else "(no log)"
        return f"--- {name} (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])

    def diagnostics(self) -> str:
        return "\n".join(self.tail(name) for name in self.logs)

    def alive(self, name: str) -> None:
        code = self.processes[name].poll()
        assert code is None, f"{name} exited with {code}\n{self.diagnostics()}"

    def wait_for(self, what: str, ready, timeout: float, watch: tuple[str, ...] = ()) -> Any:
        """Poll `ready()` until it returns a true value, failing if a watched service exits."""
        deadline = time.monotonic() + timeout
        while True:
            for name in watch:
                self.alive(name)
            with contextlib.suppress(Exception):
                result = ready()
                if result:
                    return result
            assert time.monotonic() < deadline, (
                f"timed out waiting for {what}\n{self.diagnostics()}"
            )
            time.sleep(1.0)

    def probe(self) -> dict[str, Any]:
        head = f"127.0.0.1:{self.variables['RAY_HEAD_PORT']}"
        out = subprocess.run(
            [sys.executable, "-c", PROBE, head],
            env=self.env("ray-head"),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        line = next((x for x in out.stdout.splitlines() if x.startswith("PROBE ")), None)
        assert line, f"the Ray probe failed: {out.stderr[-3000:]}"
        return json.loads(line.removeprefix("PROBE "))

    def stop(self) -> None:
        kill_sessions({proc.pid for proc in self.processes.values()})
        for proc in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


@pytest.fixture
def topology() -> Iterator[Topology]:
    why = pg_unavailable()
    if why and os.environ.get("XSAM_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required (XSAM_REQUIRE_POSTGRES=1) but unreachable: {why}")
    if why:
        pytest.skip(f"PostgreSQL unreachable at {PG_HOST}:5432: {why}")
    # Short: Ray's unix sockets live under the temp dirs (paths are limited to 107 bytes).
    root = Path(tempfile.mkdtemp(prefix="xt", dir="/tmp"))
    database = f"xsam_topo_{secrets.token_hex(6)}"
    api_port, gcs_port, dashboard_port, head_agent_port, worker_agent_port = free_ports(5)
    for volume in ("data", "checkpoints", "artifacts", "state", "locks"):
        (root / volume).mkdir()
    common = "--num-cpus=1 --object-store-memory=100000000 --min-worker-port=0 --max-worker-port=0"
    variables = {
        # .env's secrets (PostgreSQL trusts local connections, so its password is never checked)
        "POSTGRES_PASSWORD": secrets.token_hex(16),
        "XSAM_ADMIN_TOKEN": secrets.token_hex(32),
        "XSAM_AGENT_TOKEN": secrets.token_hex(32),
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # the wiring, on loopback
        "POSTGRES_USER": "postgres",
        "POSTGRES_DB": database,
        "POSTGRES_HOST": PG_HOST,
        "POSTGRES_PORT": "5432",
        "XSAM_API_HOST": "127.0.0.1",
        "XSAM_API_PORT": str(api_port),
        "XSAM_API_URL": f"http://127.0.0.1:{api_port}",
        "RAY_HEAD_HOST": "127.0.0.1",
        "RAY_HEAD_PORT": str(gcs_port),
        "RAY_DASHBOARD_PORT": str(dashboard_port),
        "API_STATE_DIR": str(root / "state"),
        "DATASETS_DIR": str(root / "data"),
        "CHECKPOINTS_DIR": str(root / "checkpoints"),
        "ARTIFACTS_DIR": str(root / "artifacts"),
        "GPU_LOCKS_DIR": str(root / "locks"),
        # one CPU per node, own temp dir and agent port per node; the second node is tagged
        "RAY_HEAD_EXTRA_ARGS": (
            f"{common} --temp-dir={root}/rh --dashboard-agent-listen-port={head_agent_port}"
        ),
        "RAY_WORKER_EXTRA_ARGS": (
            f"{common} --temp-dir={root}/rw --dashboard-agent-listen-port={worker_agent_port}"
            ' --resources={"node_b":1}'
        ),
    }
    pg_exec(f"CREATE DATABASE {database}")
    topo = Topology(root, variables)
    try:
        yield topo
    finally:
        topo.stop()
        with contextlib.suppress(Exception):
            pg_exec(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        if (
            os.environ.get("XSAM_KEEP_TOPOLOGY") == "1"
        ):  # the logs, Ray's included, for a post-mortem
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def test_compose_services_run_a_ddp_job_across_two_nodes(topology: Topology) -> None:
    v = topology.variables
    api = v["XSAM_API_URL"]

    # migrate: the one-shot step must finish successfully (compose's service_completed_successfully)
    migrate = topology.run("migrate", cwd=REPO)  # alembic.ini lies in the repository root
    code = migrate.wait(timeout=180)
    assert code == 0, f"migrate exited with {code}\n{topology.diagnostics()}"

    # api: healthy when /healthz answers (the image's HEALTHCHECK)
    topology.run("api")
    topology.wait_for(
        "the API's /healthz",
        lambda: httpx.get(f"{api}/healthz", timeout=2).status_code == 200,
        timeout=90,
        watch=("api",),
    )

    # the API image's HEALTHCHECK command passes against it too
    healthcheck_args = next(
        args
        for word, args in dockerfile_instructions(API_DOCKERFILE.read_text())
        if word == "HEALTHCHECK"
    )
    image_healthcheck = json.loads(healthcheck_args[healthcheck_args.index("CMD [") + 4 :])
    checked = subprocess.run(
        image_healthcheck, env=topology.env("api"), capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, f"the api image's HEALTHCHECK fails: {checked.stderr}"

    # ray-head: the Ray head, then the agent in the same process (exec); healthy by the compose
    # healthcheck itself, which must pass with Ray's token authentication on
    topology.run("ray-head")
    healthcheck = topology.service("ray-head")["healthcheck"]["test"][1:]  # drop "CMD"
    topology.wait_for(
        "ray-head's healthcheck",
        lambda: (
            subprocess.run(
                healthcheck, env=topology.env("ray-head"), capture_output=True, timeout=30
            ).returncode
            == 0
        ),
        timeout=180,
        watch=("ray-head",),
    )

    # Ray's token authentication is on: the same healthcheck with another token is refused
    wrong = {**topology.env("ray-head"), "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    refused = subprocess.run(healthcheck, env=wrong, capture_output=True, timeout=60)
    assert refused.returncode != 0, "the Ray head accepted a wrong token"

    # ray-worker: a second node joins
    topology.run("ray-worker")
    nodes = topology.wait_for(
        "two live Ray nodes",
        lambda: (n := [x for x in topology.probe()["nodes"] if x["alive"]]) and len(n) == 2 and n,
        timeout=180,
        watch=("ray-head", "ray-worker"),
    )
    node_b = next(n["id"] for n in nodes if "node_b" in n["resources"])
    head = next(n["id"] for n in nodes if n["id"] != node_b)

    # the agent is up and polling: a 2-rank DDP job submitted through the API succeeds
    auth = {"Authorization": f"Bearer {v['XSAM_ADMIN_TOKEN']}"}
    with httpx.Client(base_url=api, headers=auth, timeout=30) as client:
        created = client.post("/v1/jobs", json=JOB)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        job = topology.wait_for(
            f"job {job_id} to end",
            lambda: (
                (j := client.get(f"/v1/jobs/{job_id}").json())["status"]
                in ("succeeded", "failed", "cancelled")
                and j
            ),
            timeout=480,
            watch=("api", "ray-head", "ray-worker"),
        )
        events = client.get(f"/v1/jobs/{job_id}/events").json()["items"]
        assert job["status"] == "succeeded", (
            f"job ended {job['status']}: {job.get('error')}\nevents: "
            f"{[(e['type'], e['message']) for e in events]}\n{topology.diagnostics()}"
        )
        # rank 0 wrote the weights into the artifacts volume, which the API serves
        model = client.get(f"/v1/jobs/{job_id}/artifacts/model")
        assert model.status_code == 200 and len(model.content) > 0, model.text[:500]

    # one rank on each node: the job's RayTrainWorker actors ran on the head and on node_b
    workers = [a for a in topology.probe()["actors"] if a["class"] == "RayTrainWorker"]
    # (a retried attempt adds two more; one CPU per node still forces one rank on each)
    assert len(workers) >= 2, workers
    assert {w["node"] for w in workers} == {head, node_b}, (
        workers,
        {"head": head, "node_b": node_b},
    )

    # the smoke test that the README's Deploy section gives users passes against this deployment
    smoke = subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "smoke_test.sh"),
            "--cpu",
            "--url",
            api,
            "--timeout",
            "300",
        ],
        env={**os.environ, "XSAM_TOKEN": v["XSAM_ADMIN_TOKEN"]},
        capture_output=True,
        text=True,
        timeout=360,
        check=False,
    )
    assert smoke.returncode == 0 and "smoke_test: PASSED" in smoke.stdout, (
        f"{smoke.stdout}\n{smoke.stderr}\n{topology.diagnostics()}"
    )
