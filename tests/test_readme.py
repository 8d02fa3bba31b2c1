"""The README's promises that code can check: its example runs, and CI runs its test command."""

from __future__ import annotations

import re
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


def test_optimizer_example_runs_and_learns(capsys):
    pytest.importorskip("torch")
    example = re.search(r"## The optimizer.*?```python\n(.*?)```", README, re.S)
    assert example is not None
    exec(compile(example[1], "README.md", "exec"), {})
    losses = [float(m) for m in re.findall(r"loss ([0-9.]+)", capsys.readouterr().out)]
    assert len(losses) == 5 and losses[-1] < losses[0]
