"""The dashboard in a real browser: headless Chromium driven by selenium with the system
chromedriver, against `xsam serve --no-agent` over real HTTP.

The "running job" is fed by this test through the agent routes (claim, then metric, event and
log ingest): the browser cannot tell it from a job on Ray, and no GPU or Ray is needed. Skips
when Chromium or chromedriver is missing, unless XSAM_REQUIRE_BROWSER=1 (CI sets it).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from service_support import ADMIN_SECRET, CONFIG, free_port, serve_subprocess, wait_ready

from service.client import XsamClient

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = [pytest.mark.timeout(240)]


def _require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if not missing:
        return
    why = f"browser tests need {', '.join(missing)} (apt-get install chromium chromium-driver)"
    if os.environ.get("XSAM_REQUIRE_BROWSER") == "1":
        pytest.fail(f"XSAM_REQUIRE_BROWSER=1 but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    _require_browser()
    data_dir = tmp_path_factory.mktemp("serve")
    port = free_port()
    proc = serve_subprocess(
        data_dir,
        f"sqlite:///{data_dir / 'xsam.db'}",
        port,
        XSAM_ADMIN_TOKEN=ADMIN_SECRET,
        XSAM_HEARTBEAT_INTERVAL_S="60",  # the test feeds the job; no heartbeats needed
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=60, proc=proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def browser(server) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,2000", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def clients(server) -> dict[str, Any]:
    admin = XsamClient(server, ADMIN_SECRET)
    token = admin.create_token("dana").token
    return {
        "token": token,
        "user": XsamClient(server, token),
        "agent": XsamClient(server, admin.create_token("box", "agent").token),
    }


def wait_until(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
        time.sleep(0.2)


def sign_in(driver, server: str, token: str, fragment: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{server}/ui#{fragment}")
    field = wait_until("the token form", lambda: driver.find_element(By.ID, "token"))
    if field.is_displayed():
        field.send_keys(token)
        driver.find_element(By.CSS_SELECTOR, "#token-form button").click()
    assert token not in driver.current_url


def _keep(screenshot: Path) -> None:
    """Copy a screenshot to $XSAM_SAVE_SCREENSHOTS (a directory) when set, e.g. for docs/."""
    if os.environ.get("XSAM_SAVE_SCREENSHOTS"):
        shutil.copy(screenshot, Path(os.environ["XSAM_SAVE_SCREENSHOTS"]) / screenshot.name)


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def points(driver, chart: str, meta: str = "series") -> int:
    return driver.execute_script(
        "const d = document.getElementById(arguments[0]);"
        "return d && d.data ? d.data.filter(t => t.meta === arguments[1])"
        "  .reduce((n, t) => n + t.x.length, 0) : 0;",
        chart,
        meta,
    )


def traces(driver, chart: str, meta: str) -> int:
    return driver.execute_script(
        "const d = document.getElementById(arguments[0]);"
        "return d && d.data ? d.data.filter(t => t.meta === arguments[1]).length : 0;",
        chart,
        meta,
    )


def _metrics(steps, lr_steps=()) -> list[dict]:
    out = []
    for s in steps:
        out += [
            {"name": "train/loss", "step": s, "value": 2.0 / s, "epoch": 1},
            {"name": "train/acc", "step": s, "value": 1 - 1.0 / (s + 1), "epoch": 1},
            {"name": "xsam/alpha", "step": s, "value": 0.5 + 0.01 * (s % 7), "epoch": 1},
            {"name": "xsam/phi", "step": s, "value": 0.1 * (s % 5), "epoch": 1},
            {"name": "xsam/sharpness", "step": s, "value": 0.05 / s, "epoch": 1},
        ]
    # A long series with one spike: downsampled by the API, its envelope keeps the spike.
    out += [{"name": "lr", "step": s, "value": 9.0 if s == 777 else 0.1, "epoch": 1}
            for s in lr_steps]  # fmt: skip
    return out


def test_a_running_jobs_page_grows_its_charts_and_tails_its_log(server, browser, clients, tmp_path):
    user, agent = clients["user"], clients["agent"]
    job = user.submit({**CONFIG, "schedule": {"epochs": 3}}, name="browser-job")
    lease = agent.claim("browser-agent", 4, 0).lease.lease_token
    agent.heartbeat(job.id, lease, {"epoch": 1, "epochs": 3, "step": 40, "steps": 300})
    agent.ingest_metrics(job.id, lease, _metrics(range(1, 41), lr_steps=range(1, 2001)))
    agent.ingest_events(job.id, lease, [
        {"type": "alpha_search", "message": "α = 0.6 at step 1", "key": "s1",
         "data": {"step": 1, "alphas": [0, 0.5, 1.0, 1.5], "losses": [2.3, 2.1, 2.2, 2.6]}},
        {"type": "environment", "message": "rank 0", "key": "environment:1:0",
         "data": {"attempt": 1, "rank": 0, "host": "gpu-node-7", "python": "3.11.7",
                  "torch": "2.13.0", "cuda": "12.8", "ray": "2.60.0", "gpu": "NVIDIA H100",
                  "gpus": 1}},
    ])  # fmt: skip
    lines = [{"rank": 0, "seq": i, "stream": "stdout", "text": f"hello {i}"} for i in range(5)]
    agent.ingest_logs(job.id, lease, lines)

    sign_in(browser, server, clients["token"], f"/jobs/{job.id}")
    first = wait_until("the loss chart", lambda: points(browser, "chart-loss"))
    assert first == 40
    assert traces(browser, "chart-lr", "envelope") == 1  # 2000 points came downsampled
    assert traces(browser, "chart-probes", "probe") == 1
    wait_until("the log tail", lambda: "hello 4" in browser.find_element("id", "log-tail").text)
    assert "gpu-node-7" in browser.find_element("id", "job-env").text

    # The job trains on: the open page follows without a reload.
    agent.ingest_metrics(job.id, lease, _metrics(range(41, 101)))
    agent.ingest_logs(job.id, lease, [
        {"rank": 1, "seq": 0, "stream": "log", "level": "INFO", "text": "epoch 1 done"}
    ])  # fmt: skip
    grown = wait_until("more points", lambda: points(browser, "chart-loss") > first and
                       points(browser, "chart-loss"))  # fmt: skip
    assert grown == 100
    wait_until("the new log line", lambda: "epoch 1 done" in browser.find_element(
        "id", "log-tail").text)  # fmt: skip
    assert browser.find_element("id", "job-status").text == "running"
    browser.save_screenshot(str(tmp_path / "job.png"))
    _keep(tmp_path / "job.png")
    assert console_errors(browser) == []

    # Cancel from the page: the service records the request (the agent would stop the run).
    browser.find_element("id", "cancel").click()
    wait_until("the cancel", lambda: user.get_job(job.id).cancel_requested)
    agent.finish(job.id, lease, "cancelled")


def test_a_finished_studys_page_has_one_band_per_cell(server, browser, clients, tmp_path):
    user, agent = clients["user"], clients["agent"]
    study = user.submit_study({
        "name": "browser-study",
        "base": CONFIG,
        "arms": [{"name": "sgd", "set": {"optimizer.name": "sgd"}},
                 {"name": "xsam", "set": {"optimizer.name": "xsam"}}],
        "seeds": [0, 1, 2],
        "baseline": "sgd",
    })  # fmt: skip
    while (claimed := agent.claim("browser-agent", 4, 0)) is not None:
        job, lease = claimed.job, claimed.lease.lease_token
        seed = job.config["seed"]
        lift = 0.1 + 0.02 * seed if job.cell == "xsam" else 0.0
        agent.ingest_metrics(job.id, lease, [
            {"name": "test/acc", "step": s, "value": 0.5 + lift + 0.03 * s + 0.01 * seed}
            for s in range(1, 11)
        ])  # fmt: skip
        agent.finish(job.id, lease, "succeeded")
    assert user.get_study(study.id).status == "finished"

    sign_in(browser, server, clients["token"], f"/studies/{study.id}")
    wait_until("the curves", lambda: traces(browser, "chart-curves", "band"))
    assert traces(browser, "chart-curves", "band") == 2  # one mean ± sd band per cell
    assert traces(browser, "chart-curves", "mean") == 2
    rows = wait_until("the summary", lambda: browser.find_elements(
        "css selector", "#study-summary tr")[1:])  # fmt: skip
    assert [r.find_element("css selector", "td").text for r in rows] == ["sgd", "xsam"]
    assert "wins 3/3" in rows[1].text  # xsam beat the baseline on every seed
    browser.save_screenshot(str(tmp_path / "study.png"))
    assert console_errors(browser) == []
    _keep(tmp_path / "study.png")
