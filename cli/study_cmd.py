"""`xsam study submit|list|status|compare|cancel`: studies (arms × grid × seeds) over the REST API.

Like the job commands (cli/jobs_cmd.py): everything goes through `service.client`, errors
are one line on stderr (exit 1 for a service error, 2 for a usage or file error, 3 when the
service cannot be reached).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cli.jobs_cmd import _err, _schema_errors
from service.contract import TERMINAL, JobStatus, Stat, StudyPublic, StudyStatus

STATUSES = tuple(JobStatus)


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=None, help="API URL (default $XSAM_SERVER or :8000)")
    common.add_argument("--token", default=None, help="API token (default $XSAM_TOKEN)")
    sub = parser.add_subparsers(dest="study_command", metavar="SUBCOMMAND", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common])

    p = add("submit", "submit a study file (.yaml, .yml or .json)")
    p.add_argument("file", help="the study: {name?, base, arms?, grid?, seeds, baseline?, ...}")
    p = add("list", "list studies, newest first")
    p.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    p = add("status", "a table of the study's cells and their jobs' statuses")
    p.add_argument("study_id", type=int, metavar="ID")
    p.add_argument("--watch", action="store_true", help="redraw until every job has finished")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between redraws")
    p.add_argument("--json", action="store_true", help="print the Study as JSON")
    p = add("compare", "per cell mean ± sd over seeds, paired with the baseline")
    p.add_argument("study_id", type=int, metavar="ID")
    p.add_argument("--metric", default="test/acc", help="metric name (default test/acc)")
    p.add_argument("--mode", default="max", choices=("max", "min"), help="is higher better?")
    p.add_argument("--target", type=float, default=None, help="report the time to reach it")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="one CSV row per cell")
    fmt.add_argument("--json", action="store_true", help="the summary as JSON")
    p = add("cancel", "cancel every job of the study not yet finished")
    p.add_argument("study_id", type=int, metavar="ID")


def run(args: argparse.Namespace) -> int:
    from service.client import ApiError, ServiceUnreachable, XsamClient, default_server_and_token

    server, token = default_server_and_token(args.server, args.token)
    command = f"study {args.study_command}"
    try:
        with XsamClient(server, token) as api:
            return COMMANDS[args.study_command](api, args)
    except ServiceUnreachable:
        _err(command, f"cannot reach the XSAM service at {server} (is `xsam serve` running?)")
        return 3
    except ApiError as exc:
        detail = exc.detail if isinstance(exc.detail, str) else _schema_errors(exc.detail)
        hint = " (set --token or $XSAM_TOKEN)" if exc.status == 401 else ""
        _err(command, f"{detail} ({exc.code}, HTTP {exc.status}){hint}")
        return 1


def load_study(path: str | Path) -> dict[str, Any]:
    """A study body from a JSON or YAML file (by extension; YAML otherwise)."""
    import yaml

    path = Path(path)
    text = path.read_text()
    try:
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from exc
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a study is a mapping, got {type(spec).__name__}")
    return spec


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def submit(api, args: argparse.Namespace) -> int:
    try:
        spec = load_study(args.file)
    except (OSError, ValueError) as exc:
        _err("study submit", str(exc).replace("\n", " "))
        return 2
    study = api.submit_study(spec)
    print(study.id)
    jobs = sum(len(c.job_ids) for c in study.cells)
    print(f"study {study.id}: {len(study.cells)} cells × {len(study.seeds)} seeds = "
          f"{jobs} jobs queued", file=sys.stderr)  # fmt: skip
    return 0


def list_studies(api, args: argparse.Namespace) -> int:
    rows = [("ID", "STATUS", "NAME", "CELLS", "SEEDS", "DONE", "CREATED")]
    for s in api.list_studies(limit=args.limit).items:
        c = s.counts.model_dump()
        done = sum(c[status] for status in TERMINAL)
        rows.append((str(s.id), s.status, s.name or "-", str(len(s.cells)),
                     str(len(s.seeds)), f"{done}/{sum(c.values())}",
                     s.created_at.isoformat()[:19]))  # fmt: skip
    _table(rows)
    return 0


def _status_table(api, study: StudyPublic) -> None:
    jobs = api.iter_jobs(study=study.id, page_size=200)
    counts: dict[str, dict[str, int]] = {c.key: dict.fromkeys(STATUSES, 0) for c in study.cells}
    acc: dict[str, list[float]] = {c.key: [] for c in study.cells}
    for job in jobs:
        cell = job.cell or ""
        counts[cell][job.status] += 1
        latest = job.latest_metrics.get("test/acc")
        if latest is not None:
            acc[cell].append(latest.value)
    print(f"study {study.id}  {study.name or ''}  {study.status}".rstrip())
    rows = [("CELL", *(s.upper() for s in STATUSES), "TEST/ACC (latest, mean)")]
    for key, c in counts.items():
        mean = f"{sum(acc[key]) / len(acc[key]):.4f}" if acc[key] else "-"
        rows.append((key, *(str(c[s]) for s in STATUSES), mean))
    _table(rows)


def status(api, args: argparse.Namespace) -> int:
    study = api.get_study(args.study_id)
    if args.json:
        print(json.dumps(study.model_dump(mode="json"), indent=2))
        return 0
    while True:
        _status_table(api, study)
        if not args.watch or study.status is not StudyStatus.RUNNING:
            return 0
        time.sleep(args.interval)
        study = api.get_study(args.study_id)
        print()


def _ms(stat: Stat | None) -> str:
    if stat is None or stat.mean is None:
        return "-"
    sd = stat.sd
    return f"{stat.mean:.4f} ± {sd:.4f}" if sd is not None else f"{stat.mean:.4f}"


def _g(value: float | None, fmt: str = ".3g") -> str:
    return "-" if value is None else format(value, fmt)


def compare(api, args: argparse.Namespace) -> int:
    summary = api.study_summary(args.study_id, metric=args.metric, mode=args.mode,
                                target=args.target)  # fmt: skip
    if args.json:
        print(json.dumps(summary.model_dump(mode="json"), indent=2))
        return 0
    header = ["cell", "n", "final_mean", "final_sd", "final_ci95", "best_mean", "best_sd",
              "last5_mean", "last5_sd", "wall_s_mean", "baseline", "n_pairs", "final_diff",
              "final_t", "final_p", "final_wins", "alpha_final", "alpha_edge_share",
              "target_reached", "target_steps_mean", "target_wall_s_mean"]  # fmt: skip
    records = []
    for c in summary.cells:
        vs, alpha, tt = c.vs_baseline, c.alpha, c.to_target
        pair = vs.final if vs else None
        records.append([
            c.key, c.n, c.final.mean, c.final.sd, c.final.ci95,
            c.best.mean, c.best.sd, c.last5.mean, c.last5.sd,
            c.wall_s.mean, vs and vs.baseline_key, vs and vs.n_pairs,
            pair and pair.mean_diff, pair and pair.t, pair and pair.p, pair and pair.wins,
            alpha and alpha.final.mean, alpha and alpha.edge_share,
            tt and tt.reached, tt and tt.steps.mean, tt and tt.wall_s.mean,
        ])  # fmt: skip
    if args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(header)
        for r in records:
            writer.writerow(["" if v is None else v for v in r])
        return 0
    print(f"{summary.metric} ({summary.mode}), mean ± sd over seeds; "
          f"Δ and p: paired by seed against the baseline")  # fmt: skip
    rows = [("CELL", "N", "FINAL", "BEST", "LAST5", "WALL_S", "ΔFINAL", "P", "WINS", "α")]
    for c in summary.cells:
        vs, alpha = c.vs_baseline, c.alpha
        pair = vs.final if vs else None
        rows.append((
            c.key, str(c.n), _ms(c.final), _ms(c.best), _ms(c.last5),
            _g(c.wall_s.mean, ".1f"),
            _g(pair.mean_diff, "+.4f") if pair else "-",
            _g(pair.p) if pair else "-",
            f"{pair.wins}/{vs.n_pairs}" if pair and vs else "-",
            f"{_g(alpha.final.mean)} (edge {_g(alpha.edge_share, '.0%')})"
            if alpha and alpha.searches else "-",
        ))  # fmt: skip
    _table(rows)
    return 0


def cancel(api, args: argparse.Namespace) -> int:
    study = api.cancel_study(args.study_id)
    c = study.counts
    print(f"study {study.id} {study.status}: {c.cancelled} jobs cancelled"
          + (f", {c.running} stopping" if c.running else ""))  # fmt: skip
    return 0


COMMANDS = {
    "submit": submit,
    "list": list_studies,
    "status": status,
    "compare": compare,
    "cancel": cancel,
}
