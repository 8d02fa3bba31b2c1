"""The Python half of bench/gpu_check.sh: the environment report, the end-to-end jobs and the
summary. The shell script owns the order of the stages and their time limits; each subcommand
here is one stage (or the summary) and needs only what that stage needs, so that a missing
package fails or skips one stage, never the whole check.

    python bench/gpu_check.py env OUT/env.txt
    python bench/gpu_check.py pytest OUT/junit.xml                # pytest -m gpu tests/gpu
    python bench/gpu_check.py e2e-train --device cuda WORK        # `xsam train`, no Ray
    python bench/gpu_check.py e2e-serve --device cuda WORK        # `xsam serve --num-gpus 1`
    python bench/gpu_check.py summary OUT STAGES_TSV

Exit status of a stage: 0 passed, 1 failed, 3 skipped (its last line says why).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = 3
#: What the serve stage imports beyond the train stage (the API, the queue, Ray).
SERVE_MODULES = ("ray", "fastapi", "uvicorn", "sqlalchemy", "alembic", "pydantic_settings")
#: Distribution names where they differ from the module's.
DISTRIBUTIONS = {"yaml": "PyYAML", "pydantic_settings": "pydantic-settings"}
#: Targets of issue 14 for ResNet-18 at batch 125 with one search per epoch.
TARGETS = {"XSAM/SAM": 1.02, "SAM/SGD": 2.05, "gpu_busy": 0.90}


def skip(reason: str) -> int:
    print(f"SKIPPED: {reason}", flush=True)
    return SKIPPED


# -- env ------------------------------------------------------------------------------------


def env_report(out: Path) -> int:
    lines = [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"python: {sys.version.split()[0]} ({sys.executable})",
        f"platform: {platform.platform()}, {os.cpu_count()} CPUs",
    ]
    # Found, not imported (ray alone takes seconds to import): version and where it lies.
    for name in ("torch", "numpy", "pydantic", "pydantic_core", "yaml", "pytest", *SERVE_MODULES):
        spec = importlib.util.find_spec(name)
        if spec is None:
            lines.append(f"{name}: not installed")
            continue
        dist = DISTRIBUTIONS.get(name, name)
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        lines.append(f"{name}: {version} ({spec.origin})")
    cuda_ok = False
    with contextlib.suppress(Exception):
        import torch

        cuda_ok = torch.cuda.is_available()
        lines.append(f"torch.version.cuda: {torch.version.cuda}")
        lines.append(f"cudnn: {torch.backends.cudnn.version()}")
        lines.append(f"cuda available: {cuda_ok}")
        if cuda_ok:
            props = torch.cuda.get_device_properties(0)
            lines.append(
                f"device 0: {props.name}, capability {props.major}.{props.minor}, "
                f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs"
            )
    smi = shutil.which("nvidia-smi")
    if smi:
        for args in (
            [
                "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm,"
                "temperature.gpu,utilization.gpu,mig.mode.current",
                "--format=csv",
            ],
            ["-q"],
        ):
            try:
                got = subprocess.run(
                    [smi, *args], capture_output=True, text=True, timeout=30, check=False
                )
                text = got.stdout.strip().splitlines()
                lines += ["", f"$ nvidia-smi {' '.join(args)}", *text[:120]]
            except (OSError, subprocess.TimeoutExpired) as exc:
                lines.append(f"nvidia-smi {args[0]}: {exc}")
    else:
        lines.append("nvidia-smi: not found")
    out.write_text("\n".join(lines) + "\n")
    print(f"cuda available: {cuda_ok}")
    return 0


# -- pytest -m gpu ------------------------------------------------------------------------------


def run_pytest(junit: Path) -> int:
    """``pytest -m gpu tests/gpu``; "skipped" (not "passed") when every test was skipped."""
    cmd = [
        sys.executable, "-m", "pytest", "tests/gpu", "-m", "gpu", "-q", "-p", "no:cacheprovider",
        f"--junitxml={junit}",
    ]  # fmt: skip
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT)
    counts = junit_counts(junit)
    if rc == 0 and counts and counts["tests"] and counts["skipped"] == counts["tests"]:
        return skip(f"all {counts['tests']} gpu tests skipped (no CUDA here)")
    if rc != 0 and counts:
        print(
            f"FAILED: {counts['failures']} failed, {counts['errors']} errors of {counts['tests']}"
        )
    return 0 if rc == 0 else 1


# -- end-to-end jobs --------------------------------------------------------------------------


def job_config(device: str, quick: bool) -> dict[str, Any]:
    """ResNet-18 on CIFAR-shaped synthetic data; tiny on the CPU (--quick) so CI stays fast."""
    if quick:
        shape, width, num_train, batch, epochs = [3, 8, 8], 4, 64, 32, 1
    else:
        shape, width, num_train, batch, epochs = [3, 32, 32], 64, 5000, 125, 2
    return {
        "model": {"name": "resnet18", "options": {"width": width}},
        "data": {
            "name": "synthetic",
            "batch_size": batch,
            "augment": True,
            "options": {"shape": shape, "num_train": num_train, "num_test": batch * 2},
        },
        "optimizer": {"name": "xsam", "search_every": "epoch"},
        "schedule": {"epochs": epochs},
        "resources": {"num_workers": 1, "use_gpu": device == "cuda"},
        "precision": "bf16" if device == "cuda" else "fp32",
        "cudnn_benchmark": device == "cuda",
        "log_every": 10,
    }


def check_cuda(device: str) -> str | None:
    if device != "cuda":
        return None
    try:
        import torch
    except ImportError as exc:
        return f"torch is not importable: {exc}"
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    return None


def e2e_train(device: str, work: Path, quick: bool) -> int:
    """`python -m cli train` on the job's config: fit() on the device with no service, no Ray."""
    reason = check_cuda(device)
    if reason:
        return skip(reason)
    from xsam.records import FitEvent, FitOutcome

    work.mkdir(parents=True, exist_ok=True)
    config = job_config(device, quick)
    path = work / "train.json"
    path.write_text(json.dumps(config, indent=2))
    out = work / "train-out"
    cmd = [sys.executable, "-m", "cli", "train", str(path), "--out", str(out), "--no-progress"]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT, env={**os.environ, "XSAM_DATA_ROOT": str(work / "data")})
    wall = time.perf_counter() - t0
    if rc != 0:
        print(f"FAILED: xsam train exited with {rc}")
        return 1
    summary = json.loads((out / "summary.json").read_text())
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    started = next(e for e in events if e["type"] == FitEvent.STARTED)
    searches = sum(e["type"] == FitEvent.ALPHA_SEARCH for e in events)
    result = {
        "status": summary["status"],
        "device": started["data"]["device"],
        "steps": summary["steps"],
        "alpha_searches": searches,
        "test/acc": summary["metrics"].get("test/acc"),
        "fit_seconds": round(summary["fit_seconds"], 2),
        "wall_seconds": round(wall, 2),
    }
    print("RESULT " + json.dumps(result), flush=True)
    problems = []
    if summary["status"] != FitOutcome.COMPLETED:
        problems.append(f"status {summary['status']}")
    if device == "cuda" and not started["data"]["device"].startswith("cuda"):
        problems.append(f"trained on {started['data']['device']}, not CUDA")
    if searches != config["schedule"]["epochs"]:
        problems.append(f"{searches} α searches, expected one per epoch")
    if problems:
        print("FAILED: " + "; ".join(problems))
        return 1
    return 0


def e2e_serve(device: str, work: Path, quick: bool, timeout: float) -> int:
    """`xsam serve` (API + local Ray + agent) runs one job to success, seen through the API."""
    reason = check_cuda(device)
    if reason:
        return skip(reason)
    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return skip(
            f"{', '.join(missing)} not installed (ray's cp312 wheel alone is 79 MB, more than "
            "a device run can carry); e2e-train runs the same fit() on the device without Ray"
        )
    from service.client import XsamClient
    from service.contract import JobStatus
    from worker.local_ray import free_ports

    work.mkdir(parents=True, exist_ok=True)
    data_dir, port = work / "serve", free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
        "--num-cpus", "4", "--num-gpus", "1" if device == "cuda" else "0", "--max-jobs", "1",
        "--data-root", str(work / "data"), "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "XSAM_HEARTBEAT_INTERVAL_S": "2", "OMP_NUM_THREADS": "1"}
    log = work / "serve.log"
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with log.open("wb") as sink:
        # Its own session: the teardown below signals the server and everything it started.
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while b"agent running" not in log.read_bytes():
            if proc.poll() is not None:
                print(f"FAILED: xsam serve exited with {proc.returncode} before its agent ran")
                return 1
            if time.monotonic() > deadline:
                print("FAILED: xsam serve did not start its agent in time")
                return 1
            time.sleep(0.5)
        started = time.perf_counter() - t0
        token = (data_dir / "admin.token").read_text().strip()
        with XsamClient(url, token, timeout=30) as api:
            job = api.submit(job_config(device, quick), name="gpu-check", tags=["gpu-check"])
            try:
                job = api.wait_for_job(job.id, timeout=max(deadline - time.monotonic(), 0))
            except TimeoutError as exc:
                print(f"FAILED: {exc} (the deadline)")
                return 1
            latest = api.latest_metrics(job.id)
        result = {
            "status": job.status,
            "serve_start_seconds": round(started, 1),
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "error": job.error.model_dump() if job.error else None,
            "latest": latest.model_dump(mode="json"),
        }
        print("RESULT " + json.dumps(result, default=str), flush=True)
        if job.status is not JobStatus.SUCCEEDED:
            print(f"FAILED: job ended {job.status}: {job.error}")
            return 1
        return 0
    finally:
        stop_group(proc)
        print("---- serve.log (tail) ----")
        print(log.read_text(errors="replace")[-4000:])


def stop_group(proc: subprocess.Popen) -> None:
    """Ctrl-C the server (it stops its agent, then its Ray: the path tests/worker/test_e2e.py
    checks; Ray's own SIGTERM handler in the server cuts that short), then SIGKILL what is left
    of its process group."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


# -- summary ----------------------------------------------------------------------------------


def junit_counts(path: Path) -> dict[str, int] | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root)
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def last_result(log: Path, stage: str) -> dict[str, Any] | None:
    """The RESULT line the stage printed into its section of ``log``."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    marker = f"## stage {stage}\n"
    if marker not in text:
        return None
    section = text.split(marker)[-1].split("\n## stage ")[0]
    found = [line[7:] for line in section.splitlines() if line.startswith("RESULT ")]
    return json.loads(found[-1]) if found else None


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def summary(out: Path, stages_tsv: Path) -> int:
    rows = [line.split("\t") for line in stages_tsv.read_text().splitlines() if line.strip()]
    lines = ["# GPU check", ""]
    env = out / "env.txt"
    if env.exists():
        picked = [
            line
            for line in env.read_text().splitlines()
            if line.split(":")[0] in ("date", "python", "torch", "torch.version.cuda", "device 0")
        ]
        lines += [f"- {line}" for line in picked] + [""]
    lines += ["| stage | status | seconds | note |", "|---|---|---|---|"]
    failed = False
    for name, status, seconds, note in rows:
        failed |= status not in ("passed", "skipped")
        lines.append(f"| {name} | {status} | {seconds} | {note} |")
    lines.append("")

    counts = junit_counts(out / "junit.xml")
    if counts:
        lines += [
            f"pytest -m gpu: {counts['tests']} tests, {counts['failures']} failures, "
            f"{counts['errors']} errors, {counts['skipped']} skipped",
            "",
        ]

    data = read_json(out / "step_time.json")
    graphed = read_json(out / "step_time_graphs.json")
    if data.get("runs"):
        lines += step_time_tables(data, "Step time")
    elif data.get("skipped"):
        lines += [f"step_time: skipped ({data['skipped']})", ""]
    if graphed.get("runs"):
        lines += step_time_tables(graphed, "Step time with CUDA graphs (`--cuda-graph`)")
    elif graphed:
        lines += ["step_time_graphs: no figures (see step_time.md and the stage table)", ""]
    if graphed.get("runs"):
        lines += [*targets(graphed, "graphed steps: bench/step_time.py --cuda-graph")]
        lines += [*eager_reference(data), ""]
    elif data.get("runs"):
        lines += [*targets(data, "eager steps: no CUDA-graph figures"), ""]

    for stage in ("e2e-train", "e2e-serve"):
        result = last_result(out / "e2e.log", stage)
        if result:
            lines.append(f"{stage}: `{json.dumps(result, default=str)[:600]}`")
    lines += ["", f"overall: {'FAILED' if failed else 'passed'}"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


def read_json(path: Path) -> dict[str, Any]:
    """A stage's JSON, or {} where it is missing or cut short (a timed-out stage)."""
    try:
        got = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return got if isinstance(got, dict) else {}


def step_time_tables(data: dict[str, Any], title: str) -> list[str]:
    """Per-arm figures and ratios of one bench/step_time.py JSON (eager or --cuda-graph)."""
    graphs = any(run.get("cuda_graph") for run in data["runs"])
    lines = [
        f"## {title} ({data.get('gpu') or data.get('device')}, torch {data.get('torch')})",
        "",
        "| batch | layout, precision | search every | arm | ms/step | images/s | "
        "peak MiB | GPU busy ÷ wall (unprofiled wall) |"
        + (" replay ms | capture ms | GPU time (events) ÷ wall |" if graphs else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if graphs else ""),
    ]
    for run in data["runs"]:
        layout = "channels_last" if run["channels_last"] else "NCHW"
        for arm, r in run["arms"].items():
            busy = r.get("gpu_busy_fraction")
            util = (
                "n/a"
                if busy is None
                else f"{100 * busy:.1f} % ({100 * r['gpu_busy_fraction_unprofiled_wall']:.1f} %)"
            )
            row = (
                f"| {run['batch']} | {layout}, {run['precision']} | {run['search_every']} | "
                f"{arm} | {r['ms_per_step']:.2f} | {r['images_per_s']:.0f} | "
                f"{fmt(r['peak_mib'], '.0f')} | {util} |"
            )
            if graphs:
                events = r.get("gpu_event_fraction")
                row += (
                    f" {fmt(r.get('replay_ms_per_step'), '.2f')} | {fmt(r.get('capture_ms'), '.1f')}"
                    f" | {'n/a' if events is None else f'{100 * events:.1f} %'} |"
                )
            lines.append(row)
    lines += ["", "| batch | XSAM ÷ SAM | SAM ÷ SGD | XSAM ÷ SGD |", "|---|---|---|---|"]
    for run in data["runs"]:
        q = run["ratios"]
        lines.append(
            f"| {run['batch']} | {q['XSAM/SAM']['median']:.3f} | {q['SAM/SGD']['median']:.3f}"
            f" | {q['XSAM/SGD']['median']:.3f} |"
        )
    if graphs:
        lines += [
            "",
            "ms/step charges one capture per epoch (and XSAM one eager search); replay ms is a "
            "replayed step alone.",
        ]
    return [*lines, ""]


def eager_reference(data: dict[str, Any]) -> list[str]:
    """One line: the eager batch-125 figures the graphed targets replace."""
    run = next((r for r in data.get("runs", []) if r["batch"] == 125), None)
    if run is None:
        return ["Eager steps at batch 125: no figures."]
    q = run["ratios"]
    busy = [r.get("gpu_busy_fraction") for r in run["arms"].values()]
    shown = "n/a" if None in busy else f"{100 * min(busy):.1f} %"
    return [
        f"Eager steps at batch 125, for reference (not judged): XSAM ÷ SAM "
        f"{q['XSAM/SAM']['median']:.3f}, SAM ÷ SGD {q['SAM/SGD']['median']:.3f}, lowest GPU "
        f"busy {shown}."
    ]


def targets(data: dict[str, Any], judged_on: str = "eager steps") -> list[str]:
    """Issue 14's targets, judged on the batch-125 run (figures, not a stage's pass/fail)."""
    run = next((r for r in data["runs"] if r["batch"] == 125), None)
    if run is None or data.get("device", "").split(":")[0] != "cuda":
        return ["targets: judged on a CUDA run at batch 125 only"]
    q, arms = run["ratios"], run["arms"]
    busy = {arm: r.get("gpu_busy_fraction") for arm, r in arms.items()}

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lines = [
        f"Targets (ResNet-18, batch 125, search every {run['search_every']} steps, "
        f"{data.get('gpu')}; judged on the {judged_on}):",
        f"- XSAM ÷ SAM = {q['XSAM/SAM']['median']:.3f} ≤ {TARGETS['XSAM/SAM']}: "
        + verdict(q["XSAM/SAM"]["median"] <= TARGETS["XSAM/SAM"]),
        f"- SAM ÷ SGD = {q['SAM/SGD']['median']:.3f} ≤ {TARGETS['SAM/SGD']}: "
        + verdict(q["SAM/SGD"]["median"] <= TARGETS["SAM/SGD"]),
    ]
    if all(v is not None for v in busy.values()):
        shown = ", ".join(f"{arm} {100 * v:.1f} %" for arm, v in busy.items())
        lines.append(
            f"- GPU busy ÷ wall > {100 * TARGETS['gpu_busy']:.0f} % ({shown}): "
            + verdict(min(busy.values()) > TARGETS["gpu_busy"])
        )
    else:
        lines.append("- GPU busy ÷ wall: not measured (see step_time.md for the profiler's error)")
    events = {arm: r.get("gpu_event_fraction") for arm, r in arms.items()}
    if all(v is not None for v in events.values()):
        shown = ", ".join(f"{arm} {100 * v:.1f} %" for arm, v in events.items())
        lines.append(
            f"  (GPU time between CUDA events around each replayed step ÷ wall, which does not "
            f"rely on the profiler tracing kernels inside graph replays: {shown})"
        )
        traced = [busy[arm] for arm in events if busy.get(arm) is not None]
        if len(traced) == len(events) and any(
            b < 0.5 * e for b, e in zip(traced, events.values(), strict=True)
        ):
            lines.append(
                "  (the profiler's figure is under half the events' one for some arm: its trace "
                "probably lacks kernels launched by graph replays; read the busy verdict with care)"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("out", type=Path)
    p = sub.add_parser("pytest")
    p.add_argument("junit", type=Path)
    for name in ("e2e-train", "e2e-serve"):
        p = sub.add_parser(name)
        p.add_argument("work", type=Path)
        p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
        p.add_argument("--quick", action="store_true", help="a tiny job (CI on the CPU)")
        p.add_argument("--timeout", type=float, default=240, help="serve: start + job, seconds")
    p = sub.add_parser("summary")
    p.add_argument("out", type=Path)
    p.add_argument("stages", type=Path)
    args = parser.parse_args()
    # `timeout` ends a stage with SIGTERM: unwind, so that e2e-serve stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    if args.command == "env":
        return env_report(args.out)
    if args.command == "pytest":
        return run_pytest(args.junit)
    if args.command == "e2e-train":
        return e2e_train(args.device, args.work, args.quick)
    if args.command == "e2e-serve":
        return e2e_serve(args.device, args.work, args.quick, args.timeout)
    return summary(args.out, args.stages)


if __name__ == "__main__":
    sys.exit(main())
