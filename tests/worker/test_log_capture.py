"""A rank's stdout, stderr and logging, captured line by line and shipped in batches."""

from __future__ import annotations

import logging
import sys
import threading

from service.client import LeaseLost
from worker.log_capture import LogShipper, capture_rank_logs


class FakeClient:
    """Records what `ingest_logs` was sent; ``lost`` makes it answer like a 409."""

    def __init__(self) -> None:
        self.batches: list[list[dict]] = []
        self.lost = False
        self.lock = threading.Lock()

    def ingest_logs(self, job_id, lease_token, lines):
        if self.lost:
            raise LeaseLost(409, "lease_lost", "gone")
        with self.lock:
            self.batches.append([dict(line) for line in lines])
        return {"received": len(lines), "inserted": len(lines)}

    @property
    def lines(self) -> list[dict]:
        return [line for batch in self.batches for line in batch]


def test_print_stderr_and_logging_are_shipped_in_order_with_streams_and_levels(capsys):
    client = FakeClient()
    before = (sys.stdout, sys.stderr, logging.getLogger().handlers[:])
    with capture_rank_logs(client, 7, "lease", rank=1, interval=0.05):
        print("hello")
        sys.stdout.write("part ")
        sys.stdout.write("one\nsecond line\n")
        print("to stderr", file=sys.stderr)
        logging.getLogger("xsam.training").info("epoch %d done", 1)
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("lib").exception("it failed")
        sys.stdout.write("no newline at the end")
    got = [(line["stream"], line["level"], line["text"]) for line in client.lines]
    assert got[:5] == [
        ("stdout", None, "hello"),
        ("stdout", None, "part one"),
        ("stdout", None, "second line"),
        ("stderr", None, "to stderr"),
        ("log", "INFO", "xsam.training: epoch 1 done"),
    ]
    assert got[5][:2] == ("log", "ERROR") and "ValueError: boom" in got[5][2]
    assert "Traceback (most recent call last)" in got[5][2]
    assert got[6] == ("stdout", None, "no newline at the end")
    seqs = [line["seq"] for line in client.lines]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert {line["rank"] for line in client.lines} == {1}
    # Still written through to the process's own streams, which are restored afterwards.
    assert "hello" in capsys.readouterr().out
    assert (sys.stdout, sys.stderr, logging.getLogger().handlers) == before


def test_a_stream_handler_record_is_shipped_once_as_a_record():
    client = FakeClient()
    handler = logging.StreamHandler()  # writes to sys.stderr as it is at emit time
    lib = logging.getLogger("noisy.lib")
    lib.addHandler(handler)
    try:
        with capture_rank_logs(client, 7, "lease", rank=0, interval=0.05):
            handler.setStream(sys.stderr)
            lib.warning("careful")
    finally:
        lib.removeHandler(handler)
    assert [(line["stream"], line["text"]) for line in client.lines] == [
        ("log", "noisy.lib: careful")
    ]


def test_a_lost_lease_stops_shipping_and_a_restarted_rank_numbers_above_the_old_one():
    client = FakeClient()
    first = LogShipper(client, 7, "lease", 0, interval=0.05).start()
    first.add("stdout", "a")
    first.close()
    second = LogShipper(client, 7, "lease", 0, interval=0.05).start()
    second.add("stdout", "b")
    second.close()
    assert client.lines[1]["seq"] > client.lines[0]["seq"]
    client.lost = True
    third = LogShipper(client, 7, "lease", 0, interval=0.05).start()
    third.add("stdout", "c")
    assert third.close() == 0
    third.add("stdout", "d")  # ignored: the lease is gone
    assert len(client.lines) == 2


def test_http_request_lines_are_not_shipped():
    client = FakeClient()
    with capture_rank_logs(client, 7, "lease", rank=0, interval=0.05):
        logging.getLogger("httpx").info("HTTP Request: POST http://x/v1/agent/jobs/7/metrics")
        logging.getLogger("httpx").warning("retrying")
    assert [line["text"] for line in client.lines] == ["httpx: retrying"]


def test_flush_delivers_what_is_buffered_while_capture_goes_on():
    """A rank flushes before it reports its outcome: the agent then ends the lease, and lines
    sent after that would be refused. With a shipping interval far longer than the test, only
    flush() can have sent them."""
    client = FakeClient()
    with capture_rank_logs(client, 7, "lease", rank=0, interval=60) as shipper:
        print("Traceback (most recent call last):", file=sys.stderr)
        print("DivergedError: at step 4", file=sys.stderr)
        assert shipper.flush(5.0)
        assert [line["text"] for line in client.lines] == [
            "Traceback (most recent call last):",
            "DivergedError: at step 4",
        ]
        print("still captured")
    assert client.lines[-1]["text"] == "still captured"
