"""`xsam train CONFIG` — train one config locally with no service, with a progress bar.

Exit codes: 0 trained (or stopped by Ctrl-C after a checkpoint), 2 the config is invalid,
1 the run failed for a reason a retry cannot fix (missing data, diverged, …).
"""

from __future__ import annotations

import argparse
import csv
import json
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

from xsam.records import EventRecord, FitEvent, FitRecord, MetricsRecord


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("config", help="TrainConfig file (.yaml, .yml or .json)")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="write metrics.jsonl (or .csv), events.jsonl, model.pt and checkpoint.pt here",
    )
    parser.add_argument(
        "--data-root", metavar="D", help="data root (default $XSAM_DATA_ROOT or ~/.cache/xsam/data)"
    )
    parser.add_argument("--epochs", type=int, metavar="N", help="override schedule.epochs")
    parser.add_argument(
        "--format", choices=("jsonl", "csv"), default="jsonl", help="metrics file format"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from --out DIR/checkpoint.pt if present"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


class _Recorder:
    """Receives fit()'s report records: progress bar, metrics and events files."""

    def __init__(self, out: Path | None, fmt: str, progress: bool) -> None:
        self.bar: Any = None
        self.progress = progress
        self.latest: dict[str, float] = {}
        self.metrics_file: TextIO | None = None
        self.events_file: TextIO | None = None
        self.csv_writer: Any = None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            self.metrics_file = (out / f"metrics.{fmt}").open("a", newline="")
            self.events_file = (out / "events.jsonl").open("a")
            if fmt == "csv":
                self.csv_writer = csv.writer(self.metrics_file)
                if self.metrics_file.tell() == 0:
                    self.csv_writer.writerow(["step", "epoch", "name", "value"])

    def __call__(self, record: FitRecord) -> None:
        if record["kind"] == "metrics":
            self._metrics(record)
        else:
            self._event(record)

    def _metrics(self, record: MetricsRecord) -> None:
        self.latest.update(record["values"])
        for name, value in record["values"].items():
            if self.csv_writer is not None:
                self.csv_writer.writerow([record["step"], record["epoch"], name, value])
            elif self.metrics_file is not None:
                row = {"step": record["step"], "epoch": record["epoch"], "name": name}
                self.metrics_file.write(json.dumps({**row, "value": value}) + "\n")
        if self.bar is not None:
            self.bar.n = record["step"]
            post: dict[str, object] = {"epoch": record["epoch"]}
            for key, label in (("train/loss", "loss"), ("train/acc", "acc"), ("xsam/alpha", "α")):
                if key in self.latest:
                    post[label] = f"{self.latest[key]:.4g}"
            for key, label in (("val/acc", "val_acc"), ("test/acc", "test_acc")):
                if key in self.latest:
                    post[label] = f"{self.latest[key]:.4f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.refresh()

    def _event(self, record: EventRecord) -> None:
        if self.events_file is not None:
            self.events_file.write(json.dumps(record, default=str) + "\n")
            self.events_file.flush()
        if record["type"] == FitEvent.STARTED and self.progress:
            from tqdm import tqdm

            data = record["data"]
            self.bar = tqdm(
                total=data["total_steps"], initial=data["start_step"], unit="step", file=sys.stderr
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for f in (self.metrics_file, self.events_file):
            if f is not None:
                f.close()


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from xsam.config import load_config, locate_error
    from xsam.errors import ConfigurationError

    try:
        config = load_config(args.config)
        if args.epochs is not None:
            config.schedule.epochs = args.epochs
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # the --epochs override, validated on assignment
        reasons = (locate_error(e["loc"], e["msg"])[1] for e in exc.errors())
        print("error: --epochs: " + "; ".join(reasons), file=sys.stderr)
        return 2

    # Imported only now: `xsam train --help` and config errors need no torch.
    from xsam.errors import XsamError
    from xsam.training import fit

    out = Path(args.out) if args.out else None
    resume = None
    if args.resume and out is not None and (out / "checkpoint.pt").exists():
        resume = out / "checkpoint.pt"
    recorder = _Recorder(out, args.format, progress=not args.no_progress)
    stop = {"requested": False}

    def on_interrupt(signum, frame) -> None:
        # First Ctrl-C: stop after this step with a checkpoint; a second one aborts.
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        print("\nstopping after this step (Ctrl-C again to abort)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        summary = fit(
            config,
            report=recorder,
            checkpoint_dir=out,
            resume_from=resume,
            should_stop=lambda: stop["requested"],
            data_root=args.data_root,
            weights_out=out / "model.pt" if out is not None else None,
        )
    except ConfigurationError as exc:
        recorder.close()
        print(f"error: invalid config: {exc}", file=sys.stderr)
        return 2
    except XsamError as exc:
        recorder.close()
        print(f"error ({exc.code}): {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
    recorder.close()
    m = summary["metrics"]
    parts = [
        f"{summary['status']}: {summary['epochs_completed']} epochs, {summary['steps']} steps "
        f"in {summary['fit_seconds']:.1f} s",
    ]
    for split in ("val", "test"):
        if f"{split}/acc" in m:
            parts.append(
                f"{split}/acc {m[f'{split}/acc']:.4f}  {split}/loss {m[f'{split}/loss']:.4f}"
            )
    if "train/loss" in m:
        parts.append(f"train/loss {m['train/loss']:.4f}")
    if summary["alpha"] is not None:
        parts.append(f"α {summary['alpha']:.3g}")
    print("  ".join(parts))
    if out is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"outputs in {out}")
    return 0
