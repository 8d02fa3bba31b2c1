"""End-to-end latency of the service: what running a job through `xsam serve` costs over
`xsam train`.

Starts a warm `xsam serve` (API + local Ray + agent; a warm-up job first, so that Ray's first
worker processes, the data cache and imports are paid for), then for each repeat:

- submits a 3-epoch MNIST-1D job (1 rank) and measures, from the client's clock,
  *submit → first step visible* (the first metric point readable through the API) and
  *total* (submit → `succeeded` seen);
- reads fit()'s own duration (``fit_seconds`` in the ``finished`` event), so that
  *overhead = total − time inside fit()*;
- runs the same config with `xsam train` in a subprocess: wall time and fit_seconds likewise.

Run:  python bench/e2e_latency.py [--repeats 2] [--ray-address A] [--num-cpus 2]
Writes bench/out/e2e_latency.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.client import XsamClient  # noqa: E402
from worker.local_ray import free_ports  # noqa: E402

CONFIG = {
    "model": {"name": "cnn1d"},
    "data": {"name": "mnist1d", "batch_size": 125},
    "optimizer": {"name": "xsam", "lr": 0.05, "rho": 0.05},
    "schedule": {"epochs": 3},
    "resources": {"num_workers": 1},
    "log_every": 8,
    "seed": 0,
}


def start_serve(work: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str, str]:
    port = free_ports(1)[0]
    cmd = [sys.executable, "-m", "xsam", "serve", "--port", str(port),
           "--data-dir", str(work / "serve"), "--data-root", str(work / "data")]  # fmt: skip
    if args.ray_address:
        cmd += ["--ray-address", args.ray_address]
    else:
        cmd += ["--num-cpus", str(args.num_cpus), "--ray-temp-dir", f"/tmp/ray-bench{os.getpid()}"]
    log = (work / "serve.log").open("ab")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while "agent running" not in (work / "serve.log").read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"xsam serve did not start; see {work / 'serve.log'}")
        time.sleep(0.2)
    token = (work / "serve" / "admin.token").read_text().strip()
    return proc, f"http://127.0.0.1:{port}", token


def run_job(api: XsamClient) -> dict[str, float]:
    t0 = time.monotonic()
    job = api.submit(CONFIG, name="bench-e2e")
    first_step = None
    while True:
        now = time.monotonic()
        state = api.get_job(job["id"])
        if first_step is None and state.get("latest_metrics"):
            first_step = now - t0
        if state["status"] in ("succeeded", "failed", "cancelled"):
            total = now - t0
            break
        time.sleep(0.1)
    if state["status"] != "succeeded":
        raise SystemExit(f"job {job['id']} {state['status']}: {state.get('error')}")
    events = api.events(job["id"])["items"]
    first = {e["type"]: e for e in reversed(events)}  # the first event of each type
    fit_s = float(first["finished"]["data"]["fit_seconds"])

    def at(stamp: str) -> float:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()

    # Where the overhead goes (server and rank clocks: the same machine here).
    claimed = at(first["claimed"]["time"]) - at(state["created_at"])
    started = at(first["started"]["time"]) - at(first["claimed"]["time"])
    return {"first_step_s": first_step or total, "total_s": total, "fit_s": fit_s,
            "overhead_s": total - fit_s, "submit_to_claim_s": claimed,
            "claim_to_fit_started_s": started}  # fmt: skip


def run_train(work: Path, i: int) -> dict[str, float]:
    config = work / "job.json"
    config.write_text(json.dumps(CONFIG))
    out = work / f"train-{i}"
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "xsam", "train", str(config), "--out", str(out), "--no-progress",
         "--data-root", str(work / "data")],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    total = time.monotonic() - t0
    fit_s = json.loads((out / "summary.json").read_text())["fit_seconds"]
    return {"total_s": total, "fit_s": fit_s, "overhead_s": total - fit_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ray-address", default=None, help="use this Ray cluster")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("XSAM_HEARTBEAT_INTERVAL_S", "1")
    results: dict[str, list[dict[str, float]]] = {"serve": [], "train": []}
    with tempfile.TemporaryDirectory(prefix="xsam-bench-") as tmp:
        work = Path(tmp)
        proc, url, token = start_serve(work, args)
        try:
            with XsamClient(url, token) as api:
                print("warm-up job…", file=sys.stderr, flush=True)
                run_job(api)
                for i in range(args.repeats):
                    results["serve"].append(run_job(api))
                    results["train"].append(run_train(work, i))
                    print(f"repeat {i + 1}: serve {results['serve'][-1]}, "
                          f"train {results['train'][-1]}", file=sys.stderr, flush=True)  # fmt: skip
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    print(f"3-epoch MNIST-1D XSAM job (cnn1d, 4000 samples, batch 125), median of {args.repeats}")
    print(f"{'':28}{'xsam serve':>12}{'xsam train':>12}")
    print(f"{'submit -> claimed (s)':28}{med('serve', 'submit_to_claim_s'):12.1f}{'-':>12}")
    print(
        f"{'claimed -> started event (s)':28}{med('serve', 'claim_to_fit_started_s'):12.1f}{'-':>12}"
    )
    print(f"{'submit -> first step (s)':28}{med('serve', 'first_step_s'):12.1f}{'-':>12}")
    print(
        f"{'total wall time (s)':28}{med('serve', 'total_s'):12.1f}{med('train', 'total_s'):12.1f}"
    )
    print(f"{'time inside fit() (s)':28}{med('serve', 'fit_s'):12.1f}{med('train', 'fit_s'):12.1f}")
    print(
        f"{'overhead (s)':28}{med('serve', 'overhead_s'):12.1f}{med('train', 'overhead_s'):12.1f}"
    )
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e_latency.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
