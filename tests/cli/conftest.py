"""Fixtures of the CLI tests: the live server and database fixtures of tests/service (its
`service_support` module), for the commands that are run against a real server."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

# pytest finds fixtures by name in this namespace.
from service_support import (  # noqa: F401
    _templates,
    agent,
    app,
    client,
    db_url,
    live_server,
    settings,
)
