"""Text from the service, made safe to print on a terminal.

Job names, tags, event messages and error messages are chosen by whoever submitted or ran the
job. Printed raw, an ESC sequence in one can move the cursor, rewrite earlier lines, set the
window title or hide text; bidi overrides can reorder what is shown. Every control character
except tab and newline (and the bidi controls) is shown as an escape (``\\x1b``) instead.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_controls(value: Any) -> Any:
    """`value` (text, a contract model, or JSON made of dicts and lists) with control
    characters escaped; enum members (statuses, roles) are kept as they are."""
    if isinstance(value, Enum):
        return value
    if isinstance(value, BaseModel):
        # No validation: an escape may lengthen a text past the field's wire limit.
        fields = {name: escape_controls(getattr(value, name)) for name in type(value).model_fields}
        return type(value).model_construct(value.model_fields_set, **fields)
    if isinstance(value, str):
        return _CONTROL.sub(_escape, value)
    if isinstance(value, dict):
        return {escape_controls(k): escape_controls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [escape_controls(v) for v in value]
    return value


class EscapedClient:
    """Wraps an `XsamClient`: every reply comes back with its text escaped for a terminal."""

    def __init__(self, api: Any) -> None:
        self.raw = api

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.raw, name)
        if not callable(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            return escape_controls(method(*args, **kwargs))

        return call


def iso_time(time: datetime) -> str:
    """`time` as the API's JSON writes it (ISO 8601, ``Z`` for UTC)."""
    text = time.isoformat()
    return text[: -len("+00:00")] + "Z" if text.endswith("+00:00") else text
