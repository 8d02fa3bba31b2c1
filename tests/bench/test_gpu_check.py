"""bench/gpu_check.sh --quick on the CPU: the stages CI can run pass and their figures land in
summary.md; the parts only a GPU exercises (busy time, targets) are checked on made-up input."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(240)  # ~20 s alone; the CPUs are shared
def test_quick_check_passes_on_the_cpu_and_reports_its_figures(tmp_path):
    out = tmp_path / "results"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "GPU_CHECK_BUDGET_S": "170",
    }
    got = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--quick", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert files == {
        "summary.md", "env.txt", "pytest.log", "junit.xml", "step_time.json", "step_time.md",
        "e2e.log",
    }  # fmt: skip
    summary = (out / "summary.md").read_text()
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in summary.splitlines()
        if line.startswith("| ") and line.count("|") == 5
    }
    assert rows["env"] == rows["step_time"] == rows["e2e-train"] == "passed", summary
    assert rows["pytest"] == "skipped", summary  # collected, then skipped: no CUDA
    assert rows["e2e-serve"] == "skipped", summary
    assert "overall: passed" in summary
    # The figures: per-arm step time and throughput, the ratios, the end-to-end job's result.
    for arm in ("SGD", "SAM", "XSAM"):
        assert f"| {arm} |" in summary
    assert "| batch | XSAM ÷ SAM | SAM ÷ SGD | XSAM ÷ SGD |" in summary
    run = json.loads((out / "step_time.json").read_text())["runs"][0]
    assert set(run["ratios"]) == {"SAM/SGD", "XSAM/SGD", "XSAM/SAM"}
    assert all(a["images_per_s"] > 0 for a in run["arms"].values())
    assert 'e2e-train: `{"status": "completed"' in summary
    assert "e2e-serve: `" not in summary  # no result of another stage under its name


def test_gpu_busy_counts_overlapping_kernels_once():
    step_time = load("step_time")
    spans = [(0, 400), (800, 900), (300, 500)]  # the first and last overlap: 100 µs counted once
    got = step_time.gpu_busy(spans, wall_s=0.001)
    assert got["busy_s"] == pytest.approx(600e-6)
    assert got["kernel_sum_s"] == pytest.approx(700e-6)


def test_gpu_spans_come_from_the_profilers_trace():
    # On the CPU the trace has no GPU work: the reader finds none (and does not fail).
    import torch
    from torch.profiler import ProfilerActivity, profile

    step_time = load("step_time")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(4).add_(1)
    assert step_time.gpu_spans(prof) == []


def cuda_run(batch: int, xsam_sam: float, sam_sgd: float, busy: float) -> dict:
    arm = {
        "ms_per_step": 10.0, "images_per_s": 100 * batch, "cpu_ms_per_step": 9.0,
        "peak_mib": 900.0, "step_mib": 300.0, "gpu_busy_fraction": busy,
        "gpu_kernel_sum_fraction": busy, "gpu_busy_fraction_unprofiled_wall": busy + 0.01,
        "profiled_steps": 8,
    }  # fmt: skip
    ratio = {"min": 0, "max": 0, "cpu_median": 0}
    return {
        "model": "resnet18", "batch": batch, "channels_last": True, "precision": "bf16",
        "search_every": 400, "arms": {"SGD": arm, "SAM": arm, "XSAM": arm},
        "ratios": {
            "XSAM/SAM": {**ratio, "median": xsam_sam},
            "SAM/SGD": {**ratio, "median": sam_sgd},
            "XSAM/SGD": {**ratio, "median": xsam_sam * sam_sgd},
        },
    }  # fmt: skip


@pytest.mark.parametrize(
    ("xsam_sam", "sam_sgd", "busy", "verdicts"),
    [
        (1.01, 2.0, 0.95, ["met", "met", "met"]),  # every target met
        (1.05, 2.1, 0.80, ["MISSED", "MISSED", "MISSED"]),  # every target missed
    ],
)
def test_summary_judges_the_targets_on_the_batch_125_cuda_run(
    tmp_path, xsam_sam, sam_sgd, busy, verdicts
):
    gpu_check = load("gpu_check")
    figures = {
        "device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130",
        "runs": [cuda_run(125, xsam_sam, sam_sgd, busy), cuda_run(512, 9.0, 9.0, 0.1)],
    }  # fmt: skip
    (tmp_path / "step_time.json").write_text(json.dumps(figures))
    stages = tmp_path / "stages.tsv"
    stages.write_text("step_time\tpassed\t120\t\ne2e-serve\tskipped\t0\tray not installed\n")
    assert gpu_check.summary(tmp_path, stages) == 0  # targets are figures, not stage failures
    text = (tmp_path / "summary.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in text
    judged = [line.rsplit(": ", 1)[1] for line in text.splitlines() if line.startswith("- ")]
    assert judged == verdicts, text
    stages.write_text("pytest\tfailed\t60\texit status 1\n")
    assert gpu_check.summary(tmp_path, stages) == 1
    assert "overall: FAILED" in (tmp_path / "summary.md").read_text()


def test_summary_judges_the_targets_on_the_graphed_run_when_there_is_one(tmp_path):
    gpu_check = load("gpu_check")
    eager = {
        "device": "cuda", "gpu": "NVIDIA H200", "torch": "2.11.0+cu130",
        "runs": [cuda_run(125, 0.99, 2.4, 0.12)],
    }  # fmt: skip
    graphed = json.loads(json.dumps(eager))
    graphed["runs"] = [cuda_run(125, 1.01, 2.0, 0.95)]
    for arm in graphed["runs"][0]["arms"].values():
        arm.update(replay_ms_per_step=3.0, capture_ms=80.0, gpu_event_fraction=0.97)
    graphed["runs"][0]["cuda_graph"] = True
    (tmp_path / "step_time.json").write_text(json.dumps(eager))
    (tmp_path / "step_time_graphs.json").write_text(json.dumps(graphed))
    stages = tmp_path / "stages.tsv"
    stages.write_text("step_time\tpassed\t78\t\nstep_time_graphs\tpassed\t50\t\n")
    assert gpu_check.summary(tmp_path, stages) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "## Step time with CUDA graphs" in text and "| 3.00 | 80.0 | 97.0 % |" in text
    assert "judged on the graphed steps" in text
    judged = [line.rsplit(": ", 1)[1] for line in text.splitlines() if line.startswith("- ")]
    assert judged == ["met", "met", "met"], text
    assert "Eager steps at batch 125, for reference (not judged): XSAM ÷ SAM 0.990" in text
    # The graphed stage failing (no JSON) leaves the eager figures judged and fails the check.
    (tmp_path / "step_time_graphs.json").unlink()
    stages.write_text("step_time\tpassed\t78\t\nstep_time_graphs\tfailed\t150\ttimed out\n")
    assert gpu_check.summary(tmp_path, stages) == 1
    text = (tmp_path / "summary.md").read_text()
    assert "judged on the eager steps" in text
    judged = [line.rsplit(": ", 1)[1] for line in text.splitlines() if line.startswith("- ")]
    assert judged == ["met", "MISSED", "MISSED"], text


def test_graphed_step_time_charges_one_capture_and_one_search_per_epoch():
    step_time = load("step_time")
    block = {"wall": [9.0, 5.0, 1.0, 1.0], "action": ["capture", "replay", "replay", "replay"]}
    xsam = {"wall": [20.0, 9.0, 2.0, 2.0], "action": ["eager", "capture", "replay", "replay"]}
    got = step_time.graphed_per_step({"SGD": block, "SAM": block, "XSAM": xsam}, "wall", 10)
    assert got["SGD"] == pytest.approx((9.0 + 9 * (5.0 + 1.0 + 1.0) / 3) / 10)
    assert got["XSAM"] == pytest.approx((20.0 + 9.0 + 8 * 2.0) / 10)
    with pytest.raises(SystemExit, match="no replay step"):
        step_time.graphed_per_step({"SGD": {"wall": [1.0], "action": ["capture"]}}, "wall", 10)
