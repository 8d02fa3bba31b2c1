"""Every setting of service/settings.py reaches a compose deployment: the api service's
environment passes it through as ``${XSAM_X:-<the model's default>}``, .env.example documents it
with the same default, and docs/api.md lists it. A setting added to the model alone fails here,
so the three cannot drift. No engine: the files are read as `docker compose` reads them
(tests/deploy/compose_file.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from compose_file import env_example_entries, interpolate, load, references

from service.settings import Settings

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"

#: Settings compose derives from its own wiring variables instead of ``${XSAM_X:-default}``
#: (the reason is the value).
WIRED = {
    "data_dir": "the API's state directory, ${API_STATE_DIR:-/var/lib/xsam}",
    "database_url": "built from the POSTGRES_* variables (the x-database-url anchor)",
    "artifacts_dir": "the artifacts volume's mount point, ${ARTIFACTS_DIR:-/artifacts}",
    "admin_token": "a required secret: ${XSAM_ADMIN_TOKEN:?...}",
}
#: Settings the api service does not take, with the reason.
NOT_PASSED = {
    "agent_token": "the migrate service registers it in the database with the agent role; the "
    "API then accepts it like any stored token",
}


def env_name(field: str) -> str:
    return f"XSAM_{field.upper()}"


def api_environment() -> dict[str, Any]:
    return load()["services"]["api"]["environment"]


def fields() -> list[str]:
    return list(Settings.model_fields)


def read_settings(env: dict[str, str]) -> dict[str, Any]:
    """The settings the API reads from exactly ``env`` (no other XSAM_ variable, no .env)."""
    with pytest.MonkeyPatch.context() as mp:
        for field in fields():
            mp.delenv(env_name(field), raising=False)
        for key, value in {"XSAM_DATA_DIR": "/tmp/xsam-settings", **env}.items():
            mp.setenv(key, str(value))
        return Settings(_env_file=None).model_dump()


@pytest.mark.parametrize("field", fields())
def test_every_setting_is_passed_to_the_api_with_its_default(field: str) -> None:
    name = env_name(field)
    environment = api_environment()
    if field in NOT_PASSED:
        assert name not in environment, f"{name}: documented as not passed ({NOT_PASSED[field]})"
        return
    assert name in environment, f"{name} is a setting the api service never receives"
    if field in WIRED:
        return
    refs = references(str(environment[name]))
    assert [(r.name, r.op) for r in refs] == [(name, ":-")], (
        f"{name}: pass it through as ${{{name}:-<default>}}, got {environment[name]!r}"
    )
    # The compose default, read the way the API reads it, is the model's own default.
    default = refs[0].arg
    parsed = read_settings({name: default})[field]
    expected = read_settings({})[field]
    assert parsed == expected, f"{name}: compose default {default!r}, the model's is {expected!r}"


@pytest.mark.parametrize("field", fields())
def test_every_setting_is_documented(field: str) -> None:
    name = env_name(field)
    entries = env_example_entries()
    if field not in WIRED and field not in NOT_PASSED:
        assert name in entries, f"{name} is not in .env.example"
    assert f"`{name}`" in API_DOC.read_text(), f"{name} is not in docs/api.md's settings table"


def test_the_compose_defaults_start_an_api_with_the_models_defaults() -> None:
    """The api service's environment as compose would set it from an .env that sets nothing
    but the secrets: the API reads exactly the model's defaults from it."""
    secrets = {"POSTGRES_PASSWORD": "p", "XSAM_ADMIN_TOKEN": "a", "XSAM_AGENT_TOKEN": "g",
               "RAY_AUTH_TOKEN": "r"}  # fmt: skip
    environment = interpolate(load(), secrets)["services"]["api"]["environment"]
    got = read_settings({k: str(v) for k, v in environment.items() if k.startswith("XSAM_")})
    want = read_settings({})
    tunable = [f for f in fields() if f not in WIRED and f not in NOT_PASSED]
    assert {f: got[f] for f in tunable} == {f: want[f] for f in tunable}
