"""Health rules on a run's metric stream (worker/health.py).

The rules as pure functions, fed synthetic step and α sequences with a fake clock; α's rule on
real training's α searches; and one real `xsam serve` whose job's rank is stopped (SIGSTOP):
a ``stalled`` event, the run aborted, and a second attempt that resumes from the checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
from fault_support import events

from worker.health import AlphaEdgeRule, HealthSettings, StallRule, watch_alpha

# --- the stall rule -----------------------------------------------------------------------


def _run_steps(rule: StallRule, seconds_per_step: float, steps: int, start: float = 0.0) -> float:
    """Feed ``steps`` steps at a steady pace, one observation per step; returns the clock."""
    now = start
    for step in range(1, steps + 1):
        now += seconds_per_step
        rule.observe(step, now)
    return now


@pytest.mark.parametrize(
    ("seconds_per_step", "multiple", "min_s", "limit_s"),
    [
        (0.1, 10, 60, 60),  # fast steps: the floor decides (evaluation pauses must not trip it)
        (10.0, 10, 60, 100),  # slow steps: the multiple of the median decides
        (0.5, 4, 1, 2),  # lowered settings, as a test or an impatient operator sets them
    ],
)
def test_a_run_with_no_new_step_past_its_limit_is_stalled(
    seconds_per_step, multiple, min_s, limit_s
):
    rule = StallRule(multiple, min_s)
    now = _run_steps(rule, seconds_per_step, 20)
    assert rule.limit_s() == pytest.approx(limit_s)
    assert rule.check(now + limit_s * 0.99) is None
    stall = rule.check(now + limit_s * 1.01)
    assert stall is not None and stall.step == 20
    assert stall.silent_s == pytest.approx(limit_s * 1.01)
    assert stall.median_step_s == pytest.approx(seconds_per_step)
    assert "no new step" in stall.message and "after step 20" in stall.message


def test_a_new_step_resets_the_silence():
    rule = StallRule(10, 5)
    now = _run_steps(rule, 0.1, 10)
    now += 4.9
    rule.observe(11, now)  # a slow step (an evaluation), but before the limit
    assert rule.check(now + 4.9) is None
    assert rule.check(now + 5.1) is not None


def test_the_median_ignores_a_few_slow_steps():
    rule = StallRule(10, 0.001)
    now = _run_steps(rule, 0.1, 30)
    now += 30.0  # one epoch-end evaluation and checkpoint between two steps
    rule.observe(31, now)
    assert rule.limit_s() == pytest.approx(1.0)  # 10 × the median 0.1 s, not the mean


def test_start_up_and_a_resume_are_not_stalls():
    rule = StallRule(10, 1)
    assert rule.check(1e6) is None  # nothing seen yet: start-up, data loading
    rule.observe(0, 0.0)
    assert rule.check(1e6) is None  # a first step, but no step time to judge by yet
    now = _run_steps(rule, 0.1, 5)
    rule.observe(3, now + 0.5)  # a resumed run starts again at its checkpoint's step
    rule.observe(4, now + 100.0)  # its first step after a long start-up is not a step time
    assert rule.limit_s() == pytest.approx(1.0)


def test_several_steps_between_observations_count_per_step():
    # The agent sees rank 0's step about once a second, often several steps apart.
    rule = StallRule(10, 0.001)
    for k in range(1, 11):
        rule.observe(12 * k, float(k))
    assert rule.limit_s() == pytest.approx(10 / 12)


@pytest.mark.parametrize(("multiple", "min_s"), [(0, 60), (10, 0), (-1, 1)])
def test_stall_rule_refuses_settings_that_cannot_work(multiple, min_s):
    with pytest.raises(ValueError, match="stall rule"):
        StallRule(multiple, min_s)


# --- the α edge rule ----------------------------------------------------------------------

GRID = [round(0.1 * k, 10) for k in range(21)]  # the default grid 0:0.1:2


def _searches(alphas: list[float], searches: int = 5) -> list[dict]:
    rule = AlphaEdgeRule(searches)
    records = []
    for i, alpha in enumerate(alphas):
        warning = rule.observe({"alpha": alpha, "alphas": GRID, "step": 100 * i + 1})
        if warning is not None:
            records.append(warning)
    return records


@pytest.mark.parametrize(
    ("alphas", "edges"),
    [
        ([0.0] * 5, ["0"]),  # five searches at 0: one warning
        ([2.0] * 12, ["alpha_max"]),  # twelve at α_max: still one, not one per search
        ([0.0] * 4, []),  # four: not yet
        ([1.2] * 20, []),  # inside the grid: healthy
        ([0.0, 2.0] * 10, []),  # jumping between the edges is not pinned at one
        ([0.0] * 4 + [0.5] + [0.0] * 4, []),  # the stretch is broken, the count starts again
        ([0.0] * 5 + [0.5] + [0.0] * 5, ["0", "0"]),  # a new stretch after leaving: warned anew
        ([2.0] * 5 + [0.0] * 5, ["alpha_max", "0"]),  # from one edge to the other
    ],
)
def test_alpha_pinned_at_an_edge_warns_once_per_stretch(alphas, edges):
    records = _searches(alphas)
    assert [r["data"]["edge"] for r in records] == edges
    for record in records:
        assert (record["kind"], record["type"]) == ("event", "warning")
        assert record["data"]["searches"] == 5
        assert "5 consecutive α searches" in record["message"]


def test_the_warning_names_the_edge_and_where_the_stretch_began():
    (warning,) = _searches([1.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    assert warning["data"]["since_step"] == 101 and warning["data"]["step"] == 501
    assert "α_max = 2" in warning["message"] and "since step 101" in warning["message"]
    assert warning["key"] == "alpha_pinned:alpha_max:101"  # a replay is not a second warning


def test_alpha_max_comes_from_the_config_when_the_search_reports_no_grid():
    rule = AlphaEdgeRule(2, alpha_max=1.5)
    assert rule.observe({"alpha": 1.5, "step": 1}) is None
    assert rule.observe({"alpha": 1.5, "step": 2})["data"]["edge"] == "alpha_max"


def test_settings_come_with_the_lease_else_the_defaults():
    assert HealthSettings.from_lease({}) == HealthSettings(10.0, 60.0, 5)
    lease = {"health": {"stall_step_multiple": 3, "stall_min_s": 2.5, "alpha_edge_searches": 7}}
    assert HealthSettings.from_lease(lease) == HealthSettings(3, 2.5, 7)


@pytest.mark.timeout(180)  # a second of training, but MNIST-1D's cache on a loaded machine
def test_real_training_with_alpha_pinned_at_alpha_max_reports_one_warning(data_root):
    """fit's own α searches, through the wrapper rank 0 reports with (worker/rank.py): a grid
    of two probes, {0, 0.1}, on which this MNIST-1D run always picks the top one."""
    from ray_support import tiny_config

    from xsam.config import TrainConfig
    from xsam.training import fit

    optimizer = {"name": "xsam", "lr": 0.05, "rho": 0.05, "search_every": 2, "alpha_max": 0.1,
                 "alpha_delta": 0.1}  # fmt: skip
    config = TrainConfig.model_validate(tiny_config(optimizer=optimizer, schedule__epochs=1))
    records: list[dict] = []
    fit(config, report=watch_alpha(records.append, AlphaEdgeRule(3)), data_root=data_root)

    types = [r.get("type") for r in records if r["kind"] == "event"]
    searches = [r["data"] for r in records if r.get("type") == "alpha_search"]
    assert [s["alpha"] for s in searches] == [0.1] * 6  # 12 steps, a search every 2
    warnings = [r for r in records if r.get("type") == "warning"]
    assert len(warnings) == 1, warnings  # not one per search
    assert warnings[0]["data"]["edge"] == "alpha_max" and warnings[0]["data"]["searches"] == 3
    assert warnings[0]["data"]["since_step"] == searches[0]["step"]
    # Reported right after the third search at the edge.
    third = [i for i, t in enumerate(types) if t == "alpha_search"][2]
    assert types[third + 1] == "warning"


# --- a stalled run, end to end -----------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)  # 3.5 min at load 14-21 on the 2-core machine (serve start included)
def test_a_stopped_rank_is_a_stalled_run_restarted_as_attempt_2(
    serve_factory, tiny_config, wait_for, wait_terminal, monkeypatch
):
    # A floor of 15 s instead of 60 (the steps here take ~0.1 s: the floor decides, unless a
    # loaded machine slows them past 1.5 s); short leases (tests/ray_support.py) requeue the
    # aborted attempt within seconds.
    monkeypatch.setenv("XSAM_STALL_MIN_S", "15")
    server = serve_factory("stall").start()
    epochs = 20
    pid = None
    with server.client() as api:
        job = api.submit(tiny_config(schedule__epochs=epochs), name="stalls", max_attempts=3)

        def past_epoch_2():
            progress = api.get_job(job.id).progress
            return progress is not None and (progress.epoch or 0) >= 2

        wait_for(past_epoch_2, 240, 0.3, "two epochs (a checkpoint)")
        # This job's rank, by the pid its run environment reports (as tests/worker/test_e2e.py
        # finds a rank to kill); stopped, it neither steps nor dies: only the rule can tell.
        envs = api.events(job.id, type="environment").items
        pid = next(e.data["pid"] for e in envs if e.data and e.data["attempt"] == 1)
        assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"), pid
        os.kill(pid, signal.SIGSTOP)
        try:
            done = wait_terminal(api, job.id)
        finally:
            # The agent's abort kills it through Ray; never leave a stopped process behind.
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                    os.kill(pid, signal.SIGKILL)
        assert done.status == "succeeded" and done.attempt == 2, done

        all_events = events(api, job.id)
        stalled = [e for e in all_events if e.type == "stalled"]
        assert len(stalled) == 1, stalled
        data = stalled[0].data
        assert data is not None and data["attempt"] == 1 and data["limit_s"] >= 15
        assert data["silent_s"] > data["limit_s"] and data["step"] >= 2 * 12
        assert "no new step" in stalled[0].message
        types = [e.type for e in all_events]
        # The aborted attempt is requeued by the service (an attempt counted) and resumes.
        assert types.index("stalled") < types.index("requeued"), types
        starts = [e.message for e in all_events if e.type == "started"]
        assert len(starts) == 2 and "resumed" in starts[1], starts
        epochs_done = [e.data["epoch"] for e in all_events if e.type == "epoch_done" and e.data]
        assert epochs_done == list(range(1, epochs + 1))
        steps = [p.step for p in api.metrics(job.id).series["train/loss"]]
        assert steps == list(range(2, epochs * 12 + 1, 2))
    server.stop()
