"""A typed, synchronous client of the whole REST API v1 (used by the CLI, the agent and tests).

Imports httpx, the standard library and the contract (service/contract/): worker/ imports it on
GPU nodes, where neither fastapi nor sqlalchemy is installed. Methods return the contract's
models, the very classes the server answers with. Transport errors and error responses are
translated once, into `ApiError` and its subclasses, by the server's stable ``code``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from service.client_errors import (
    ApiError,
    Conflict,
    Forbidden,
    LeaseLost,
    NotFound,
    ServiceUnreachable,
    Unauthorized,
    error_for,
)
from service.contract import (
    TERMINAL,
    ClaimPublic,
    EventPublic,
    EventsPublic,
    HeartbeatPublic,
    IngestPublic,
    JobPublic,
    JobsPublic,
    JobStatus,
    LatestMetricsPublic,
    LogsPublic,
    MetricsPublic,
    Role,
    StudiesPublic,
    StudyCurves,
    StudyPublic,
    StudySummary,
    TokenCreated,
    TokenPublic,
    TokensPublic,
)
from service.local_server import (
    DEFAULT_SERVER,
    SERVE_RECORD,
    LocalSecretRefused,
    default_data_dir,
    default_server_and_token,
    is_local_server,
)

__all__ = [
    "DEFAULT_SERVER",
    "SERVE_RECORD",
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
    "is_local_server",
]

M = TypeVar("M", bound=BaseModel)


class XsamClient:
    """Speaks REST API v1; methods return the contract's models (docs/api.md has each shape).

    Example::

        with XsamClient("http://127.0.0.1:8000", token) as api:
            job = api.submit({"model": {"name": "mlp"}, "data": {"name": "digits"}})
            print(api.wait_for_job(job.id, timeout=600).status)
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
        raise error_for(response)

    def _call(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        return model.model_validate_json(self._request(method, path, **kwargs).content)

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
    ) -> JobPublic:
        """Queue a job (config: a TrainConfig as a dict); returns the Job."""
        body: dict[str, Any] = {"config": dict(config), "priority": priority, "tags": list(tags)}
        if name is not None:
            body["name"] = name
        if max_attempts is not None:
            body["max_attempts"] = max_attempts
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._call(JobPublic, "POST", "/v1/jobs", json=body, headers=headers)

    def list_jobs(
        self,
        *,
        status: str | None = None,
        tag: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        study: int | None = None,
    ) -> JobsPublic:
        """One page ``{items, next_cursor}``, newest first (``study``: only that study's jobs)."""
        params = {"status": status, "tag": tag, "limit": limit, "cursor": cursor, "study": study}
        return self._call(JobsPublic, "GET", "/v1/jobs", params=params)

    def get_job(self, job_id: int) -> JobPublic:
        return self._call(JobPublic, "GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: int) -> JobPublic:
        return self._call(JobPublic, "POST", f"/v1/jobs/{job_id}/cancel")

    def metrics(
        self,
        job_id: int,
        *,
        names: Iterable[str] | None = None,
        since_step: int | None = None,
        until_step: int | None = None,
        max_points: int | None = None,
    ) -> MetricsPublic:
        """Per name a series of points, or of buckets where it was downsampled."""
        params = {
            "names": ",".join(names) if names else None,
            "since_step": since_step,
            "until_step": until_step,
            "max_points": max_points,
        }
        return self._call(MetricsPublic, "GET", f"/v1/jobs/{job_id}/metrics", params=params)

    def latest_metrics(self, job_id: int) -> LatestMetricsPublic:
        return self._call(LatestMetricsPublic, "GET", f"/v1/jobs/{job_id}/metrics/latest")

    def events(
        self, job_id: int, *, after: int = 0, limit: int | None = None, type: str | None = None
    ) -> EventsPublic:
        """One page of events; pass ``next_after`` back as ``after`` to resume."""
        params = {"after": after, "limit": limit, "type": type}
        return self._call(EventsPublic, "GET", f"/v1/jobs/{job_id}/events", params=params)

    def logs(
        self,
        job_id: int,
        *,
        after: int = 0,
        attempt: int | None = None,
        rank: int | None = None,
        limit: int | None = None,
    ) -> LogsPublic:
        """One page of log lines, and how many lines the per-job cap dropped."""
        params = {"after": after, "attempt": attempt, "rank": rank, "limit": limit}
        return self._call(LogsPublic, "GET", f"/v1/jobs/{job_id}/logs", params=params)

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
                    raise error_for(response)
                tmp = dest.with_name(dest.name + ".part")
                with tmp.open("wb") as f:
                    for chunk in response.iter_bytes():
                        f.write(chunk)
                tmp.replace(dest)
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise ServiceUnreachable(0, "unreachable", f"{type(exc).__name__}: {exc}") from exc
        return dest

    # --- what every caller would otherwise write by hand -------------------------------------

    def wait_for_job(
        self,
        job_id: int,
        *,
        timeout: float | None = None,
        poll_s: float = 1.0,
        on_poll: Callable[[JobPublic], None] | None = None,
    ) -> JobPublic:
        """Poll the job until it is terminal and return it; `TimeoutError` after `timeout` s.

        ``on_poll`` sees every state read, the last one included (a progress bar, a log line).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_poll is not None:
                on_poll(job)
            if job.status in TERMINAL:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
            time.sleep(poll_s)

    def iter_jobs(
        self,
        *,
        status: str | None = None,
        tag: str | None = None,
        study: int | None = None,
        page_size: int | None = None,
    ) -> Iterator[JobPublic]:
        """Every job that matches, newest first, across as many pages as it takes."""
        cursor: str | None = None
        while True:
            page = self.list_jobs(
                status=status, tag=tag, study=study, limit=page_size, cursor=cursor
            )
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def iter_studies(self, *, page_size: int | None = None) -> Iterator[StudyPublic]:
        """Every study the caller may see, newest first, across pages."""
        cursor: str | None = None
        while True:
            page = self.list_studies(limit=page_size, cursor=cursor)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def follow_events(
        self, job_id: int, *, after: int = 0, poll_s: float = 1.0, type: str | None = None
    ) -> Iterator[EventPublic]:
        """The job's events in order as they come, until the job is terminal and all are read."""
        while True:
            page = self.events(job_id, after=after, type=type)
            yield from page.items
            after = page.next_after
            if page.items:
                continue  # there may be more at once
            if self.get_job(job_id).status in TERMINAL:
                # Events recorded with the last status change are read once more, then done.
                last = self.events(job_id, after=after, type=type)
                yield from last.items
                return
            time.sleep(poll_s)

    # --- studies ---------------------------------------------------------------------------

    def submit_study(self, spec: Mapping[str, Any]) -> StudyPublic:
        """Submit a study ``{name?, base, arms?, grid?, seeds, baseline?, …}``; returns the Study."""
        return self._call(StudyPublic, "POST", "/v1/studies", json=dict(spec))

    def list_studies(self, *, limit: int | None = None, cursor: str | None = None) -> StudiesPublic:
        """One page ``{items, next_cursor}`` of Studies, newest first."""
        params = {"limit": limit, "cursor": cursor}
        return self._call(StudiesPublic, "GET", "/v1/studies", params=params)

    def get_study(self, study_id: int) -> StudyPublic:
        return self._call(StudyPublic, "GET", f"/v1/studies/{study_id}")

    def cancel_study(self, study_id: int) -> StudyPublic:
        """Cancel every job of the study not yet finished; returns the Study."""
        return self._call(StudyPublic, "POST", f"/v1/studies/{study_id}/cancel")

    def study_summary(
        self,
        study_id: int,
        *,
        metric: str | None = None,
        mode: str | None = None,
        target: float | None = None,
    ) -> StudySummary:
        """Per cell the statistics of `metric` over seeds (docs/api.md, Studies)."""
        params = {"metric": metric, "mode": mode, "target": target}
        return self._call(StudySummary, "GET", f"/v1/studies/{study_id}/summary", params=params)

    def study_curves(
        self, study_id: int, *, name: str | None = None, max_points: int | None = None
    ) -> StudyCurves:
        """Per cell the curve of `name` over seeds: ``{step, mean, sd, min, max, n}``."""
        params = {"name": name, "max_points": max_points}
        return self._call(StudyCurves, "GET", f"/v1/studies/{study_id}/curves", params=params)

    # --- tokens (admin) -------------------------------------------------------------------

    def create_token(self, name: str, role: Role | str = Role.USER) -> TokenCreated:
        """A new token; its secret (``token``) is shown only here."""
        body = {"name": name, "role": str(role)}
        return self._call(TokenCreated, "POST", "/v1/tokens", json=body)

    def list_tokens(self) -> list[TokenPublic]:
        return self._call(TokensPublic, "GET", "/v1/tokens").items

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

    def claim(self, agent_id: str, cpus: float, gpus: int) -> ClaimPublic | None:
        """A job that fits and its lease (attempt, lease token, heartbeat interval, the health
        rules), or None if none fits."""
        response = self._request(
            "POST",
            "/v1/agent/claim",
            json={"agent_id": agent_id, "capacity": {"cpus": cpus, "gpus": gpus}},
        )
        if response.status_code == 204:
            return None
        return ClaimPublic.model_validate_json(response.content)

    def heartbeat(
        self, job_id: int, lease_token: str, progress: Mapping[str, Any] | None = None
    ) -> HeartbeatPublic:
        """Whether a cancel was requested; raises `LeaseLost` when the lease is gone."""
        body: dict[str, Any] = {"lease_token": lease_token}
        if progress is not None:
            body["progress"] = dict(progress)
        return self._call(HeartbeatPublic, "POST", f"/v1/agent/jobs/{job_id}/heartbeat", json=body)

    def finish(
        self,
        job_id: int,
        lease_token: str,
        status: JobStatus | str,
        error: Mapping[str, Any] | None = None,
    ) -> JobPublic:
        """End the run: status is succeeded, failed (with error {type, message}) or cancelled."""
        body: dict[str, Any] = {"lease_token": lease_token, "status": str(status)}
        if error is not None:
            body["error"] = dict(error)
        return self._call(JobPublic, "POST", f"/v1/agent/jobs/{job_id}/finish", json=body)

    def release(self, job_id: int, lease_token: str, reason: str | None = None) -> JobPublic:
        """Hand the running job back (queued, attempt not counted; cancelled if a cancel was
        requested); returns the Job. Raises `LeaseLost` when the lease is already gone."""
        body: dict[str, Any] = {"lease_token": lease_token}
        if reason is not None:
            body["reason"] = reason
        return self._call(JobPublic, "POST", f"/v1/agent/jobs/{job_id}/release", json=body)

    def ingest_metrics(
        self, job_id: int, lease_token: str, points: Iterable[Mapping[str, Any]]
    ) -> IngestPublic:
        """Points ``{name, step, value, epoch?, time?}``; replays are ignored by the service."""
        body = {"lease_token": lease_token, "points": [_jsonable(p) for p in points]}
        return self._call(IngestPublic, "POST", f"/v1/agent/jobs/{job_id}/metrics", json=body)

    def ingest_events(
        self, job_id: int, lease_token: str, events: Iterable[Mapping[str, Any]]
    ) -> IngestPublic:
        """Events ``{type, message, data?, key?}``; a key the job already has is dropped."""
        body = {"lease_token": lease_token, "events": [_jsonable(e) for e in events]}
        return self._call(IngestPublic, "POST", f"/v1/agent/jobs/{job_id}/events", json=body)

    def ingest_logs(
        self, job_id: int, lease_token: str, lines: Iterable[Mapping[str, Any]]
    ) -> IngestPublic:
        """Lines ``{rank, seq, time?, stream, level?, text}``; replays are dropped."""
        body = {"lease_token": lease_token, "lines": [_jsonable(line) for line in lines]}
        return self._call(IngestPublic, "POST", f"/v1/agent/jobs/{job_id}/logs", json=body)


def _jsonable(item: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(item)
    time = out.get("time")
    if time is not None and not isinstance(time, str | int | float):
        out["time"] = time.isoformat()
    return out
