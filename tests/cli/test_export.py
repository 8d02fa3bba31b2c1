"""`xsam export`: a finished job's (and a study's) series round-trip through TensorBoard event
files and CSV, equal to the API's raw points, even where the API would downsample them."""

from __future__ import annotations

import csv
import shutil

import pytest
from service_support import ADMIN_SECRET, CONFIG

from cli import export_cmd, main
from service.client import XsamClient


@pytest.fixture
def finished(live_server, monkeypatch):
    """A user's token, and a finished study of two cells × one seed with three series each."""
    # A small window, so that a 120-point series is read back in several undownsampled parts.
    monkeypatch.setattr(export_cmd, "MAX_POINTS", 50)
    admin = XsamClient(live_server.url, ADMIN_SECRET)
    token = admin.create_token("erin").token
    user = XsamClient(live_server.url, token)
    agent = XsamClient(live_server.url, admin.create_token("box", "agent").token)
    study = user.submit_study({
        "base": CONFIG, "seeds": [3], "baseline": "sgd",
        "arms": [{"name": "sgd", "set": {"optimizer.name": "sgd"}},
                 {"name": "xsam", "set": {"optimizer.name": "xsam"}}],
    })  # fmt: skip
    while (claimed := agent.claim("a1", 4, 0)) is not None:
        job_id, lease = claimed.job.id, claimed.lease.lease_token
        points = [{"name": "train/loss", "step": s, "value": 1 / 3 + 1e-12 * s + job_id,
                   "epoch": s // 40} for s in range(1, 121)]  # fmt: skip
        points += [{"name": "val/acc", "step": 40 * e, "value": 0.1 * e, "epoch": e}
                   for e in (1, 2, 3)]  # fmt: skip
        points += [{"name": "xsam/alpha", "step": 7, "value": 0.123456789012345}]
        agent.ingest_metrics(job_id, lease, points)
        agent.finish(job_id, lease, "succeeded")
    jobs = user.list_jobs(study=study.id).items
    return live_server.url, token, user, study.id, sorted(j.id for j in jobs)


def _raw(user, job_id):
    series = user.metrics(job_id, max_points=100_000).series
    return {name: [(p.step, p.value) for p in pts] for name, pts in series.items()}


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
    assert main(["export", "1", "--to", "wandb", str(tmp_path)]) == 2
    assert "choose tensorboard, csv or mlflow" in capsys.readouterr().err


@pytest.fixture
def mlflow_server(tmp_path) -> str:
    """A real `mlflow server` with a SQLite backend, on a free loopback port."""
    import os
    import subprocess
    import sys
    import time

    import httpx
    from service_support import free_port

    if shutil.which("mlflow", path=os.path.dirname(sys.executable)) is None:
        why = "mlflow is not installed (pip install 'xsam-service[mlflow]')"
        if os.environ.get("XSAM_REQUIRE_MLFLOW") == "1":
            pytest.fail(f"XSAM_REQUIRE_MLFLOW=1 but {why}")
        pytest.skip(why)
    port = free_port()
    cmd = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--default-artifact-root", str(tmp_path / "mlartifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    log = (tmp_path / "mlflow.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "mlflow.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not start in 120 s"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.mark.slow
@pytest.mark.timeout(400)  # ~100 s here: mlflow's server start and its client's import
# On SQLite only: the service side of the export (raw series over the API) is the same as the
# other exports', which run on both backends.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_mlflow_runs_read_back_equal_to_the_apis_raw_points(finished, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    url, token, user, study_id, job_ids = finished
    assert main(["export", "--study", str(study_id), "--to", "mlflow", mlflow_server,
                 "--experiment", "xsam-test", "--server", url, "--token", token]) == 0  # fmt: skip
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("xsam-test")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(int(r.data.tags["xsam.job_id"]) for r in runs) == job_ids
    for run in runs:
        job_id = int(run.data.tags["xsam.job_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["xsam.cell"] in ("sgd", "xsam")
        assert run.data.params["optimizer.name"] == run.data.tags["xsam.cell"]
        assert run.data.params["seed"] == "3"
        raw = _raw(user, job_id)
        got = {
            name: sorted(
                (m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)
            )
            for name in raw
        }
        assert got == raw
