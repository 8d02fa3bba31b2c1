"""Fixtures of the service tests. They live in `service_support` (a unique module name) because
tests import helpers from it, and `import conftest` would find whichever directory's conftest
pytest loaded first."""

# pytest finds fixtures by name in this namespace.
from service_support import (  # noqa: F401
    _templates,
    agent,
    alice,
    app,
    bob,
    client,
    db_url,
    live_server,
    settings,
)
