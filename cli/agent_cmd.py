"""`xsam agent --server URL --token T`: claim jobs from a server and run them on a Ray cluster.

Runs as a Ray driver (on the head node of the cluster named by ``--ray-address``, default: the
cluster this machine belongs to). SIGINT/SIGTERM stop the running jobs at their next step with
a checkpoint and release them to the queue (no attempt spent); if the service cannot be reached
then, their leases expire and the reaper requeues them instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--server", default=None, help="API URL (default $XSAM_SERVER or :8000)")
    parser.add_argument("--token", default=None, help="agent token (default $XSAM_TOKEN)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster (default: auto)")
    parser.add_argument("--max-jobs", type=int, default=4, help="jobs at once (default 4)")
    parser.add_argument(
        "--storage-path",
        type=Path,
        default=None,
        help="checkpoint root shared by all Ray nodes (default <data-dir>/checkpoints)",
    )
    parser.add_argument(
        "--artifacts-dir",
        type=Path,
        default=None,
        help="where job-<id>/model.pt go, read by the API (default <data-dir>/artifacts)",
    )
    parser.add_argument(
        "--data-root", default=None, help="data sets root (default $XSAM_DATA_ROOT)"
    )
    parser.add_argument("--agent-id", default="", help="name shown on claimed jobs")
    parser.add_argument(
        "--max-failures",
        type=int,
        default=1,
        help="worker-group restarts within one attempt (Ray Train FailureConfig; default 1)",
    )
    parser.add_argument(
        "--warm-actors",
        type=int,
        default=2,
        help="warm actors kept for one-rank CPU jobs; 0 = every job through Ray Train (default 2)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])


def build_agent(
    *,
    server: str,
    token: str,
    data_dir: Path,
    ray_address: str | None = None,
    max_jobs: int = 4,
    storage_path: Path | None = None,
    artifacts_dir: Path | None = None,
    data_root: str | None = None,
    agent_id: str = "",
    max_failures: int = 1,
    warm_actors: int = 2,
):
    """The `Agent` the command runs; `xsam serve` builds its embedded agent with it too."""
    from worker.agent import Agent, AgentSettings
    from worker.ray_run import RunSettings

    run = RunSettings(
        server=server,
        token=token,
        storage_path=(storage_path or data_dir / "checkpoints").resolve(),
        artifacts_dir=(artifacts_dir or data_dir / "artifacts").resolve(),
        data_root=data_root or os.environ.get("XSAM_DATA_ROOT"),
        max_failures=max_failures,
    )
    settings = AgentSettings(
        server=server,
        token=token,
        run=run,
        agent_id=agent_id,
        ray_address=ray_address,
        max_jobs=max_jobs,
        warm_actors=warm_actors,
    )
    return Agent(settings)


def stop_on_signals(stop: threading.Event) -> None:
    """SIGINT/SIGTERM set ``stop``; a second SIGINT exits at once."""

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        print(f"xsam: {signal.Signals(signum).name}: stopping jobs with a checkpoint…",
              file=sys.stderr, flush=True)  # fmt: skip
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def run(args: argparse.Namespace) -> int:
    from service.client import LocalSecretRefused, default_data_dir, default_server_and_token

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        server, token = default_server_and_token(args.server, args.token)
    except LocalSecretRefused as exc:
        print(f"xsam agent: {exc}", file=sys.stderr)
        return 2
    if not token:
        print("xsam agent: no token (use --token or $XSAM_TOKEN)", file=sys.stderr)
        return 2
    agent = build_agent(
        server=server,
        token=token,
        data_dir=default_data_dir(),
        ray_address=args.ray_address,
        max_jobs=args.max_jobs,
        storage_path=args.storage_path,
        artifacts_dir=args.artifacts_dir,
        data_root=args.data_root,
        agent_id=args.agent_id,
        max_failures=args.max_failures,
        warm_actors=args.warm_actors,
    )
    stop = threading.Event()
    stop_on_signals(stop)
    try:
        agent.run(stop)
    except ConnectionError as exc:
        print(f"xsam agent: cannot connect to Ray: {exc}", file=sys.stderr)
        return 1
    return 0
