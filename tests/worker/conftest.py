"""The agent's end-to-end tests need ray and the API's packages; their fixtures (one local Ray
cluster per session, real `xsam serve` processes) live in tests/ray_support.py."""

import pytest

pytest.importorskip("ray")
pytest.importorskip("fastapi")
