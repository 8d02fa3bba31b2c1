"""/v1/studies: expansion (count, keys, seed-major claim order), atomic validation, the size
limit, cancel, isolation between owners, and the summary and curves against an independent
recomputation from the metric series the test itself ingests through the agent routes."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from scipy import stats
from service_support import ADMIN, CONFIG, claim

ARMS = [
    {"name": "sgd", "set": {"optimizer.name": "sgd"}},
    {"name": "sam", "set": {"optimizer.name": "sam"}},
    {"name": "xsam", "set": {"optimizer.name": "xsam", "optimizer.alpha_max": 1.0}},
]
GRID = {"optimizer.rho": [0.05, 0.1]}
KEYS = [f"{arm['name']}|optimizer.rho={rho}" for arm in ARMS for rho in (0.05, 0.1)]


def study_body(**overrides: Any) -> dict[str, Any]:
    body = {"name": "arms", "base": CONFIG, "arms": ARMS, "grid": GRID, "seeds": [7, 3]}
    body.update(overrides)
    return body


def submit_study(client, headers, **overrides: Any) -> dict[str, Any]:
    r = client.post("/v1/studies", json=study_body(**overrides), headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def test_expansion_count_keys_and_seed_major_claim_order(client, alice, agent):
    study = submit_study(client, alice, baseline="sam", tags=["s1"], priority=2)
    assert study["status"] == "running" and study["owner"] == "alice"
    assert study["baseline"] == "sam" and study["seeds"] == [7, 3]
    assert study["counts"] == {"queued": 12, "running": 0, "succeeded": 0, "failed": 0,
                               "cancelled": 0}  # fmt: skip
    assert [c["key"] for c in study["cells"]] == KEYS
    assert study["cells"][0]["arm"] == "sgd"
    assert study["cells"][0]["params"] == {"optimizer.rho": 0.05}  # the grid point only
    assert all(len(c["job_ids"]) == 2 for c in study["cells"])

    jobs = client.get("/v1/jobs", params={"study": study["id"]}, headers=alice).json()["items"]
    assert len(jobs) == 12 and {j["study_id"] for j in jobs} == {study["id"]}
    assert all(j["tags"] == ["s1"] and j["priority"] == 2 for j in jobs)
    by_id = {j["id"]: j for j in jobs}
    for cell in study["cells"]:
        configs = [by_id[i]["config"] for i in cell["job_ids"]]
        assert [c["seed"] for c in configs] == [7, 3]
        assert {by_id[i]["cell"] for i in cell["job_ids"]} == {cell["key"]}
        assert {c["optimizer"]["name"] for c in configs} == {cell["arm"]}
        assert {c["optimizer"]["rho"] for c in configs} == {cell["params"]["optimizer.rho"]}
    # The arm's own settings apply; an unrelated job is not in the study's list.
    xsam = by_id[study["cells"][4]["job_ids"][0]]["config"]["optimizer"]
    assert xsam["alpha_max"] == 1.0
    client.post("/v1/jobs", json={"config": CONFIG}, headers=alice)

    # Seed-major: every cell of seed 7 is claimed before any of seed 3, cells in order.
    claimed = [claim(client, agent)["job"] for _ in range(12)]
    assert [(j["config"]["seed"], j["cell"]) for j in claimed] == [
        (seed, key) for seed in (7, 3) for key in KEYS
    ]
    assert claim(client, agent)["job"]["study_id"] is None  # the plain job comes after
    # Outside a study both fields are null.
    plain = client.get("/v1/jobs", headers=alice).json()["items"][0]
    assert plain["study_id"] is None and plain["cell"] is None


def test_a_study_without_arms_or_grid_has_one_cell_base(client, alice):
    study = submit_study(client, alice, arms=None, grid={}, seeds=[1, 2, 3])
    assert [(c["key"], c["arm"], c["params"]) for c in study["cells"]] == [("base", "base", {})]
    assert len(study["cells"][0]["job_ids"]) == 3


def _nothing_stored(client, headers) -> None:
    assert client.get("/v1/studies", headers=headers).json()["items"] == []
    assert client.get("/v1/jobs", headers=headers).json()["items"] == []


def test_one_bad_cell_refuses_the_study_naming_arm_point_and_field(client, alice):
    # rho = 0.5 exceeds sam's rho_max = 0.2: only the cell sam|optimizer.rho=0.5 is invalid.
    arms = [{"name": "sgd", "set": {}}, {"name": "sam", "set": {"optimizer.rho_max": 0.2}}]
    r = client.post(
        "/v1/studies",
        json=study_body(arms=arms, grid={"optimizer.rho": [0.1, 0.5]}),
        headers=alice,
    )
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "invalid_study"
    assert "'sam|optimizer.rho=0.5'" in body["detail"]
    assert "arm 'sam'" in body["detail"] and "grid point optimizer.rho=0.5" in body["detail"]
    assert "optimizer.rho_max" in body["detail"]
    assert "sgd|" not in body["detail"]
    _nothing_stored(client, alice)


@pytest.mark.parametrize(
    ("overrides", "status", "code", "words"),
    [
        # a path no TrainConfig has, in an arm and in the grid
        ({"arms": [{"name": "a", "set": {"optimizer.rhoo": 1}}]}, 422, "unknown_path",
         ["arm 'a'", "optimizer.rhoo", "rhoo"]),
        ({"grid": {"schedule.epochz": [1]}}, 422, "unknown_path", ["grid", "epochz"]),
        # a path through a leaf
        ({"grid": {"seed.x": [1]}}, 422, "unknown_path", ["seed.x"]),
        # above the size limit (3 arms × 2 points × 167 seeds = 1002 > 1000)
        ({"seeds": list(range(167))}, 422, "study_too_large", ["1002", "1000"]),
        # schema errors: FastAPI's body with the field in loc
        ({"seeds": [1, 1]}, 422, "validation_error", ["seeds"]),
        ({"seeds": []}, 422, "validation_error", ["seeds"]),
        ({"baseline": "adam"}, 422, "validation_error", ["baseline"]),
        ({"grid": {"optimizer.rho": [0.1, 0.1]}}, 422, "validation_error", ["grid"]),
        ({"grid": {"seed": [1, 2]}}, 422, "validation_error", ["seeds"]),
        ({"arms": [{"name": "a|b", "set": {}}]}, 422, "validation_error", ["name"]),
        ({"base": {**CONFIG, "optimizer": {"rho": -1}}}, 422, "validation_error", ["rho"]),
    ],
)  # fmt: skip
def test_invalid_studies_store_nothing(client, alice, overrides, status, code, words):
    r = client.post("/v1/studies", json=study_body(**overrides), headers=alice)
    assert r.status_code == status, r.text
    assert r.json()["code"] == code
    for word in words:
        assert word in r.text, (word, r.text)
    _nothing_stored(client, alice)


def test_size_limit_is_a_setting(db_url, tmp_path):
    from service_support import TestClient, make_settings, new_token

    from service.app import create_app

    with TestClient(create_app(make_settings(db_url, tmp_path, max_study_jobs=4))) as c:
        alice = new_token(c, "alice")
        r = c.post("/v1/studies", json=study_body(), headers=alice)
        assert r.status_code == 422 and r.json()["code"] == "study_too_large"
        ok = c.post("/v1/studies", json=study_body(arms=ARMS[:1]), headers=alice)
        assert ok.status_code == 201, ok.text


def test_cancel_study(client, alice, agent):
    study = submit_study(client, alice, arms=ARMS[:2], grid={}, seeds=[1, 2])
    running = claim(client, agent)
    r = client.post(f"/v1/studies/{study['id']}/cancel", headers=alice)
    assert r.status_code == 200, r.text
    # The running job was asked to stop; the study runs until it has.
    assert r.json()["status"] == "running"
    assert r.json()["counts"] == {"queued": 0, "running": 1, "succeeded": 0, "failed": 0,
                                  "cancelled": 3}  # fmt: skip
    assert client.get(f"/v1/jobs/{running['job']['id']}", headers=alice).json()["cancel_requested"]
    finish = client.post(
        f"/v1/agent/jobs/{running['job']['id']}/finish",
        json={"lease_token": running["lease"]["lease_token"], "status": "cancelled"},
        headers=agent,
    )
    assert finish.status_code == 200, finish.text
    after = client.get(f"/v1/studies/{study['id']}", headers=alice).json()
    assert after["status"] == "cancelled" and after["counts"]["cancelled"] == 4
    assert after["finished_at"] is not None
    # Again: the same answer, not an error.
    assert client.post(f"/v1/studies/{study['id']}/cancel", headers=alice).status_code == 200


def test_a_study_that_finished_cannot_be_cancelled(client, alice, agent):
    study = submit_study(client, alice, arms=ARMS[:1], grid={}, seeds=[1])
    run = claim(client, agent)
    client.post(
        f"/v1/agent/jobs/{run['job']['id']}/finish",
        json={"lease_token": run["lease"]["lease_token"], "status": "succeeded"},
        headers=agent,
    )
    assert client.get(f"/v1/studies/{study['id']}", headers=alice).json()["status"] == "finished"
    r = client.post(f"/v1/studies/{study['id']}/cancel", headers=alice)
    assert r.status_code == 409 and r.json()["code"] == "study_finished"


def test_owners_see_only_their_studies(client, alice, bob):
    study = submit_study(client, alice)
    sid = study["id"]
    for method, path in [
        ("GET", f"/v1/studies/{sid}"),
        ("POST", f"/v1/studies/{sid}/cancel"),
        ("GET", f"/v1/studies/{sid}/summary"),
        ("GET", f"/v1/studies/{sid}/curves"),
        ("GET", "/v1/studies/999999"),
    ]:
        r = client.request(method, path, headers=bob)
        assert r.status_code == 404, (method, path)
        assert r.json()["code"] == "study_not_found"
    assert client.get("/v1/studies", headers=bob).json()["items"] == []
    assert client.get("/v1/jobs", params={"study": sid}, headers=bob).json()["items"] == []
    assert [s["id"] for s in client.get("/v1/studies", headers=ADMIN).json()["items"]] == [sid]
    assert client.get(f"/v1/studies/{sid}", headers=ADMIN).status_code == 200


def test_list_studies_newest_first_with_cursor(client, alice):
    ids = [submit_study(client, alice, arms=ARMS[:1], grid={}, seeds=[i])["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/studies", params=params, headers=alice).json()
        seen += [s["id"] for s in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)
    assert client.get("/v1/studies", params={"cursor": "nope"}, headers=alice).status_code == 400


# --- statistics against an independent recomputation ------------------------------------------

STEPS = [10, 20, 30, 40, 50, 60, 70]  # seven points: last5 is not the whole series
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def run_study(client, alice, agent) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """Claim every job of a 3 arms × 2 ρ × 3 seeds study, ingest made-up test/acc series (and
    α for XSAM), and finish them, one (sgd, ρ=0.1, seed 2) failed. Returns the study and, per
    job, what the test ingested."""
    study = submit_study(client, alice, baseline="sam", seeds=[0, 1, 2])
    ingested: dict[int, dict[str, Any]] = {}
    for _ in range(18):
        run = claim(client, agent)
        job, lease = run["job"], run["lease"]["lease_token"]
        rng = random.Random(job["id"])
        values = [round(rng.uniform(0.5, 0.9), 4) for _ in STEPS]
        times = [T0 + timedelta(seconds=s * 1.5 + rng.random()) for s in STEPS]
        points = [
            {"name": "test/acc", "step": s, "value": v, "epoch": i + 1, "time": t.isoformat()}
            for i, (s, v, t) in enumerate(zip(STEPS, values, times, strict=True))
        ]
        alphas, searches = [], []
        if job["config"]["optimizer"]["name"] == "xsam":
            grid = [0.0, 0.25, 0.5, 0.75, 1.0]
            for s in STEPS[:4]:
                alpha = rng.choice(grid)
                alphas.append(alpha)
                points.append({"name": "xsam/alpha", "step": s, "value": alpha})
                searches.append({"type": "alpha_search", "message": f"α = {alpha}",
                                 "data": {"step": s, "alpha": alpha, "alphas": grid},
                                 "key": f"alpha_search:{s}"})  # fmt: skip
        post = {"lease_token": lease}
        base = f"/v1/agent/jobs/{job['id']}"
        assert client.post(f"{base}/metrics", json={**post, "points": points},
                           headers=agent).status_code == 200  # fmt: skip
        if searches:
            client.post(f"{base}/events", json={**post, "events": searches}, headers=agent)
        failed = job["cell"] == "sgd|optimizer.rho=0.1" and job["config"]["seed"] == 2
        done = {**post, "status": "failed" if failed else "succeeded"}
        assert client.post(f"{base}/finish", json=done, headers=agent).status_code == 200
        ingested[job["id"]] = {"values": values, "times": times, "alphas": alphas,
                               "searches": searches, "failed": failed}  # fmt: skip
    for job_id in ingested:
        ingested[job_id]["job"] = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    return study, ingested


def expected_stat(values: list[float]) -> dict[str, float | None]:
    n = len(values)
    if n < 2:
        return {"mean": float(np.mean(values)) if n else None, "sd": None, "ci95": None}
    sd = float(np.std(values, ddof=1))
    return {"mean": float(np.mean(values)), "sd": sd,
            "ci95": float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)}  # fmt: skip


def assert_stat(got: dict[str, Any], want: dict[str, Any]) -> None:
    for k in ("mean", "sd", "ci95"):
        assert (got[k] is None) == (want[k] is None), (k, got, want)
        if want[k] is not None:
            assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), (k, got, want)


def when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.parametrize("mode", ["max", "min"])
def test_summary_equals_an_independent_recomputation(client, alice, agent, mode):
    study, ingested = run_study(client, alice, agent)
    target = 0.8 if mode == "max" else 0.6
    r = client.get(
        f"/v1/studies/{study['id']}/summary",
        params={"metric": "test/acc", "mode": mode, "target": target},
        headers=alice,
    )
    assert r.status_code == 200, r.text
    summary = r.json()
    assert summary["metric"] == "test/acc" and summary["mode"] == mode
    assert [c["key"] for c in summary["cells"]] == KEYS
    best = max if mode == "max" else min

    per_cell: dict[str, dict[int, dict[str, float]]] = {}
    for data in ingested.values():
        job = data["job"]
        if data["failed"]:
            continue
        v = data["values"]
        per_cell.setdefault(job["cell"], {})[job["config"]["seed"]] = {
            "final": v[-1], "best": best(v), "last5": float(np.mean(v[-5:])),
            "wall": (when(job["finished_at"]) - when(job["started_at"])).total_seconds(),
        }  # fmt: skip

    for cell in summary["cells"]:
        seeds = per_cell[cell["key"]]
        assert cell["n"] == len(seeds) == (2 if cell["key"] == "sgd|optimizer.rho=0.1" else 3)
        for what in ("final", "best", "last5"):
            assert_stat(cell[what], expected_stat([s[what] for s in seeds.values()]))
            for seed, s in seeds.items():
                assert cell["per_seed"][str(seed)][what] == pytest.approx(s[what])
        assert_stat(cell["wall_s"], expected_stat([s["wall"] for s in seeds.values()]))

        # vs_baseline: the sam cell at the same ρ, paired by seed.
        if cell["arm"] == "sam":
            assert cell["vs_baseline"] is None
        else:
            vs = cell["vs_baseline"]
            base_key = cell["key"].replace(cell["arm"] + "|", "sam|")
            base = per_cell[base_key]
            common = sorted(set(seeds) & set(base))
            assert vs["baseline_key"] == base_key and vs["n_pairs"] == len(common)
            for what in ("final", "best", "last5"):
                a = [seeds[s][what] for s in common]
                b = [base[s][what] for s in common]
                test = stats.ttest_rel(a, b)
                got = vs[what]
                assert got["t"] == pytest.approx(float(test.statistic), rel=1e-9)
                assert got["p"] == pytest.approx(float(test.pvalue), rel=1e-9)
                assert got["mean_diff"] == pytest.approx(float(np.mean(np.subtract(a, b))))
                better = np.greater if mode == "max" else np.less
                assert got["wins"] == int(np.sum(better(a, b)))

        # to_target: per seed the first point at or beyond the target.
        reached_steps, reached_wall = [], []
        for data in ingested.values():
            job = data["job"]
            if job["cell"] != cell["key"] or data["failed"]:
                continue
            for step, value, t in zip(STEPS, data["values"], data["times"], strict=True):
                if (value >= target) if mode == "max" else (value <= target):
                    reached_steps.append(float(step))
                    reached_wall.append((t - when(job["started_at"])).total_seconds())
                    break
        assert cell["to_target"]["reached"] == len(reached_steps)
        assert_stat(cell["to_target"]["steps"], expected_stat(reached_steps))
        assert_stat(cell["to_target"]["wall_s"], expected_stat(reached_wall))

        # α statistics for the XSAM cells only.
        if cell["arm"] != "xsam":
            assert cell["alpha"] is None
            continue
        mine = [d for d in ingested.values() if d["job"]["cell"] == cell["key"]]
        searches = [s["data"] for d in mine for s in d["searches"]]
        hits = sum(1 for s in searches if s["alpha"] in (0.0, 1.0))
        assert cell["alpha"]["searches"] == len(searches) == 12
        assert cell["alpha"]["edge_hits"] == hits
        assert cell["alpha"]["edge_share"] == pytest.approx(hits / len(searches))
        assert_stat(cell["alpha"]["final"], expected_stat([d["alphas"][-1] for d in mine]))

    # Without a target there is no to_target; without a baseline no vs_baseline.
    plain = client.get(f"/v1/studies/{study['id']}/summary", headers=alice).json()
    assert plain["mode"] == "max" and all(c["to_target"] is None for c in plain["cells"])
    assert client.get(f"/v1/studies/{study['id']}", headers=alice).json()["status"] == "finished"


@pytest.mark.parametrize("max_points", [1000, 3])
def test_curves_equal_an_independent_recomputation(client, alice, agent, max_points):
    study, ingested = run_study(client, alice, agent)
    r = client.get(
        f"/v1/studies/{study['id']}/curves",
        params={"name": "test/acc", "max_points": max_points},
        headers=alice,
    )
    assert r.status_code == 200, r.text
    curves = r.json()
    assert curves["name"] == "test/acc" and list(curves["cells"]) == KEYS
    lo, hi = min(STEPS), max(STEPS)
    for key, points in curves["cells"].items():
        # Every job that reported counts, the failed one included.
        jobs = [d for d in ingested.values() if d["job"]["cell"] == key]
        groups: dict[int, list[tuple[int, list[float]]]] = {}
        for d in jobs:
            per_group: dict[int, list[tuple[int, float]]] = {}
            for step, value in zip(STEPS, d["values"], strict=True):
                g = step if max_points >= len(STEPS) else (step - lo) * max_points // (hi - lo + 1)
                per_group.setdefault(g, []).append((step, value))
            for g, pts in per_group.items():
                groups.setdefault(g, []).append((max(s for s, _ in pts), [v for _, v in pts]))
        assert len(points) == len(groups) <= max_points
        for point, g in zip(points, sorted(groups), strict=True):
            members = groups[g]
            means = [float(np.mean(vs)) for _, vs in members]
            assert point["step"] == max(s for s, _ in members)
            assert point["n"] == len(members)
            assert point["mean"] == pytest.approx(float(np.mean(means)))
            assert point["sd"] == pytest.approx(float(np.std(means, ddof=1)))
            assert point["min"] == pytest.approx(min(v for _, vs in members for v in vs))
            assert point["max"] == pytest.approx(max(v for _, vs in members for v in vs))
