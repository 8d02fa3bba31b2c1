"""`xsam serve`: apply migrations, then run the API, a local Ray instance and an agent.

`build_and_run_api(...)` is the seam the agent command reuses: it migrates the database,
provisions the admin token and serves the API with uvicorn until interrupted. Without
``--no-agent``, `run_embedded` serves the API from a thread, starts a private Ray head node
(worker.local_ray: free ports, its own temp dir and auth token; it dies with this process) or
joins ``--ray-address``, and runs the agent against the API with the admin token. SIGINT or
SIGTERM stops the running jobs at their next step with a checkpoint and releases them back to
the queue (their attempts not counted; the next start resumes them), then the API, then Ray.

One `xsam serve` per data directory and per port: before anything else it takes an exclusive
lock on ``<data_dir>/serve.lock`` (holding its pid and URL, which the CLI reads to know where
the local admin secret may go) and binds its port itself, handing the bound socket to uvicorn.
A second one exits at once naming the first; readiness is this process's own server starting,
never whatever answers on the port.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("xsam.serve")


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="state directory (default $XSAM_DATA_DIR or ~/.xsam)",
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="SQLAlchemy URL (default $XSAM_DATABASE_URL or sqlite:///<data-dir>/xsam.db)",
    )
    parser.add_argument(
        "--no-agent", action="store_true", help="run the API only (no local Ray, no agent)"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="API processes (uvicorn workers; with --no-agent only; default 1). Each has its own "
        "database pool (XSAM_DB_POOL_SIZE + XSAM_DB_MAX_OVERFLOW connections at most)",
    )
    agent = parser.add_argument_group("embedded agent and Ray")
    agent.add_argument("--ray-address", default=None, help="join this Ray cluster instead")
    agent.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)"
    )
    agent.add_argument("--num-gpus", type=int, default=None, help="GPUs of the local Ray")
    agent.add_argument(
        "--ray-temp-dir", default=None, help="local Ray's temp dir (default /tmp/xsam-ray-<id>)"
    )
    agent.add_argument("--max-jobs", type=int, default=4, help="jobs at once (default 4)")
    agent.add_argument(
        "--warm-actors",
        type=int,
        default=2,
        help="warm actors kept for one-rank CPU jobs; 0 = every job through Ray Train (default 2)",
    )
    agent.add_argument("--data-root", default=None, help="data sets root ($XSAM_DATA_ROOT)")
    agent.add_argument(
        "--storage-path", type=Path, default=None, help="checkpoints (<data-dir>/checkpoints)"
    )


def make_settings(data_dir: Path | None = None, database_url: str | None = None, **overrides: Any):
    """Settings from the environment, with the command line's choices on top."""
    from service.settings import Settings

    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if database_url is not None:
        overrides["database_url"] = database_url
    return Settings(**overrides)


class AlreadyServing(Exception):
    """Another `xsam serve` holds this data directory or port; the message names it."""


class ServeLock:
    """An exclusive lock on ``<data_dir>/serve.lock`` for the life of this process, recording
    this server's pid and URL (the file is emptied on release; the kernel drops the lock if
    the process dies)."""

    def __init__(self, data_dir: Path, url: str) -> None:
        import fcntl

        from service.client import SERVE_RECORD

        _private_dir(data_dir)
        self.path = data_dir / SERVE_RECORD
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 4096, 0).decode(errors="replace")
            os.close(self.fd)
            try:
                record = json.loads(holder)
                who = f"pid {record['pid']}, serving {record['url']}"
            except (ValueError, KeyError, TypeError):
                who = "starting up"
            raise AlreadyServing(
                f"another `xsam serve` ({who}) is using the data directory {data_dir}; "
                "stop it first, or give this one another --data-dir"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": os.getpid(), "url": url}).encode(), 0)

    def release(self) -> None:
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing the descriptor drops the lock


def _private_dir(path: Path) -> None:
    """`path` exists and only its owner may enter it (0700; an older install's too)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        path.chmod(0o700)
    except PermissionError:  # a mounted volume this user does not own: its owner decides
        log.warning("cannot make %s owner-only (not its owner); check its mode", path)


def _sqlite_file(url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser()


def bind_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for uvicorn, or `AlreadyServing` naming what holds it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As uvicorn does: a port in TIME_WAIT may be reused; one that something listens on not.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        url = f"http://{host}:{port}"
        raise AlreadyServing(
            f"cannot listen on {host}:{port} ({exc.strerror}){_who_answers(url)}; "
            "stop it first, or give this one another --port"
        ) from None
    sock.set_inheritable(True)
    return sock


def _who_answers(url: str) -> str:
    import httpx

    try:
        title = httpx.get(f"{url}/openapi.json", timeout=1).json()["info"]["title"]
    except Exception:
        return ""
    return f": {title!r} (another `xsam serve`?) answers at {url}"


def prepare(settings) -> str:
    """Migrate the database and make sure an admin token exists; returns where it is."""
    from service.auth import provision_admin_token
    from service.db.engine import make_engine, make_sessionmakers, run_in_transaction
    from service.db.migrate import upgrade

    _private_dir(settings.data_dir)
    database = _sqlite_file(settings.url)
    if database is not None:
        # Created owner-only before SQLite opens it (its -wal/-shm files copy these modes).
        os.close(os.open(database, os.O_RDWR | os.O_CREAT, 0o600))
        for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
            if path.exists():
                try:
                    path.chmod(0o600)  # an older install's world-readable database
                except PermissionError:
                    log.warning("cannot make %s owner-only (not its owner)", path)
    upgrade(settings.url)
    if settings.admin_token is not None:
        return "$XSAM_ADMIN_TOKEN"
    engine = make_engine(settings.url, pool_size=1, max_overflow=0)
    try:
        writer, _ = make_sessionmakers(engine)
        path = settings.admin_token_file
        run_in_transaction(writer, lambda s: provision_admin_token(s, path))
    finally:
        engine.dispose()
    return str(settings.admin_token_file)


def build_and_run_api(
    settings,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    workers: int = 1,
) -> int:
    """Migrate, provision the admin token, then serve the API on host:port until stopped.

    With `workers` > 1, uvicorn runs that many processes on the port, each building its app
    with `create_app()` from the environment: the settings' data dir and database URL are
    handed down as XSAM_DATA_DIR and XSAM_DATABASE_URL.
    """
    import os

    import uvicorn

    from service.app import create_app

    with _locked_and_bound(settings, host, port) as held:
        if held is None:
            return 1
        url, sock = held
        where = prepare(settings)
        log.info("XSAM API on %s (database %s, %d worker(s))", url, _safe(settings.url), workers)
        log.info("admin token: %s", where)
        if workers > 1:
            # uvicorn's worker supervisor binds the port itself: hand ours back just before.
            # The data directory stays locked, so a second `xsam serve` there still refuses.
            sock.close()
            os.environ["XSAM_DATA_DIR"] = str(settings.data_dir)
            os.environ["XSAM_DATABASE_URL"] = settings.url
            print(f"xsam: serving the API on {url} with {workers} workers; admin token in "
                  f"{where}", file=sys.stderr, flush=True)  # fmt: skip
            uvicorn.run(
                "service.app:create_app",
                factory=True,
                host=host,
                port=port,
                workers=workers,
                log_level=log_level,
                access_log=False,
            )
            return 0
        app = create_app(settings)
        # The port is this process's already: the line below is true before uvicorn starts.
        print(f"xsam: serving the API on {url}; admin token in {where}", file=sys.stderr,
              flush=True)  # fmt: skip
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False)
        uvicorn.Server(config).run(sockets=[sock])
        return 0


@contextlib.contextmanager
def _locked_and_bound(settings, host: str, port: int) -> Iterator[tuple[str, socket.socket] | None]:
    """(url, bound socket) while this server holds its data directory's lock and host:port;
    None, said on stderr, when another server holds either."""
    url = f"http://{host}:{port}"
    try:
        lock = ServeLock(settings.data_dir, url)
    except AlreadyServing as exc:
        print(f"xsam serve: {exc}", file=sys.stderr)
        yield None
        return
    try:
        try:
            sock = bind_port(host, port)
        except AlreadyServing as exc:
            print(f"xsam serve: {exc}", file=sys.stderr)
            yield None
            return
        yield url, sock
    finally:
        lock.release()


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    # Everything this server writes (database, tokens, checkpoints, weights) is its owner's.
    os.umask(0o077)
    # XSAM_DATA_DIR / XSAM_DATABASE_URL are read by Settings; flags win over them.
    settings = make_settings(args.data_dir, args.database_url)
    if not args.no_agent:
        if args.workers != 1:
            print("xsam serve: --workers needs --no-agent", file=sys.stderr)
            return 2
        return run_embedded(settings, args)
    return build_and_run_api(settings, args.host, args.port, args.log_level, args.workers)


def _admin_token(settings) -> str:
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value()
    return settings.admin_token_file.read_text().strip()


def _ray_temp_dir(settings) -> Path:
    # Short and per data dir: Ray's unix socket paths must stay under 107 bytes.
    import hashlib
    import os

    digest = hashlib.sha256(str(settings.data_dir.resolve()).encode()).hexdigest()[:8]
    return Path(f"/tmp/xsam-ray-{os.getuid()}-{digest}")


def run_embedded(settings, args: argparse.Namespace) -> int:
    """The API (uvicorn, in a thread), a local Ray head and an agent, until SIGINT/SIGTERM."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat otherwise
    with _locked_and_bound(settings, args.host, args.port) as held:
        if held is None:
            return 1
        return _run_embedded(settings, args, *held)


def _run_embedded(settings, args: argparse.Namespace, url: str, sock: socket.socket) -> int:
    import threading
    import time

    import uvicorn

    from cli.agent_cmd import build_agent, stop_on_signals
    from service.app import create_app
    from worker import local_ray

    stop = threading.Event()
    stop_on_signals(stop)
    where = prepare(settings)
    config = uvicorn.Config(
        create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
        access_log=False,
    )  # fmt: skip
    server = uvicorn.Server(config)
    # In a thread uvicorn installs no signal handlers: ours decide the order of shutdown.
    api = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="xsam-api", daemon=True
    )
    api.start()
    token = _admin_token(settings)
    # Ready when this process's own server has started (it serves the socket bound above),
    # never because something else answers on the port.
    while not server.started:
        if not api.is_alive():
            print(f"xsam serve: the API did not start on {url}", file=sys.stderr)
            return 1
        time.sleep(0.1)
    print(f"xsam: serving the API on {url}; admin token in {where}", file=sys.stderr, flush=True)

    head = None
    address = args.ray_address
    try:
        if address is None and not stop.is_set():
            temp_dir = Path(args.ray_temp_dir) if args.ray_temp_dir else _ray_temp_dir(settings)
            token_file = local_ray.ensure_auth_token(settings.data_dir / "ray" / "auth_token")
            print("xsam: starting a local Ray instance…", file=sys.stderr, flush=True)
            head = local_ray.start_head(
                temp_dir, num_cpus=args.num_cpus, num_gpus=args.num_gpus, token_file=token_file
            )
            address = head.address
        if not stop.is_set():
            agent = build_agent(
                server=url,
                token=token,
                data_dir=settings.data_dir,
                ray_address=address,
                max_jobs=args.max_jobs,
                storage_path=args.storage_path,
                artifacts_dir=settings.artifacts_path,
                data_root=args.data_root,
                agent_id=f"serve-{args.port}",
                warm_actors=args.warm_actors,
            )
            agent.connect()
            print(f"xsam: agent running on Ray at {address}", file=sys.stderr, flush=True)
            agent.run(stop)  # returns after stop is set and the running jobs have stopped
    finally:
        server.should_exit = True
        api.join(15)
        if head is not None:
            import ray

            ray.shutdown()
            head.stop()
        print("xsam: stopped", file=sys.stderr, flush=True)
    return 0
