"""What the database can store and hand back as JSON, checked once on every request body.

Python's JSON parser accepts values that cannot make the round trip through the database and
back out as a JSON response: lone UTF-16 surrogates (``"\\ud800"``: not encodable as UTF-8, so
PostgreSQL refuses them and a row SQLite stored could never be rendered again), ``NaN`` and
``±Infinity`` (strict JSON has no such numbers; pydantic would silently turn them into null),
NUL characters (PostgreSQL text cannot hold them) and nesting deeper than any config needs.
`find_unstorable` finds the first such value by its path in the body, so that the 422 names
the field, whatever the request model; `printable` renders any such text safely for an echo.
"""

from __future__ import annotations

import math
from typing import Any

#: Deepest nesting of objects and lists a request body may have (configs and event data are
#: shallow; serialising a much deeper one to the JSON columns would fail).
MAX_DEPTH = 32

Path = tuple[str | int, ...]


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "text must not contain NUL (\\u0000) characters"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # Parsed JSON text fails UTF-8 only for a lone surrogate.
            return "text must not contain lone UTF-16 surrogates (\\ud800-\\udfff)"
    return None


def printable(text: str) -> str:
    """`text` with lone surrogates written as ``\\udxxx`` escapes (it can then be encoded)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def find_unstorable(value: Any) -> tuple[Path, str] | None:
    """(path, reason) of the first value in parsed JSON `value` that cannot be stored, or None.

    Dictionary keys are checked like text; a bad key's path ends with the key (made printable).
    """
    # Every request body is checked (a metrics batch holds thousands of values): a walk that
    # builds no paths first, and the paths only for a body that has a problem.
    return None if _all_storable(value) else _first_unstorable(value)


def _all_storable(value: Any) -> bool:
    level = [value]
    for depth in range(MAX_DEPTH + 1):
        below: list[Any] = []
        for item in level:
            kind = type(item)
            if kind is str:
                if "\x00" in item or (not item.isascii() and _text_problem(item) is not None):
                    return False
            elif kind is float:
                if not math.isfinite(item):
                    return False
            elif kind is list:
                if depth == MAX_DEPTH:
                    return False
                below.extend(item)
            elif kind is dict:
                if depth == MAX_DEPTH:
                    return False
                for key in item:
                    if type(key) is not str or "\x00" in key or not key.isascii():
                        return False  # rare: let the full walk judge it
                below.extend(item.values())
        if not below:
            return True
        level = below
    return True


def _first_unstorable(value: Any) -> tuple[Path, str] | None:
    # Level by level, not recursive: a deeply nested body must be a 422, not a RecursionError.
    level: list[tuple[Path, Any]] = [((), value)]
    for depth in range(MAX_DEPTH + 1):
        below: list[tuple[Path, Any]] = []
        for path, item in level:
            kind = type(item)  # parsed JSON: exactly str, dict, list, int, float, bool or None
            if kind is str:
                why = _text_problem(item)
                if why is not None:
                    return path, why
            elif kind is float:
                if not math.isfinite(item):
                    return (
                        path,
                        f"numbers must be finite; NaN and Infinity are not JSON (got {item})",
                    )
            elif kind is dict or kind is list:
                if depth == MAX_DEPTH:
                    return path, f"objects and lists must not nest deeper than {MAX_DEPTH} levels"
                if kind is list:
                    below.extend(((*path, i), v) for i, v in enumerate(item))
                    continue
                for key, v in item.items():
                    if type(key) is not str:
                        return path, "object keys must be text"
                    why = _text_problem(key)
                    if why is not None:
                        return (*path, printable(key)), why.replace("text", "object keys", 1)
                    below.append(((*path, key), v))
        if not below:
            break
        level = below
    return None
