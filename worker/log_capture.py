"""Capture one rank's stdout, stderr and Python logging, and ship the lines to the service.

`capture_rank_logs` is the hook-in point: whatever runs a rank (Ray Train's loop function, or
a warm actor) wraps the training in it::

    with capture_rank_logs(client, job_id, lease_token, rank) as shipper:
        ... fit(...) ...

Inside, ``sys.stdout`` and ``sys.stderr`` are replaced by line splitters that still write
through to the original streams (Ray's own log files keep working), and a handler on the root
logger sends every logging record at INFO and above (the training code's and its libraries')
with its level. Text written below Python (C extensions writing to fd 1/2) is not captured.

A `LogShipper` numbers the rank's lines (``seq``) and sends them in batches, about once a
second, to ``POST /v1/agent/jobs/{id}/logs`` under the lease. A failed send is retried (the
service drops lines it already has, so a replay is harmless); a 409 means the lease is gone and
nothing more is sent. ``seq`` starts at the wall clock in microseconds, so that a worker group
Ray restarts within the attempt continues above the lines of the one it replaces.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from types import FrameType
from typing import Any, TextIO

from service.client import ApiError, LeaseLost, ServiceUnreachable, XsamClient

log = logging.getLogger(__name__)

#: Most lines in one request (the service allows 5000 by default).
MAX_LINES_PER_BATCH = 1000
#: A longer line is cut here (the service refuses longer ones).
MAX_LINE_CHARS = 20_000
#: Past this many unsent lines the oldest are dropped (an outage must not exhaust memory).
MAX_BUFFERED_LINES = 100_000


class LogShipper:
    """Buffer one rank's lines and send them in batches under the job's lease."""

    def __init__(
        self,
        client: XsamClient,
        job_id: int,
        lease_token: str,
        rank: int,
        *,
        interval: float = 1.0,
    ) -> None:
        self.client = client
        self.job_id = job_id
        self.lease_token = lease_token
        self.rank = rank
        self.interval = interval
        self._seq = time.time_ns() // 1000
        self._lock = threading.Lock()
        self._lines: list[dict[str, Any]] = []
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._lost = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def add(self, stream: str, text: str, level: str | None = None) -> None:
        """Queue one line (never blocks on the network)."""
        if self._lost.is_set():
            return
        line = {
            "rank": self.rank,
            "stream": stream,
            "level": level,
            "text": text[:MAX_LINE_CHARS],
            "time": datetime.now(UTC).isoformat(),
        }
        with self._lock:
            line["seq"] = self._seq
            self._seq += 1
            self._lines.append(line)
            overflow = len(self._lines) - MAX_BUFFERED_LINES
            if overflow > 0:
                del self._lines[:overflow]
                self.dropped += overflow

    @property
    def thread_name(self) -> str:
        return f"xsam-logs-{self.job_id}-{self.rank}"

    def start(self) -> LogShipper:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> int:
        """Send what is buffered (for up to ``timeout`` s); returns how many lines were left."""
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            return len(self._lines)

    def flush(self, timeout: float = 5.0) -> bool:
        """Send what is buffered now (for up to ``timeout`` s) and keep capturing; True when
        nothing is left. A rank calls it before it reports an outcome: once the agent knows the
        outcome it finishes the job, and lines sent after that are refused with the lease."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._lost.is_set():
            with self._lock:
                if not self._lines:
                    return True
            self._wake.set()
            time.sleep(0.05)
        with self._lock:
            return not self._lines

    def lose_lease(self) -> None:
        self._lost.set()
        with self._lock:
            self._lines.clear()
        self._wake.set()

    def _run(self) -> None:
        backoff = self.interval
        while not self._lost.is_set():
            self._wake.wait(backoff)
            self._wake.clear()
            ok = self._send_all()
            with self._lock:
                empty = not self._lines
            if self._closing.is_set() and (empty or self._lost.is_set()):
                return
            backoff = self.interval if ok else min(max(backoff * 2, 0.2), 5.0)
            if self._closing.is_set() and not ok:
                time.sleep(0.2)  # close() bounds the wait

    def _send_all(self) -> bool:
        while not self._lost.is_set():
            with self._lock:
                batch = self._lines[:MAX_LINES_PER_BATCH]
            if not batch:
                return True
            try:
                self.client.ingest_logs(self.job_id, self.lease_token, batch)
            except LeaseLost:
                self.lose_lease()
                return False
            except ServiceUnreachable:
                return False
            except ApiError as exc:
                if exc.status >= 500 or exc.status == 429:
                    return False
                # Will not change on retry: drop the batch (and say so on the real stderr).
                print(f"xsam: log batch refused: {exc}", file=sys.__stderr__)
            with self._lock:
                del self._lines[: len(batch)]
        return False


_STREAM_EMIT = logging.StreamHandler.emit.__code__


def _shipped_as_a_record() -> bool:
    """Is this write a logging StreamHandler printing a record that our root handler ships
    too? (Then only the record, with its level, is shipped, not its text a second time.)"""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return False
        if frame.f_code is _STREAM_EMIT:
            record = frame.f_locals.get("record")
            if not isinstance(record, logging.LogRecord) or record.levelno < logging.INFO:
                return False
            logger: logging.Logger | None = logging.getLogger(record.name)
            while logger is not None:  # does the record propagate up to the root's handlers?
                if logger.parent is None:
                    return True
                if not logger.propagate:
                    return False
                logger = logger.parent
            return False
        frame = frame.f_back
    return False


class _LineWriter(io.TextIOBase):
    """A text stream that writes through to `target` and hands each complete line to the
    shipper (a partial line waits for its newline, or for `flush_partial`)."""

    def __init__(self, target: TextIO, shipper: LogShipper, stream: str) -> None:
        self._target = target
        self._shipper = shipper
        self._stream = stream
        self._partial = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._target.write(text)
        if _shipped_as_a_record():
            return len(text)  # the record was shipped once, with its level, by the handler
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._shipper.add(self._stream, line)
        return len(text)

    def flush(self) -> None:
        self._target.flush()

    def flush_partial(self) -> None:
        with self._lock:
            rest, self._partial = self._partial, ""
        if rest:
            self._shipper.add(self._stream, rest)

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target, "encoding", "utf-8")


#: Libraries that log every HTTP request at INFO: their INFO lines are not the run's.
_CHATTY = frozenset({"httpx", "httpcore"})


class _ShippingHandler(logging.Handler):
    """Sends every logging record (formatted, with its traceback if any) as one line."""

    def __init__(self, shipper: LogShipper) -> None:
        super().__init__(logging.INFO)
        self._shipper = shipper
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(__name__) or record.threadName == self._shipper.thread_name:
            return  # never ship what shipping logs (httpx's request lines): a feedback loop
        if record.name.split(".")[0] in _CHATTY and record.levelno < logging.WARNING:
            return  # one line per report request (metrics, events, logs) drowns the run's own
        try:
            self._shipper.add("log", self.format(record), level=record.levelname)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def capture_rank_logs(
    client: XsamClient, job_id: int, lease_token: str, rank: int, *, interval: float = 1.0
) -> Iterator[LogShipper]:
    """Capture this process's stdout, stderr and logging into a started `LogShipper` for the
    duration of the block; on exit the rest is sent (for up to 5 s) and everything restored."""
    shipper = LogShipper(client, job_id, lease_token, rank, interval=interval).start()
    out = _LineWriter(sys.stdout, shipper, "stdout")
    err = _LineWriter(sys.stderr, shipper, "stderr")
    handler = _ShippingHandler(shipper)
    root = logging.getLogger()
    saved_level = root.level
    saved_out, saved_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    root.addHandler(handler)
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield shipper
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
        sys.stdout, sys.stderr = saved_out, saved_err
        out.flush_partial()
        err.flush_partial()
        shipper.close()
