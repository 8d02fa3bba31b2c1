"""Where the CLI finds its server and token: arguments, the environment, or `xsam serve`'s files.

This machine's admin secret (written by `xsam serve`) goes only to the server it belongs to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx

DEFAULT_SERVER = "http://127.0.0.1:8000"
#: Host names that mean this machine.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: Written by `xsam serve` into its data directory while it runs: ``{"pid", "url"}``.
SERVE_RECORD = "serve.lock"


class LocalSecretRefused(Exception):
    """No token was given, and this machine's admin secret is not for that server."""


def default_data_dir() -> Path:
    return Path(os.environ.get("XSAM_DATA_DIR") or "~/.xsam").expanduser()


def _host_port(url: str) -> tuple[str, int | None]:
    parsed = httpx.URL(url)
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)
    host = parsed.host.lower()
    return ("127.0.0.1" if host in LOOPBACK_HOSTS else host), port


def is_local_server(server: str, data_dir: Path | None = None) -> bool:
    """Whether `server` is the `xsam serve` whose data directory is `data_dir`: a loopback
    address and, while that server runs (it records its URL there), its port."""
    host, port = _host_port(server)
    if host != "127.0.0.1":
        return False
    running = _running_server_url(data_dir or default_data_dir())
    if running is None:
        return True  # no server runs on this data directory: any loopback port is ours
    return _host_port(running) == (host, port)


def _running_server_url(data_dir: Path) -> str | None:
    """The URL `xsam serve` recorded in `data_dir`, if it still runs (holds the lock)."""
    import fcntl

    try:
        fd = os.open(data_dir / SERVE_RECORD, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: the server runs, and its record is current
            return str(json.loads(os.pread(fd, 4096, 0))["url"])
        return None  # nobody holds it: a record left by a server that was killed
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        os.close(fd)


def default_server_and_token(
    server: str | None = None, token: str | None = None
) -> tuple[str, str | None]:
    """The server URL and token the CLI uses: arguments, else $XSAM_SERVER / $XSAM_TOKEN, else
    http://127.0.0.1:8000 and this machine's admin secret ($XSAM_ADMIN_TOKEN, or the
    <data_dir>/admin.token that `xsam serve` wrote).

    That secret is sent only to the local server it belongs to (`is_local_server`): for any
    other server, with no token given, this raises `LocalSecretRefused` naming XSAM_TOKEN,
    rather than hand an admin secret to whatever answers there.
    """
    server = (server or os.environ.get("XSAM_SERVER") or DEFAULT_SERVER).rstrip("/")
    token = token or os.environ.get("XSAM_TOKEN")
    if token:
        return server, token
    where = "$XSAM_ADMIN_TOKEN"
    local = os.environ.get("XSAM_ADMIN_TOKEN")
    if not local:
        path = default_data_dir() / "admin.token"
        where = str(path)
        try:
            local = path.read_text().strip() or None
        except OSError:
            local = None
    if local is None:
        return server, None
    if not is_local_server(server):
        raise LocalSecretRefused(
            f"{server} is not the local `xsam serve`, and this machine's admin secret ({where}) "
            f"is only sent to that one: set XSAM_TOKEN (or --token) to a token of {server}"
        )
    return server, local
