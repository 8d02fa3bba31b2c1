"""docker-compose.yml read the way `docker compose` reads it (and Dockerfiles read as instructions),
for tests that have no engine.

`interpolate` follows the Compose specification's interpolation: ``$$`` is a literal ``$``;
``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}``,
``${VAR:+alt}``, ``${VAR+alt}`` and ``$VAR``. A required variable that is missing raises
`MissingVariable`, as `docker compose` refuses to start then.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
API_DOCKERFILE = REPO / "docker" / "api.Dockerfile"
RAY_DOCKERFILE = REPO / "docker" / "ray.Dockerfile"

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_VAR = re.compile(
    rf"\$(?:(?P<escaped>\$)|\{{(?P<braced>{_NAME})(?:(?P<op>:?[-?+])(?P<arg>[^}}]*))?\}}"
    rf"|(?P<named>{_NAME}))"
)


class MissingVariable(KeyError):
    """A ``${VAR:?message}`` (or ``${VAR?message}``) whose variable is unset or empty."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(name)
        self.name = name
        self.message = message

    def __str__(self) -> str:
        return f"required variable {self.name} is missing a value: {self.message}"


@dataclass(frozen=True)
class Reference:
    """One ``${...}`` in the file: the variable, its operator (``:-``, ``:?``, … or ``""``)."""

    name: str
    op: str
    arg: str

    @property
    def text(self) -> str:
        return f"${{{self.name}{self.op}{self.arg}}}" if self.op else f"${{{self.name}}}"


def references(text: str) -> list[Reference]:
    """Every variable reference in `text`, in order (``$$`` escapes are not references)."""
    found = []
    for m in _VAR.finditer(text):
        if m["escaped"]:
            continue
        name = m["braced"] or m["named"]
        found.append(Reference(name, m["op"] or "", m["arg"] or ""))
    return found


def file_references(text: str) -> list[Reference]:
    """Every variable reference in the compose file's values (comments are not interpolated)."""
    found: list[Reference] = []

    def walk(node: Any) -> None:
        if isinstance(node, str):
            found.extend(references(node))
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)

    walk(load(text))
    return found


def interpolate_text(text: str, env: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["named"]
        op, arg = m["op"] or "", interpolate_text(m["arg"] or "", env)
        value = env.get(name)
        present, non_empty = value is not None, bool(value)
        if op == ":-":
            return value if non_empty else arg  # type: ignore[return-value]
        if op == "-":
            return value if present else arg  # type: ignore[return-value]
        if op == ":?":
            if not non_empty:
                raise MissingVariable(name, arg)
            return value  # type: ignore[return-value]
        if op == "?":
            if not present:
                raise MissingVariable(name, arg)
            return value  # type: ignore[return-value]
        if op == ":+":
            return arg if non_empty else ""
        if op == "+":
            return arg if present else ""
        return value or ""

    return _VAR.sub(one, text)


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """`node` (parsed YAML) with every string value interpolated; mapping keys stay as they are."""
    if isinstance(node, str):
        return interpolate_text(node, env)
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    return node


def load(text: str | None = None) -> dict[str, Any]:
    """The compose file parsed (YAML anchors and ``<<`` merges resolved), not interpolated."""
    return yaml.safe_load(COMPOSE_FILE.read_text() if text is None else text)


def env_example_entries(text: str | None = None) -> dict[str, tuple[str, bool]]:
    """.env.example as {name: (value, active)}; ``active`` is False for a ``# NAME=value`` line."""
    text = ENV_EXAMPLE.read_text() if text is None else text
    entries: dict[str, tuple[str, bool]] = {}
    for line in text.splitlines():
        m = re.fullmatch(rf"(#\s*)?({_NAME})=(.*)", line.strip())
        if m:
            entries[m[2]] = (m[3], m[1] is None)
    return entries


def volume_mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """An interpolated service's named-volume mounts (short syntax): {volume: (target, mode)}."""
    mounts = {}
    for spec in service.get("volumes", []):
        source, target, *rest = spec.split(":")
        mounts[source] = (target, rest[0] if rest else "rw")
    return mounts


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    result = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), rest.strip()))
    return result
