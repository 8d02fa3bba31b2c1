"""`xsam export JOB|--study ID --to tensorboard|csv|mlflow DEST`: a job's (or a study's jobs')
series, read over the REST API at full resolution, written where the user's own tools read them.

- ``tensorboard``: one run directory per job (``DEST/job-<id>/``, or
  ``DEST/study-<id>/<cell>/job-<id>/``) with an event file written by TensorBoard's own writer;
  every point is a scalar whose value is stored as a 64-bit float, so what TensorBoard reads
  back equals the API's raw point.
- ``csv``: ``DEST/job-<id>.csv`` (or ``DEST/study-<id>.csv``) with
  ``job_id,cell,seed,name,step,epoch,value,time``.
- ``mlflow``: DEST is a tracking URI (``http://host:5000``, or a local path); one run per job in
  the experiment ``--experiment`` (default ``xsam``), with the config as parameters (dotted
  paths), every series as metrics at their steps, and tags ``xsam.job_id``, ``xsam.study_id``,
  ``xsam.cell``. Needs the ``mlflow`` extra.

Series longer than one response are read in step windows (the API downsamples beyond
``max_points``; the buckets' ``step_min``/``step_max``/``count`` say where to cut), so the export
is never downsampled.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from cli import jobs_cmd
from service.contract import JobPublic, JobStatus, MetricsPublic

#: The most points the metrics endpoint returns undownsampled in one response.
MAX_POINTS = 100_000


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--server", default=None, help="API URL (default $XSAM_SERVER or :8000)")
    parser.add_argument("--token", default=None, help="API token (default $XSAM_TOKEN)")
    parser.add_argument("job_id", type=int, nargs="?", metavar="JOB", help="a job's id")
    parser.add_argument("--study", type=int, default=None, metavar="ID", help="a study's jobs")
    # `--to FORMAT DEST` as one option, so that JOB may come first: argparse cannot place an
    # optional positional before a required one when options come between them.
    parser.add_argument("--to", nargs=2, required=True,
                        metavar=("{tensorboard,csv,mlflow}", "DEST"),
                        help="the format, and a directory to write into (created), or for "
                        "mlflow a tracking URI")  # fmt: skip
    parser.add_argument("--experiment", default="xsam", help="the MLflow experiment (mlflow)")


def run(args: argparse.Namespace) -> int:
    args.format, dest = args.to
    args.dest = dest
    if args.format not in ("tensorboard", "csv", "mlflow"):
        jobs_cmd._err("export", f"--to {args.format!r}: choose tensorboard, csv or mlflow")
        return 2
    if (args.job_id is None) == (args.study is None):
        jobs_cmd._err("export", "give a JOB id or --study ID (one of them)")
        return 2
    jobs_cmd.COMMANDS.setdefault("export", export)
    return jobs_cmd.run(args)


def raw_series(api, job_id: int) -> dict[str, list[dict[str, Any]]]:
    """Every point of every series of the job, undownsampled, in step order."""
    overview = _as_json(api.metrics(job_id, max_points=MAX_POINTS))
    out: dict[str, list[dict[str, Any]]] = {}
    for name, points in overview.items():
        if not points or "count" not in points[0]:
            out[name] = points  # short enough: these are the raw points
            continue
        out[name] = []
        for since, until in _windows(points):
            window = _as_json(
                api.metrics(
                    job_id, names=[name], since_step=since, until_step=until, max_points=MAX_POINTS
                )
            ).get(name, [])
            out[name].extend(window)
    return out


def _as_json(page: MetricsPublic) -> dict[str, list[dict[str, Any]]]:
    # The files hold the points as the API sends them (times as ISO text).
    return {name: [p.model_dump(mode="json") for p in pts] for name, pts in page.series.items()}


def _windows(buckets: list[dict[str, Any]]) -> Iterator[tuple[int, int]]:
    """Step ranges of consecutive buckets holding at most MAX_POINTS points each."""
    start: int | None = None
    count, last = 0, 0
    for b in buckets:
        if start is not None and count + b["count"] > MAX_POINTS:
            yield start, last
            start, count = None, 0
        if start is None:
            start = b["step_min"]
        count += b["count"]
        last = b["step_max"]
    if start is not None:
        yield start, last


def _jobs(api, args: argparse.Namespace) -> list[JobPublic]:
    if args.study is None:
        return [api.get_job(args.job_id)]
    return sorted(api.iter_jobs(study=args.study, page_size=200), key=lambda j: j.id)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_") or "cell"


def export(api, args: argparse.Namespace) -> int:
    jobs = _jobs(api, args)
    if args.format == "mlflow":
        for job in jobs:
            run_id = write_mlflow(args.dest, args.experiment, job, raw_series(api, job.id))
            print(f"job {job.id}: MLflow run {run_id}")
        return 0
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    if args.format == "csv":
        path = dest / (f"study-{args.study}.csv" if args.study else f"job-{args.job_id}.csv")
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["job_id", "cell", "seed", "name", "step", "epoch", "value", "time"])
            for job in jobs:
                for name, points in sorted(raw_series(api, job.id).items()):
                    for p in points:
                        writer.writerow([job.id, job.cell or "", job.config.get("seed"),
                                         name, p["step"], p.get("epoch") if p.get("epoch") is not None else "",
                                         repr(p["value"]), p.get("time") or ""])  # fmt: skip
        print(f"wrote {path}")
        return 0
    for job in jobs:
        run_dir = dest / f"job-{job.id}"
        if args.study is not None:
            run_dir = dest / f"study-{args.study}" / _safe(job.cell or "") / f"job-{job.id}"
        write_tensorboard(run_dir, raw_series(api, job.id))
        print(f"wrote {run_dir}")
    return 0


def write_tensorboard(run_dir: Path, series: dict[str, list[dict[str, Any]]]) -> None:
    """One event file in `run_dir` with every point as a 64-bit scalar (tag = series name)."""
    try:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.scalar import metadata
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        from tensorboard.util import tensor_util
    except ImportError as exc:
        raise SystemExit(
            f"xsam export --to tensorboard needs the tensorboard package "
            f"(pip install 'xsam-service[export]'): {exc}"
        ) from None
    import numpy as np

    run_dir.mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(run_dir))
    try:
        for name, points in sorted(series.items()):
            meta = metadata.create_summary_metadata(display_name=name, description="")
            for p in points:
                value = Summary.Value(
                    tag=name,
                    metadata=meta,
                    tensor=tensor_util.make_tensor_proto(np.float64(p["value"])),
                )
                writer.add_event(Event(wall_time=_wall_time(p.get("time")), step=int(p["step"]),
                                       summary=Summary(value=[value])))  # fmt: skip
    finally:
        writer.close()


def _wall_time(time: str | None) -> float:
    return datetime.fromisoformat(time).timestamp() if time else 0.0


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{path}."))
        else:
            out[path] = str(value)[:6000]  # MLflow's limit on a parameter's value
    return out


def write_mlflow(
    tracking_uri: str, experiment: str, job: JobPublic, series: dict[str, list[dict]]
) -> str:
    """One MLflow run for the job; returns its run id."""
    try:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise SystemExit(
            f"xsam export --to mlflow needs mlflow (pip install 'xsam-service[mlflow]'): {exc}"
        ) from None
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    tags = {"xsam.job_id": str(job.id), "xsam.status": str(job.status)}
    if job.study_id is not None:
        tags.update({"xsam.study_id": str(job.study_id), "xsam.cell": job.cell or ""})
    run = client.create_run(experiment_id, run_name=job.name or f"job-{job.id}",
                            tags=tags)  # fmt: skip
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in sorted(_flatten(job.config).items())]
    for i in range(0, len(params), 100):  # MLflow's limit on parameters per batch
        client.log_batch(run_id, params=params[i : i + 100])
    metrics = [
        Metric(name, float(p["value"]), int(_wall_time(p.get("time")) * 1000), int(p["step"]))
        for name, points in sorted(series.items())
        for p in points
    ]
    for i in range(0, len(metrics), 1000):  # MLflow's limit on metrics per batch
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    status = {JobStatus.SUCCEEDED: "FINISHED", JobStatus.FAILED: "FAILED",
              JobStatus.CANCELLED: "KILLED"}  # fmt: skip
    client.set_terminated(run_id, status.get(job.status, "FINISHED"))
    return run_id
