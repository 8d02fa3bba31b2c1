"""A typed, synchronous client of the whole REST API v1 (used by the CLI, the agent and tests).

Imports only httpx and the standard library: worker/ imports it on GPU nodes, where neither
fastapi nor sqlalchemy is installed. Transport errors and error responses are translated once,
into `ApiError` and its subclasses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

DEFAULT_SERVER = "http://127.0.0.1:8000"

__all__ = [
    "DEFAULT_SERVER",
    "ApiError",
    "Conflict",
    "Forbidden",
    "LeaseLost",
    "LocalSecretRefused",
    "NotFound",
    "ServiceUnreachable",
    "Unauthorized",
    "XsamClient",
    "default_data_dir",
    "default_server_and_token",
]

#: Host names that mean this machine.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: Written by `xsam serve` into its data directory while it runs: ``{"pid", "url"}``.
SERVE_RECORD = "serve.lock"


class LocalSecretRefused(Exception):
    """No token was given, and this machine's admin secret is not for that server."""


class ApiError(Exception):
    """The service answered with an error (or could not be reached: status 0)."""

    def __init__(self, status: int, code: str, detail: Any) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        super().__init__(f"{status} {code}: {detail}")


class Unauthorized(ApiError):
    """401: no token, or an unknown or revoked one."""


class Forbidden(ApiError):
    """403: the token's role may not do that."""


class NotFound(ApiError):
    """404: no such job/token/artifact (or not yours)."""


class Conflict(ApiError):
    """409: the request conflicts with the job's state (e.g. cancelling a finished job)."""


class LeaseLost(Conflict):
    """409 on an agent route: the lease is gone; stop the run and report nothing more."""


class ServiceUnreachable(ApiError):
    """The service could not be reached or did not answer in time."""


_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
}


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


class XsamClient:
    """Speaks REST API v1. Methods return the decoded JSON (dicts), as documented in docs/api.md.

    Example::

        with XsamClient("http://127.0.0.1:8000", token) as api:
            job = api.submit({"model": {"name": "mlp"}, "data": {"name": "digits"}})
            print(api.get_job(job["id"])["status"])
    """

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout: float = 30,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> XsamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the one place where HTTP becomes Python ------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        agent: bool = False,
    ) -> httpx.Response:
        if params is not None:
            params = {k: v for k, v in params.items() if v is not None}
        try:
            response = self._http.request(method, path, json=json, params=params, headers=headers)
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise ServiceUnreachable(
                0, "unreachable", f"{self._http.base_url}: {type(exc).__name__}: {exc}"
            ) from exc
        if response.is_success:
            return response
        try:
            body = response.json()
            detail, code = body.get("detail", response.text), body.get("code", "error")
        except ValueError:
            detail, code = response.text or response.reason_phrase, f"http_{response.status_code}"
        cls = _BY_STATUS.get(response.status_code, ApiError)
        if agent and response.status_code == 409:
            cls = LeaseLost
        raise cls(response.status_code, code, detail)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # --- jobs -----------------------------------------------------------------------------

    def submit(
        self,
        config: Mapping[str, Any],
        *,
        name: str | None = None,
        priority: int = 0,
        max_attempts: int | None = None,
        tags: Iterable[str] = (),
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Queue a job (config: a TrainConfig as a dict); returns the Job."""
        body: dict[str, Any] = {"config": dict(config), "priority": priority, "tags": list(tags)}
        if name is not None:
            body["name"] = name
        if max_attempts is not None:
            body["max_attempts"] = max_attempts
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/v1/jobs", json=body, headers=headers)

    def list_jobs(
        self,
        *,
        status: str | None = None,
        tag: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        study: int | None = None,
    ) -> dict[str, Any]:
        """One page ``{items, next_cursor}``, newest first (``study``: only that study's jobs)."""
        params = {"status": status, "tag": tag, "limit": limit, "cursor": cursor, "study": study}
        return self._json("GET", "/v1/jobs", params=params)

    def get_job(self, job_id: int) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: int) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def metrics(
        self,
        job_id: int,
        *,
        names: Iterable[str] | None = None,
        since_step: int | None = None,
        until_step: int | None = None,
        max_points: int | None = None,
    ) -> dict[str, Any]:
        """``{job_id, series: {name: [point or bucket, ...]}}``."""
        params = {
            "names": ",".join(names) if names else None,
            "since_step": since_step,
            "until_step": until_step,
            "max_points": max_points,
        }
        return self._json("GET", f"/v1/jobs/{job_id}/metrics", params=params)

    def latest_metrics(self, job_id: int) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}/metrics/latest")

    def events(
        self, job_id: int, *, after: int = 0, limit: int | None = None, type: str | None = None
    ) -> dict[str, Any]:
        """``{items, next_after}``; pass ``next_after`` back as ``after`` to resume."""
        params = {"after": after, "limit": limit, "type": type}
        return self._json("GET", f"/v1/jobs/{job_id}/events", params=params)

    def logs(
        self,
        job_id: int,
        *,
        after: int = 0,
        attempt: int | None = None,
        rank: int | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """``{items: [{id, attempt, rank, time, stream, level, text}], next_after, dropped}``."""
        params = {"after": after, "attempt": attempt, "rank": rank, "limit": limit}
        return self._json("GET", f"/v1/jobs/{job_id}/logs", params=params)

    def download_model(self, job_id: int, dest: str | Path) -> Path:
        """Stream the job's trained weights to `dest` (a file, or a directory to put it in)."""
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / f"job-{job_id}-model.pt"
        url = f"/v1/jobs/{job_id}/artifacts/model"
        try:
            with self._http.stream("GET", url) as response:
                if not response.is_success:
                    response.read()
                    self._raise_for(response)
                tmp = dest.with_name(dest.name + ".part")
                with tmp.open("wb") as f:
                    for chunk in response.iter_bytes():
                        f.write(chunk)
                tmp.replace(dest)
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise ServiceUnreachable(0, "unreachable", f"{type(exc).__name__}: {exc}") from exc
        return dest

    def _raise_for(self, response: httpx.Response) -> None:
        try:
            body = response.json()
            detail, code = body.get("detail", response.text), body.get("code", "error")
        except ValueError:
            detail, code = response.text, f"http_{response.status_code}"
        raise _BY_STATUS.get(response.status_code, ApiError)(response.status_code, code, detail)

    # --- studies ---------------------------------------------------------------------------

    def submit_study(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """Submit a study ``{name?, base, arms?, grid?, seeds, baseline?, …}``; returns the Study."""
        return self._json("POST", "/v1/studies", json=dict(spec))

    def list_studies(
        self, *, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page ``{items, next_cursor}`` of Studies, newest first."""
        return self._json("GET", "/v1/studies", params={"limit": limit, "cursor": cursor})

    def get_study(self, study_id: int) -> dict[str, Any]:
        return self._json("GET", f"/v1/studies/{study_id}")

    def cancel_study(self, study_id: int) -> dict[str, Any]:
        """Cancel every job of the study not yet finished; returns the Study."""
        return self._json("POST", f"/v1/studies/{study_id}/cancel")

    def study_summary(
        self,
        study_id: int,
        *,
        metric: str | None = None,
        mode: str | None = None,
        target: float | None = None,
    ) -> dict[str, Any]:
        """``{study_id, metric, mode, target, cells: [...]}`` (docs/api.md, Studies)."""
        params = {"metric": metric, "mode": mode, "target": target}
        return self._json("GET", f"/v1/studies/{study_id}/summary", params=params)

    def study_curves(
        self, study_id: int, *, name: str | None = None, max_points: int | None = None
    ) -> dict[str, Any]:
        """``{study_id, name, cells: {key: [{step, mean, sd, min, max, n}, ...]}}``."""
        params = {"name": name, "max_points": max_points}
        return self._json("GET", f"/v1/studies/{study_id}/curves", params=params)

    # --- tokens (admin) -------------------------------------------------------------------

    def create_token(self, name: str, role: str = "user") -> dict[str, Any]:
        """``{id, name, role, token}``; the secret is shown only here."""
        return self._json("POST", "/v1/tokens", json={"name": name, "role": role})

    def list_tokens(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/tokens")["items"]

    def revoke_token(self, token_id: int) -> None:
        self._request("DELETE", f"/v1/tokens/{token_id}")

    # --- health ---------------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether the service is up and its database reachable."""
        try:
            self._request("GET", "/readyz")
        except ApiError:
            return False
        return True

    # --- agent side -----------------------------------------------------------------------

    def claim(self, agent_id: str, cpus: float, gpus: int) -> dict[str, Any] | None:
        """``{job, lease: {attempt, lease_token, heartbeat_interval_s, health}}``, or None if none
        fits."""
        response = self._request(
            "POST",
            "/v1/agent/claim",
            json={"agent_id": agent_id, "capacity": {"cpus": cpus, "gpus": gpus}},
        )
        return None if response.status_code == 204 else response.json()

    def heartbeat(
        self, job_id: int, lease_token: str, progress: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """``{cancel_requested}``; raises `LeaseLost` when the lease is gone."""
        body: dict[str, Any] = {"lease_token": lease_token}
        if progress is not None:
            body["progress"] = dict(progress)
        return self._json("POST", f"/v1/agent/jobs/{job_id}/heartbeat", json=body, agent=True)

    def finish(
        self,
        job_id: int,
        lease_token: str,
        status: str,
        error: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """End the run: status is succeeded, failed (with error {type, message}) or cancelled."""
        body: dict[str, Any] = {"lease_token": lease_token, "status": status}
        if error is not None:
            body["error"] = dict(error)
        return self._json("POST", f"/v1/agent/jobs/{job_id}/finish", json=body, agent=True)

    def release(self, job_id: int, lease_token: str, reason: str | None = None) -> dict[str, Any]:
        """Hand the running job back (queued, attempt not counted; cancelled if a cancel was
        requested); returns the Job. Raises `LeaseLost` when the lease is already gone."""
        body: dict[str, Any] = {"lease_token": lease_token}
        if reason is not None:
            body["reason"] = reason
        return self._json("POST", f"/v1/agent/jobs/{job_id}/release", json=body, agent=True)

    def ingest_metrics(
        self, job_id: int, lease_token: str, points: Iterable[Mapping[str, Any]]
    ) -> dict[str, Any]:
        """Points ``{name, step, value, epoch?, time?}``; replays are ignored by the service."""
        body = {"lease_token": lease_token, "points": [_jsonable(p) for p in points]}
        return self._json("POST", f"/v1/agent/jobs/{job_id}/metrics", json=body, agent=True)

    def ingest_events(
        self, job_id: int, lease_token: str, events: Iterable[Mapping[str, Any]]
    ) -> dict[str, Any]:
        """Events ``{type, message, data?, key?}``; a key the job already has is dropped."""
        body = {"lease_token": lease_token, "events": [_jsonable(e) for e in events]}
        return self._json("POST", f"/v1/agent/jobs/{job_id}/events", json=body, agent=True)

    def ingest_logs(
        self, job_id: int, lease_token: str, lines: Iterable[Mapping[str, Any]]
    ) -> dict[str, Any]:
        """Lines ``{rank, seq, time?, stream, level?, text}``; replays are dropped."""
        body = {"lease_token": lease_token, "lines": [_jsonable(line) for line in lines]}
        return self._json("POST", f"/v1/agent/jobs/{job_id}/logs", json=body, agent=True)


def _jsonable(item: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(item)
    time = out.get("time")
    if time is not None and not isinstance(time, str | int | float):
        out["time"] = time.isoformat()
    return out
