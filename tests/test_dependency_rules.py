"""DESIGN.md's dependency rules, checked on the source: a violation fails here, not in production.

- xsam/config.py imports no torch (the API validates job configs without torch installed);
- service/ never imports torch, ray or worker (the API image has none of them);
- worker/ never imports fastapi or sqlalchemy (GPU nodes hold no database credentials);
- xsam/ imports none of service, worker or cli (the science is usable alone; the arrows point
  into it, never out of it);
- service/contract/ imports pydantic, the standard library and xsam.records only (the client,
  the agent and the CLI load it wherever they run).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RULES = [
    # (files, forbidden top-level packages, why)
    (["xsam/config.py"], {"torch", "ray", "service", "worker"}, "the schema imports no torch"),
    (
        sorted((ROOT / "service").rglob("*.py")),
        {"torch", "ray", "worker", "xsam.training", "xsam.optim", "xsam.models", "xsam.data"},
        "the API image has no torch/ray",
    ),
    (
        sorted((ROOT / "worker").rglob("*.py")),
        {"fastapi", "sqlalchemy", "alembic", "service.db", "service.app", "service.queue"},
        "GPU nodes never touch the database",
    ),
    (
        sorted((ROOT / "xsam").rglob("*.py")),
        {"service", "worker", "cli"},
        "the science package depends on nothing above it",
    ),
]

#: What service/contract/ may import besides the standard library.
CONTRACT_ALLOWED = {"__future__", "pydantic", "pydantic_core", "service.contract", "xsam.records"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def violates(module: str, forbidden: set[str]) -> bool:
    return any(module == f or module.startswith(f + ".") for f in forbidden)


@pytest.mark.parametrize(
    ("files", "forbidden", "why"), RULES, ids=["config", "service", "worker", "xsam"]
)
def test_dependency_rule(files, forbidden, why):
    files = [ROOT / f if isinstance(f, str) else f for f in files]
    assert files, "no files found: the rule would pass vacuously"
    bad = [
        f"{f.relative_to(ROOT)} imports {m}"
        for f in files
        for m in sorted(imported_modules(f))
        if violates(m, forbidden)
    ]
    assert not bad, f"{why}: " + "; ".join(bad)


#: Every arrow between our packages: what each may import of the others (docs/internals.md
#: draws these, one arrow each). cli is the composition root; xsam depends on none of them.
ARROWS: dict[str, set[str]] = {
    "cli": {"service", "worker", "xsam"},
    "worker": {"service.client", "service.contract", "xsam"},
    "service": {"xsam.config", "xsam.records"},
    "xsam": set(),
}


def test_packages_import_each_other_only_along_the_arrows():
    bad = [
        f"{f.relative_to(ROOT)} imports {m}"
        for package, allowed in ARROWS.items()
        for f in sorted((ROOT / package).rglob("*.py"))
        for m in sorted(imported_modules(f))
        if m.split(".")[0] in ARROWS and m.split(".")[0] != package and not violates(m, allowed)
    ]
    assert not bad, "an import with no arrow in docs/internals.md: " + "; ".join(bad)


def test_internals_draws_every_arrow():
    text = (ROOT / "docs" / "internals.md").read_text()
    missing = [
        f"{src} → {dst}"
        for src, dsts in ARROWS.items()
        for dst in sorted(dsts)
        if f"`{src}` → `{dst}`" not in text
    ]
    assert not missing, f"docs/internals.md lacks the arrows {missing}"


def outside(module: str, allowed: set[str]) -> bool:
    """Whether `module` is neither in the standard library nor under one of `allowed`."""
    top = module.split(".")[0]
    return top not in sys.stdlib_module_names and not violates(module, allowed)


def test_contract_imports_only_pydantic_and_the_stdlib():
    files = [*sorted((ROOT / "service" / "contract").rglob("*.py")), ROOT / "xsam/records.py"]
    assert len(files) > 2, "no contract files found: the rule would pass vacuously"
    bad = [
        f"{f.relative_to(ROOT)} imports {m}"
        for f in files
        for m in sorted(imported_modules(f))
        if outside(m, CONTRACT_ALLOWED)
    ]
    assert not bad, "the contract loads without fastapi, sqlalchemy or torch: " + "; ".join(bad)


def test_checker_catches_a_violation(tmp_path):
    # The checker itself must be able to fail: a file that imports torch lazily is caught.
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from torch import nn\n    import ray.train\n")
    mods = imported_modules(f)
    assert violates("torch", {"torch"}) and any(violates(m, {"torch"}) for m in mods)
    assert any(violates(m, {"ray"}) for m in mods)
    # ...and the contract's allow-list refuses what is neither stdlib nor allowed.
    assert outside("sqlalchemy.orm", CONTRACT_ALLOWED) and outside("service.db", CONTRACT_ALLOWED)
    assert not outside("enum", CONTRACT_ALLOWED) and not outside("pydantic", CONTRACT_ALLOWED)
