"""Studies through the typed client and `xsam study …` over real HTTP (a live server)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml
from service_support import ADMIN_SECRET, CONFIG

from cli import main
from service.client import NotFound, XsamClient

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "studies"

STUDY = {
    "name": "two-arms",
    "base": CONFIG,
    "arms": [
        {"name": "sam", "set": {"optimizer.name": "sam"}},
        {"name": "xsam", "set": {"optimizer.name": "xsam"}},
    ],
    "seeds": [0, 1],
    "baseline": "sam",
}


def xsam(capsys, server: str, token: str, *argv: str) -> tuple[int, str, str]:
    code = main(["study", *argv, "--server", server, "--token", token])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_study_from_the_cli_to_its_comparison(live_server, tmp_path, capsys):
    admin = XsamClient(live_server.url, ADMIN_SECRET)
    token = admin.create_token("alice", "user").token
    user = XsamClient(live_server.url, token)
    agent = XsamClient(live_server.url, admin.create_token("box", "agent").token)
    url = live_server.url

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    code, out, err = xsam(capsys, url, token, "submit", str(path))
    assert code == 0, err
    study_id = int(out.strip())
    assert "2 cells × 2 seeds = 4 jobs" in err
    assert user.get_study(study_id).status == "running"
    assert [s.id for s in user.list_studies().items] == [study_id]
    assert len(user.list_jobs(study=study_id).items) == 4

    code, out, _ = xsam(capsys, url, token, "list")
    assert code == 0 and "two-arms" in out and "0/4" in out

    for i in range(4):
        run = agent.claim("box", cpus=4, gpus=0)
        job, lease = run.job, run.lease.lease_token
        # Claimed seed-major (sam 0, xsam 0, sam 1, xsam 1): xsam ends 0.02 above sam.
        values = [0.5 + 0.01 * i + 0.1 * (job.cell == "xsam"), 0.6 + 0.02 * i]
        points = [
            {"name": "test/acc", "step": s, "value": v}
            for s, v in zip((10, 20), values, strict=True)
        ]
        agent.ingest_metrics(job.id, lease, points)
        agent.finish(job.id, lease, "succeeded")

    code, out, _ = xsam(capsys, url, token, "status", str(study_id))
    assert code == 0 and "finished" in out
    assert [line.split()[:6] for line in out.splitlines()[2:]] == [
        ["sam", "0", "0", "2", "0", "0"], ["xsam", "0", "0", "2", "0", "0"],
    ]  # fmt: skip

    summary = user.study_summary(study_id, metric="test/acc", mode="max", target=0.6)
    code, out, _ = xsam(capsys, url, token, "compare", str(study_id), "--target", "0.6", "--json")
    assert code == 0 and json.loads(out) == summary.model_dump(mode="json")
    code, out, _ = xsam(capsys, url, token, "compare", str(study_id), "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["cell"] for r in rows] == ["sam", "xsam"]
    xsam_cell = summary.cells[1]
    assert float(rows[1]["final_mean"]) == pytest.approx(xsam_cell.final.mean)
    assert rows[1]["baseline"] == "sam" and int(rows[1]["final_wins"]) == 2
    code, out, _ = xsam(capsys, url, token, "compare", str(study_id))
    assert code == 0 and "xsam" in out and "2/2" in out and "+0.0200" in out
    # The differences are all 0.02 (to rounding): no spread, so no t-test.
    assert xsam_cell.vs_baseline.final.t is None

    curves = user.study_curves(study_id, name="test/acc", max_points=10)
    assert [p.n for p in curves.cells["sam"]] == [2, 2]

    # Finished: cancelling is a one-line error; another owner sees nothing.
    code, _, err = xsam(capsys, url, token, "cancel", str(study_id))
    assert code == 1 and "study_finished" in err and "\n" not in err.strip()
    with pytest.raises(NotFound):
        XsamClient(url, admin.create_token("bob", "user").token).get_study(study_id)

    other = user.submit_study({**STUDY, "name": "stop-me"})
    code, out, _ = xsam(capsys, url, token, "cancel", str(other.id))
    assert code == 0 and "4 jobs cancelled" in out
    assert user.get_study(other.id).status == "cancelled"


def test_cli_errors_are_one_line(live_server, tmp_path, capsys):
    admin = XsamClient(live_server.url, ADMIN_SECRET)
    token = admin.create_token("alice", "user").token
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**STUDY, "grid": {"optimizer.rho": [0.1, -1]}}))
    code, _, err = xsam(capsys, live_server.url, token, "submit", str(bad))
    assert code == 1 and "invalid_study" in err and "optimizer.rho=-1" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("base: [unclosed")
    code, _, err = xsam(capsys, live_server.url, token, "submit", str(broken))
    assert code == 2 and err.count("\n") == 1


@pytest.mark.parametrize("name", ["mnist1d-arms.yaml", "cifar10-resnet18.yaml"])
def test_example_studies_are_accepted(client, alice, name):
    spec = yaml.safe_load((EXAMPLES / name).read_text())
    r = client.post("/v1/studies", json=spec, headers=alice)
    assert r.status_code == 201, r.text
    study = r.json()
    assert study["baseline"] == "sam"
    if name == "mnist1d-arms.yaml":
        assert len(study["cells"]) == 8 and sum(len(c["job_ids"]) for c in study["cells"]) == 40
