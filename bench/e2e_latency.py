"""End-to-end latency of the service: what running a job through `xsam serve` costs over
`xsam train`, for a one-rank job (a warm actor) and a two-rank job (a TorchTrainer).

Starts a warm `xsam serve` (API + local Ray + agent; a warm-up job of each kind first, so that
Ray's first worker processes, the data cache and imports are paid for), then for each repeat:

- submits a 3-epoch MNIST-1D job with 1 rank, then the same with 2 ranks, and measures, from
  the client's clock, *submit → first step visible* (the first metric point readable through
  the API) and *total* (submit → `succeeded` seen); the two-rank job's batch is 126 (divisible
  by the ranks);
- reads fit()'s own duration (``fit_seconds`` in the ``finished`` event), so that
  *overhead = total − time inside fit()*;
- runs the one-rank config with `xsam train` in a subprocess: wall time and fit_seconds likewise;
- then, with `xsam serve` stopped, measures Ray Train's own fixed cost in the same run: a
  2-worker `TorchTrainer` whose loop does nothing, on a fresh local Ray head with the same CPUs
  (a driver of its own, one untimed warm-up), from `TorchTrainer(...).fit()` called to returned.
  The two-rank job's overhead is set against it. (Run beside the idle `xsam serve`'s Ray, the
  same driver waited for its placement group for minutes: Ray Train's autoscaling coordinator
  there belongs to the agent's driver; not investigated.)

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
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.client import XsamClient  # noqa: E402
from service.contract import EventType, JobPublic, JobStatus  # noqa: E402
from worker import local_ray  # noqa: E402
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


NOOP_TRAINER = """
import sys, time, tempfile
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")

def loop():
    pass

t0 = time.monotonic()
TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=int(sys.argv[2]),
             resources_per_worker={"CPU": 1}),
             run_config=RunConfig(storage_path=tempfile.mkdtemp())).fit()
print(time.monotonic() - t0)
"""


def noop_trainer_runs(work: Path, num_cpus: int, workers: int, repeats: int) -> list[float]:
    """Seconds a TorchTrainer with an empty loop takes (after one untimed warm-up) on a fresh
    local Ray head: Ray Train's fixed cost per run."""
    token = local_ray.ensure_auth_token(work / "noop-ray" / "auth_token")
    head = local_ray.start_head(Path(f"/tmp/ray-noop{os.getpid()}"), num_cpus=num_cpus,
                                token_file=token)  # fmt: skip
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    times = []
    try:
        for _ in range(repeats + 1):
            out = subprocess.run(
                [sys.executable, "-c", NOOP_TRAINER, head.address, str(workers)], env=env,
                cwd=ROOT, check=True, capture_output=True, text=True, timeout=600,
            ).stdout  # fmt: skip
            times.append(float(out.strip().splitlines()[-1]))
    finally:
        head.stop()
    return times[1:]


def start_serve(work: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str, str]:
    port = free_ports(1)[0]
    cmd = [sys.executable, "-m", "cli", "serve", "--port", str(port),
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


def run_job(api: XsamClient, workers: int = 1) -> dict[str, float]:
    t0 = time.monotonic()
    # Every rank takes the same share of the global batch: 125 → 126 for two ranks.
    batch = -(-CONFIG["data"]["batch_size"] // workers) * workers
    data = {**CONFIG["data"], "batch_size": batch}
    config = {**CONFIG, "data": data, "resources": {"num_workers": workers}}
    job = api.submit(config, name="bench-e2e")
    first_step = None

    def seen(state: JobPublic) -> None:
        nonlocal first_step
        if first_step is None and state.latest_metrics:
            first_step = time.monotonic() - t0

    state = api.wait_for_job(job.id, poll_s=0.1, on_poll=seen)
    total = time.monotonic() - t0
    if state.status is not JobStatus.SUCCEEDED:
        raise SystemExit(f"job {job.id} {state.status}: {state.error}")
    events = api.events(job.id).items
    first = {e.type: e for e in reversed(events)}  # the first event of each type
    fit_s = float((first[EventType.FINISHED].data or {})["fit_seconds"])

    def at(stamp: datetime) -> float:
        return stamp.replace(tzinfo=stamp.tzinfo or UTC).timestamp()

    # Where the overhead goes (server and rank clocks: the same machine here).
    claimed = at(first[EventType.CLAIMED].time) - at(state.created_at)
    started = at(first[EventType.STARTED].time) - at(first[EventType.CLAIMED].time)
    return {"first_step_s": first_step or total, "total_s": total, "fit_s": fit_s,
            "overhead_s": total - fit_s, "submit_to_claim_s": claimed,
            "claim_to_fit_started_s": started}  # fmt: skip


def run_train(work: Path, i: int) -> dict[str, float]:
    config = work / "job.json"
    config.write_text(json.dumps(CONFIG))
    out = work / f"train-{i}"
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "cli", "train", str(config), "--out", str(out), "--no-progress",
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
    results: dict[str, list[dict[str, float]]] = {
        "serve": [], "serve2": [], "train": [], "raytrain_noop": []
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="xsam-bench-") as tmp:
        work = Path(tmp)
        proc, url, token = start_serve(work, args)
        try:
            with XsamClient(url, token) as api:
                print("warm-up jobs…", file=sys.stderr, flush=True)
                # Two ranks first: a TorchTrainer run keeps its CPUs until Ray Train has torn it
                # down, and a job submitted meanwhile waits for them (not the path measured).
                run_job(api, 2)
                run_job(api, 1)
                for i in range(args.repeats):
                    results["serve"].append(run_job(api, 1))
                    results["serve2"].append(run_job(api, 2))
                    results["train"].append(run_train(work, i))
                    print(f"repeat {i + 1}: " + ", ".join(f"{k} {v[-1]}" for k, v in results.items() if v),
                          file=sys.stderr, flush=True)  # fmt: skip
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        print("Ray Train's fixed cost…", file=sys.stderr, flush=True)
        for t in noop_trainer_runs(work, args.num_cpus, 2, args.repeats):
            results["raytrain_noop"].append({"total_s": t})

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    def row(label: str, *cells: str) -> None:
        print(f"{label:34}" + "".join(f"{c:>14}" for c in cells))

    print(f"3-epoch MNIST-1D XSAM job (cnn1d, 4000 samples, batch 125), median of {args.repeats}")
    row("", "serve 1 rank", "serve 2 ranks", "xsam train")
    for label, key in (("submit -> claimed (s)", "submit_to_claim_s"),
                       ("claimed -> started event (s)", "claim_to_fit_started_s"),
                       ("submit -> first step (s)", "first_step_s")):  # fmt: skip
        row(label, f"{med('serve', key):.1f}", f"{med('serve2', key):.1f}", "-")
    for label, key in (("total wall time (s)", "total_s"), ("time inside fit() (s)", "fit_s"),
                       ("overhead (s)", "overhead_s")):  # fmt: skip
        row(label, f"{med('serve', key):.1f}", f"{med('serve2', key):.1f}",
            f"{med('train', key):.1f}")  # fmt: skip
    noop = med("raytrain_noop", "total_s")
    print(f"Ray Train's fixed cost (2-worker TorchTrainer, empty loop): {noop:.1f} s")
    print(f"one-rank overhead: {med('serve', 'overhead_s'):.1f} s (target <= 2 s); "
          f"two-rank overhead / Ray Train's fixed cost: {med('serve2', 'overhead_s') / noop:.2f}")  # fmt: skip
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e_latency.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
