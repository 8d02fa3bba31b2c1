"""The README's promises that code can check: its example runs, and CI runs its test command."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_first_lines_give_the_run_and_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first_block is not None and README.index("```bash") < 200, "commands must come first"
    lines = [line.split("#")[0].strip() for line in first_block[1].strip().splitlines()]
    assert lines == ["bash scripts/setup.sh && .venv/bin/xsam serve", "bash scripts/test.sh"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci and "XSAM_REQUIRE_POSTGRES=1" in ci


def test_the_test_command_runs_the_checks_before_pytest():
    script = (ROOT / "scripts" / "test.sh").read_text()
    # (commands only: the comments name the checks too)
    commands = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    at = {
        check: next((i for i, line in enumerate(commands) if line.startswith(check)), None)
        for check in (
            ".venv/bin/ruff check .",
            ".venv/bin/ruff format --check .",
            ".venv/bin/mypy",
            "exec .venv/bin/python -m pytest",
        )
    }
    assert None not in at.values(), at
    assert list(at.values()) == sorted(at.values()), at
    assert "runs ruff check ., ruff format --check . and mypy" in " ".join(
        README.replace("`", "").split()
    )


def test_mypy_checks_every_package_the_project_installs():
    # A package added to setuptools' list (e.g. `cli` when it leaves xsam/) must be typed too.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    installed = {p.rstrip("*") for p in config["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert installed <= set(config["tool"]["mypy"]["files"])


def test_optimizer_example_runs_and_learns(capsys):
    pytest.importorskip("torch")
    example = re.search(r"## The optimizer.*?```python\n(.*?)```", README, re.S)
    assert example is not None
    exec(compile(example[1], "README.md", "exec"), {})
    losses = [float(m) for m in re.findall(r"loss ([0-9.]+)", capsys.readouterr().out)]
    assert len(losses) == 5 and losses[-1] < losses[0]
