"""`xsam export`: a finished job's (and a study's) series round-trip through TensorBoard event
files and CSV, equal to the API's raw points, even where the API would downsample them."""

from __future__ import annotations

import csv

import pytest
from service_support import ADMIN_SECRET, CONFIG

from service.client import XsamClient
from xsam.cli import export_cmd, main


@pytest.fixture
def finished(live_server, monkeypatch):
    """A user's token, and a finished study of two cells × one seed with three series each."""
    # A small window, so that a 120-point series is read back in several undownsampled parts.
    monkeypatch.setattr(export_cmd, "MAX_POINTS", 50)
    admin = XsamClient(live_server.url, ADMIN_SECRET)
    token = admin.create_token("erin")["token"]
    user = XsamClient(live_server.url, token)
    agent = XsamClient(live_server.url, admin.create_token("box", "agent")["token"])
    study = user.submit_study({
        "base": CONFIG, "seeds": [3], "baseline": "sgd",
        "arms": [{"name": "sgd", "set": {"optimizer.name": "sgd"}},
                 {"name": "xsam", "set": {"optimizer.name": "xsam"}}],
    })  # fmt: skip
    while (claimed := agent.claim("a1", 4, 0)) is not None:
        job_id, lease = claimed["job"]["id"], claimed["lease"]["lease_token"]
        points = [{"name": "train/loss", "step": s, "value": 1 / 3 + 1e-12 * s + job_id,
                   "epoch": s // 40} for s in range(1, 121)]  # fmt: skip
        points += [{"name": "val/acc", "step": 40 * e, "value": 0.1 * e, "epoch": e}
                   for e in (1, 2, 3)]  # fmt: skip
        points += [{"name": "xsam/alpha", "step": 7, "value": 0.123456789012345}]
        agent.ingest_metrics(job_id, lease, points)
        agent.finish(job_id, lease, "succeeded")
    jobs = user.list_jobs(study=study["id"])["items"]
    return live_server.url, token, user, study["id"], sorted(j["id"] for j in jobs)


def _raw(user, job_id):
    series = user.metrics(job_id, max_points=100_000)["series"]
    return {name: [(p["step"], p["value"]) for p in pts] for name, pts in series.items()}


def test_tensorboard_event_files_read_back_equal_to_the_apis_raw_points(finished, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    url, token, user, study_id, job_ids = finished
    job_id = job_ids[0]
    assert main(["export", str(job_id), "--to", "tensorboard", str(tmp_path / "tb"),
                 "--server", url, "--token", token]) == 0  # fmt: skip
    acc = EventAccumulator(str(tmp_path / "tb" / f"job-{job_id}"), size_guidance={"tensors": 0})
    acc.Reload()
    got = {
        tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"]
    }
    assert got == _raw(user, job_id)
    assert len(got["train/loss"]) == 120  # not downsampled

    # A study: one run per job, grouped by cell.
    assert main(["export", "--study", str(study_id), "--to", "tensorboard",
                 str(tmp_path / "tb"), "--server", url, "--token", token]) == 0  # fmt: skip
    runs = sorted(p.relative_to(tmp_path / "tb").as_posix()
                  for p in (tmp_path / "tb").glob("study-*/*/job-*"))  # fmt: skip
    assert runs == [f"study-{study_id}/sgd/job-{job_ids[0]}",
                    f"study-{study_id}/xsam/job-{job_ids[1]}"]  # fmt: skip


def test_csv_reads_back_equal_to_the_apis_raw_points(finished, tmp_path):
    url, token, user, study_id, job_ids = finished
    assert main(["export", "--study", str(study_id), "--to", "csv", str(tmp_path),
                 "--server", url, "--token", token]) == 0  # fmt: skip
    with (tmp_path / f"study-{study_id}.csv").open() as f:
        rows = list(csv.DictReader(f))
    for job_id, cell in zip(job_ids, ("sgd", "xsam"), strict=True):
        mine = [r for r in rows if int(r["job_id"]) == job_id]
        assert {r["cell"] for r in mine} == {cell} and {r["seed"] for r in mine} == {"3"}
        got: dict[str, list] = {}
        for r in mine:
            got.setdefault(r["name"], []).append((int(r["step"]), float(r["value"])))
        assert got == _raw(user, job_id)


def test_export_needs_a_job_or_a_study(capsys, tmp_path):
    assert main(["export", "--to", "csv", str(tmp_path)]) == 2
    assert "JOB id or --study" in capsys.readouterr().err
    assert main(["export", "1", "--to", "mlflow", str(tmp_path)]) == 2
    assert "choose tensorboard or csv" in capsys.readouterr().err
