"""`xsam logs [-f] JOB [--rank R] [--attempt A]`: a job's log lines (every rank's stdout,
stderr and logging), over the REST API; ``-f`` follows a running job until it ends."""

from __future__ import annotations

import argparse
import sys
import time

from cli import jobs_cmd
from service.contract import TERMINAL, LogLinePublic


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--server", default=None, help="API URL (default $XSAM_SERVER or :8000)")
    parser.add_argument("--token", default=None, help="API token (default $XSAM_TOKEN)")
    parser.add_argument("job_id", type=int, metavar="JOB")
    parser.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    parser.add_argument("--rank", type=int, default=None, help="only this rank's lines")
    parser.add_argument("--attempt", type=int, default=None, help="only this attempt's lines")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between polls with -f (default 1)"
    )


def run(args: argparse.Namespace) -> int:
    # The same server/token defaults and one-line errors as the other client commands.
    jobs_cmd.COMMANDS.setdefault("logs", logs)
    return jobs_cmd.run(args)


def _line(item: LogLinePublic, many_ranks: bool) -> str:
    prefix = f"[a{item.attempt} r{item.rank}] " if many_ranks else ""
    level = f"{item.level} " if item.level else ""
    return f"{prefix}{level}{item.text}"


def logs(api, args: argparse.Namespace) -> int:
    after, warned = 0, 0
    filters = {"attempt": args.attempt, "rank": args.rank}
    prefix = args.rank is None or args.attempt is None
    while True:
        # Read the job before the page: once it is terminal, one more drain gets every line.
        status = api.get_job(args.job_id).status if args.follow else None
        while True:
            page = api.logs(args.job_id, after=after, **filters)
            for item in page.items:
                print(_line(item, prefix))
            after = page.next_after
            if page.dropped > warned:
                warned = page.dropped
                print(f"xsam logs: {warned} lines were dropped from the middle of this job's "
                      "log (per-job cap)", file=sys.stderr)  # fmt: skip
            if not page.items:
                break
        sys.stdout.flush()
        if not args.follow or status in TERMINAL:
            return 0
        time.sleep(args.interval)
