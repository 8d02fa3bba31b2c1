"""End to end: a small study (2 arms × 2 seeds, tiny MNIST-1D) on `xsam serve` with Ray runs to
`finished`, and its summary and curves come from what the jobs really reported."""

from __future__ import annotations

import pytest

# Four tiny jobs on the shared server: ~100 s on a loaded 2-core machine (more when it also
# starts the session's Ray cluster); 400 s is room for load, not for a hang.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(400)]


def test_a_small_study_runs_to_finished_with_summary_and_curves(api, tiny_config, wait_for):
    base = tiny_config(schedule__epochs=2)
    study = api.submit_study({
        "name": "e2e-study",
        "base": base,
        "arms": [{"name": "sam", "set": {"optimizer.name": "sam"}},
                 {"name": "xsam", "set": {"optimizer.name": "xsam"}}],
        "seeds": [0, 1],
        "baseline": "sam",
    })  # fmt: skip
    assert [c.key for c in study.cells] == ["sam", "xsam"]

    def finished():
        s = api.get_study(study.id)
        return s if s.status != "running" else None

    done = wait_for(finished, 480, 1.0, f"study {study.id} to finish")
    assert done.status == "finished" and done.counts.succeeded == 4, done
    jobs = api.list_jobs(study=study.id).items
    assert sorted((j.cell, j.config["seed"]) for j in jobs) == [
        ("sam", 0), ("sam", 1), ("xsam", 0), ("xsam", 1),
    ]  # fmt: skip

    summary = api.study_summary(study.id, metric="test/acc", mode="max")
    sam, xsam = summary.cells
    for cell in (sam, xsam):
        assert cell.n == 2 and set(cell.per_seed) == {"0", "1"}
        assert 0 <= cell.final.mean <= 1 and cell.final.sd is not None
        assert cell.wall_s.mean > 0
    # Each seed's final equals the job's own last test/acc.
    for job in jobs:
        series = api.metrics(job.id, names=["test/acc"]).series["test/acc"]
        cell = sam if job.cell == "sam" else xsam
        assert cell.per_seed[str(job.config["seed"])].final == series[-1].value
    assert sam.vs_baseline is None and xsam.vs_baseline.n_pairs == 2
    # XSAM searched α at the first minibatch of each of its 2 epochs, on both seeds.
    assert sam.alpha is None
    assert xsam.alpha.searches == 4 and xsam.alpha.final.mean is not None

    curves = api.study_curves(study.id, name="test/acc")
    for key in ("sam", "xsam"):
        points = curves.cells[key]
        assert len(points) == 2 and all(p.n == 2 for p in points)  # two epochs, two seeds
        assert all(p.min <= p.mean <= p.max for p in points)
