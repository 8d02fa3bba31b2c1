"""The client commands: `xsam submit|list|status|watch|metrics|cancel`, over the REST API.

Everything goes through `service.client.XsamClient` (no torch, no ray needed). The server and
token come from ``--server``/``--token``, else $XSAM_SERVER/$XSAM_TOKEN, else the local
`xsam serve` (http://127.0.0.1:8000 and the admin token it wrote). Errors are one line on
stderr, never a traceback: exit 1 for a service error, 2 for a usage or config error, 3 when
the service cannot be reached.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any

from cli.terminal_text import iso_time
from service.contract import EventType, JobPublic, JobStatus, Progress


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--server", default=None, help="API URL (default $XSAM_SERVER or :8000)")
    parser.add_argument("--token", default=None, help="API token (default $XSAM_TOKEN)")
    if name == "submit":
        parser.add_argument("config", help="TrainConfig file (.yaml, .yml or .json)")
        parser.add_argument("--name", default=None, help="a name for the job")
        parser.add_argument("--priority", type=int, default=0, help="higher runs first")
        parser.add_argument("--tag", action="append", default=[], help="a tag (repeat for several)")
        parser.add_argument("--max-attempts", type=int, default=None, help="retries + 1")
        parser.add_argument(
            "--idempotency-key", default=None, help="submitting again with it returns the same job"
        )
    elif name == "list":
        parser.add_argument("--status", default=None, choices=[s.value for s in JobStatus])
        parser.add_argument("--tag", default=None, help="only jobs with this tag")
        parser.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    elif name in ("status", "watch", "cancel"):
        parser.add_argument("job_id", type=int, metavar="ID")
        if name == "status":
            parser.add_argument("--json", action="store_true", help="print the Job as JSON")
        if name == "watch":
            parser.add_argument(
                "--interval", type=float, default=1.0, help="seconds between polls (default 1)"
            )
    elif name == "metrics":
        parser.add_argument("job_id", type=int, metavar="ID")
        parser.add_argument("--names", default=None, help="comma-separated metric names")
        parser.add_argument("--csv", action="store_true", help="CSV: name,step,epoch,value")
        parser.add_argument("--max-points", type=int, default=None, help="downsample per series")


def run(args: argparse.Namespace) -> int:
    from cli.terminal_text import EscapedClient, escape_controls
    from service.client import (
        ApiError,
        LocalSecretRefused,
        ServiceUnreachable,
        XsamClient,
        default_server_and_token,
    )

    command = args.command
    try:
        server, token = default_server_and_token(args.server, args.token)
    except LocalSecretRefused as exc:
        _err(command, str(exc))
        return 2
    try:
        with XsamClient(server, token) as api:
            # Whatever the service says is printed with its control characters escaped.
            return COMMANDS[command](EscapedClient(api), args)
    except ServiceUnreachable:
        _err(command, f"cannot reach the XSAM service at {server} (is `xsam serve` running?)")
        return 3
    except ApiError as exc:
        detail = exc.detail if isinstance(exc.detail, str) else _schema_errors(exc.detail)
        hint = " (set --token or $XSAM_TOKEN)" if exc.status == 401 else ""
        _err(command, escape_controls(f"{detail} ({exc.code}, HTTP {exc.status}){hint}"))
        return 1


def _err(command: str, message: str) -> None:
    print(f"xsam {command}: {message}", file=sys.stderr)


def _schema_errors(detail: Any) -> str:
    """FastAPI's 422 body as ``loc: msg`` items on one line."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
            parts.append(f"{loc}: {item.get('msg', item)}" if loc else str(item.get("msg", item)))
        return "; ".join(parts)
    return json.dumps(detail)


# --- the commands --------------------------------------------------------------------------


def submit(api, args: argparse.Namespace) -> int:
    from xsam.config import load_config
    from xsam.errors import ConfigurationError

    try:
        config = load_config(args.config)
    except ConfigurationError as exc:
        _err("submit", str(exc).replace("\n", " "))
        return 2
    job = api.submit(
        config.model_dump(mode="json"),
        name=args.name,
        priority=args.priority,
        max_attempts=args.max_attempts,
        tags=args.tag,
        idempotency_key=args.idempotency_key,
    )
    print(job.id)
    where = f", position {job.queue_position} in the queue" if job.queue_position else ""
    print(f"job {job.id} {job.status}{where}", file=sys.stderr)
    return 0


def list_jobs(api, args: argparse.Namespace) -> int:
    page = api.list_jobs(status=args.status, tag=args.tag, limit=args.limit)
    rows = [("ID", "STATUS", "NAME", "PROGRESS", "ATTEMPT", "CREATED")]
    for job in page.items:
        rows.append(
            (
                str(job.id),
                job.status,
                job.name or "-",
                _progress_text(job),
                f"{job.attempt}/{job.max_attempts}",
                job.created_at.isoformat()[:19],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _progress_text(job: JobPublic) -> str:
    p = job.progress or Progress()
    if job.status is JobStatus.QUEUED and job.queue_position:
        return f"#{job.queue_position} in queue"
    if p.epoch is not None and p.epochs:
        return f"epoch {p.epoch}/{p.epochs}"
    return "-"


def status(api, args: argparse.Namespace) -> int:
    if args.json:  # JSON escapes control characters itself: print the reply as it is
        print(json.dumps(api.raw.get_job(args.job_id).model_dump(mode="json"), indent=2))
        return 0
    job = api.get_job(args.job_id)
    print(f"job {job.id}  {job.name or ''}".rstrip())
    print(f"  status    {job.status}" + ("  (cancel requested)" if job.cancel_requested and job.status is JobStatus.RUNNING else ""))  # fmt: skip
    print(f"  attempt   {job.attempt} of {job.max_attempts}")
    print(f"  progress  {_progress_text(job)}")
    cfg = job.config
    model, data = cfg.get("model", {}).get("name"), cfg.get("data", {}).get("name")
    opt = cfg.get("optimizer", {}).get("name", "xsam")
    print(f"  config    {model} on {data} with {opt}")
    for key in ("created_at", "started_at", "finished_at"):
        if when := getattr(job, key):
            print(f"  {key.removesuffix('_at'):9} {iso_time(when)}")
    for name, point in sorted(job.latest_metrics.items()):
        print(f"  {name:28} {point.value:.6g}  (step {point.step})")
    if job.error:
        print(f"  error     {job.error.type}: {job.error.message}")
    for line in environment_lines(api, job):
        print(f"  {line}")
    return 0


def environment_lines(api, job: JobPublic) -> list[str]:
    """The latest attempt's run environment (its ``environment`` events), as text."""
    envs: list[dict[str, Any]] = []
    after = 0
    while True:
        page = api.events(job.id, after=after, limit=1000, type=EventType.ENVIRONMENT)
        envs += [e.data for e in page.items if e.data]
        if not page.items:
            break
        after = page.next_after
    if not envs:
        return []
    attempt = max(e.get("attempt") or 0 for e in envs)
    ranks = sorted((e for e in envs if (e.get("attempt") or 0) == attempt),
                   key=lambda e: e.get("rank") or 0)  # fmt: skip
    first = ranks[0]
    versions = ", ".join(
        f"{label} {first[key]}"
        for label, key in (("xsam", "xsam"), ("git", "git"), ("python", "python"),
                           ("torch", "torch"), ("CUDA", "cuda"), ("NCCL", "nccl"), ("ray", "ray"))
        if first.get(key)
    )  # fmt: skip
    gpus = f"{first['gpus']}× {first['gpu']}" if first.get("gpu") else "no GPU"
    hosts = ", ".join(f"{e.get('rank')}:{e.get('host')}" for e in ranks)
    return [f"run env   (attempt {attempt}) {versions}; {gpus}", f"hosts     {hosts}"]


def watch(api, args: argparse.Namespace) -> int:
    """A live progress bar (steps) with loss, accuracy and α until the job ends."""
    from tqdm import tqdm

    bar = None

    def show(job: JobPublic) -> None:
        nonlocal bar
        p = job.progress or Progress()
        if bar is None and job.status is JobStatus.QUEUED:
            print(f"job {job.id}: queued (position {job.queue_position})", file=sys.stderr)
        if bar is None and p.steps:
            bar = tqdm(total=p.steps, unit="step", desc=f"job {job.id}", file=sys.stderr)
        if bar is not None:
            bar.n = min(p.step or 0, bar.total or 0)
            bar.set_postfix(_postfix(job, p), refresh=False)
            bar.refresh()

    job = api.wait_for_job(args.job_id, poll_s=args.interval, on_poll=show)
    if bar is not None:
        if job.status is JobStatus.SUCCEEDED:
            bar.n = bar.total or 0
            bar.refresh()
        bar.close()
    message = f"job {job.id} {job.status}"
    if job.error:
        message += f": {job.error.type}: {job.error.message}"
    latest = job.latest_metrics
    shown = [f"{k} {latest[k].value:.4f}" for k in ("val/acc", "test/acc") if k in latest]
    if shown:
        message += f" ({', '.join(shown)})"
    print(message)
    return 0 if job.status is JobStatus.SUCCEEDED else 1


def _postfix(job: JobPublic, p: Progress) -> dict[str, str]:
    latest = job.latest_metrics
    post = {}
    if p.epoch is not None:
        post["epoch"] = f"{p.epoch}/{p.epochs}"
    for key, label in (("train/loss", "loss"), ("train/acc", "acc"), ("val/acc", "val_acc"),
                       ("test/acc", "test_acc"), ("xsam/alpha", "α")):  # fmt: skip
        if key in latest:
            post[label] = f"{latest[key].value:.4g}"
    return post


def metrics(api, args: argparse.Namespace) -> int:
    names = [n for n in args.names.split(",") if n] if args.names else None
    series = api.metrics(args.job_id, names=names, max_points=args.max_points).series
    if args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["name", "step", "epoch", "value"])
        for name, points in sorted(series.items()):
            for pt in points:
                writer.writerow([name, pt.step, pt.epoch, pt.value])
        return 0
    if not series:
        print(f"job {args.job_id}: no metrics yet", file=sys.stderr)
        return 0
    for name, points in sorted(series.items()):
        last = points[-1]
        values = [pt.value for pt in points]
        print(f"{name:30} {len(points):5} points  last {last.value:.6g} (step {last.step})"
              f"  min {min(values):.6g}  max {max(values):.6g}")  # fmt: skip
    return 0


def cancel(api, args: argparse.Namespace) -> int:
    job = api.cancel(args.job_id)
    if job.status is JobStatus.CANCELLED:
        print(f"job {job.id} cancelled")
    else:
        print(f"job {job.id}: cancel requested; it stops within seconds")
    return 0


COMMANDS = {
    "submit": submit,
    "list": list_jobs,
    "status": status,
    "watch": watch,
    "metrics": metrics,
    "cancel": cancel,
}
