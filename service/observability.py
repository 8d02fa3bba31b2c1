"""Prometheus instruments of one app: request latency, ingest rates, jobs by status, queue depth.

Each app has its own registry (tests build many apps in one process).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.contract import JobStatus

log = logging.getLogger(__name__)


class _JobsCollector(Collector):
    """Reads job counts from the database at scrape time (the database is the truth)."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = self._counts()
        except Exception:  # a scrape must not fail because the database is down
            log.warning("could not count jobs for /metrics", exc_info=True)
            return
        jobs = GaugeMetricFamily("xsam_jobs", "Jobs by status", labels=["status"])
        for status, n in sorted(counts.items()):
            jobs.add_metric([status], n)
        yield jobs
        yield GaugeMetricFamily(
            "xsam_queue_depth", "Jobs waiting to be claimed", value=counts.get(JobStatus.QUEUED, 0)
        )


class Instruments:
    def __init__(self, job_counts: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "xsam_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.metric_points = Counter(
            "xsam_ingested_metric_points",
            "Metric points received from agents",
            registry=self.registry,
        )
        self.events = Counter(
            "xsam_ingested_events", "Events received from agents", registry=self.registry
        )
        self.registry.register(_JobsCollector(job_counts))


class RequestTimer:
    """Pure ASGI middleware: observes every HTTP request's latency by route template."""

    def __init__(self, app: ASGIApp, instruments: Instruments) -> None:
        self.app = app
        self.instruments = instruments

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.instruments.request_seconds.labels(scope["method"], template, str(status)).observe(
                time.perf_counter() - start
            )
