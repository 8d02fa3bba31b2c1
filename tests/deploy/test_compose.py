"""The deployment files, checked without a Docker engine: docker-compose.yml, .env.example and the
two Dockerfiles. Each check returns the problems it finds; the real files must have none, and
`test_checks_catch_broken_files` shows, by breaking copies of the files, that a check fails when
the property it guards is gone (so none of them passes vacuously)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from typing import Any

import pytest
from compose_file import (
    API_DOCKERFILE,
    COMPOSE_FILE,
    ENV_EXAMPLE,
    RAY_DOCKERFILE,
    REPO,
    MissingVariable,
    dockerfile_instructions,
    env_example_entries,
    file_references,
    interpolate,
    load,
    references,
    volume_mounts,
)

SECRETS = ("POSTGRES_PASSWORD", "XSAM_ADMIN_TOKEN", "XSAM_AGENT_TOKEN", "RAY_AUTH_TOKEN")
#: A variable whose name says it holds a secret must never have a default.
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|_KEY\b")
SERVICES = ("postgres", "migrate", "api", "ray-head", "ray-worker")
RAY_SERVICES = ("ray-head", "ray-worker")
DEPENDENCIES = {
    # (service, dependency): condition
    ("migrate", "postgres"): "service_healthy",
    ("api", "migrate"): "service_completed_successfully",
    ("ray-head", "api"): "service_healthy",  # the agent talks to the API from its first second
    ("ray-worker", "ray-head"): "service_healthy",
}


def filled_env() -> dict[str, str]:
    """What a user's .env holds after filling in .env.example's secrets."""
    return {name: f"secret-{name.lower()}" for name in SECRETS}


def resolved(text: str) -> dict[str, Any]:
    return interpolate(load(text), filled_env())


def pip_installs(text: str) -> list[list[str]]:
    """The arguments of every `pip install` in the Dockerfile's RUN instructions."""
    installs = []
    for word, args in dockerfile_instructions(text):
        if word != "RUN":
            continue
        commands: list[list[str]] = [[]]
        for token in shlex.split(args):
            if token in ("&&", "||", ";"):
                commands.append([])
            else:
                commands[-1].append(token)
        for tokens in commands:
            if tokens[:2] == ["pip", "install"] or tokens[1:4] == ["-m", "pip", "install"]:
                installs.append(tokens[tokens.index("install") + 1 :])
    return installs


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def head_command(compose: dict[str, Any]) -> str:
    command = compose["services"]["ray-head"]["command"]
    return command[-1] if isinstance(command, list) else command


def flag(command: str, name: str) -> str | None:
    m = re.search(rf"{re.escape(name)}[= ]\"?([^\s\"]+)", command)
    return m[1] if m else None


# --- the checks -------------------------------------------------------------------------------


def check_services(text: str) -> list[str]:
    services = resolved(text)["services"]
    return [f"service {name!r} is missing" for name in SERVICES if name not in services]


def check_dependencies(text: str) -> list[str]:
    services = resolved(text)["services"]
    problems = []
    for (name, dependency), condition in DEPENDENCIES.items():
        depends_on = services.get(name, {}).get("depends_on", {})
        got = (
            depends_on.get(dependency, {}).get("condition")
            if isinstance(depends_on, dict)
            else None
        )
        if got != condition:
            problems.append(f"{name} must depend on {dependency} with {condition}, got {got}")
    if services.get("migrate", {}).get("restart", "no") != "no":
        problems.append("migrate is a one-shot step and must not restart")
    return problems


def check_healthchecks(text: str, api_dockerfile: str) -> list[str]:
    services = resolved(text)["services"]
    problems = []
    healthcheck_in_image = {
        "api": any(word == "HEALTHCHECK" for word, _ in dockerfile_instructions(api_dockerfile))
    }
    for (_, dependency), condition in DEPENDENCIES.items():
        if condition == "service_healthy" and not (
            services.get(dependency, {}).get("healthcheck") or healthcheck_in_image.get(dependency)
        ):
            problems.append(f"{dependency} is waited on until healthy but has no healthcheck")
    postgres_test = " ".join(services["postgres"].get("healthcheck", {}).get("test", []))
    if "pg_isready" not in postgres_test:
        problems.append("postgres's healthcheck must run pg_isready")
    head_test = services["ray-head"].get("healthcheck", {}).get("test", [])
    if "health-check" not in head_test:
        problems.append("ray-head's healthcheck must run `ray health-check`")
    return problems


def check_volumes(text: str) -> list[str]:
    compose = resolved(text)
    services = compose["services"]
    declared = set(compose.get("volumes") or {})
    problems = [
        f"volume {name!r} is not declared"
        for name in ("pgdata", "datasets", "checkpoints", "artifacts")
        if name not in declared
    ]
    mounts = {name: volume_mounts(service) for name, service in services.items()}
    for name, service_mounts in mounts.items():
        problems += [
            f"{name} mounts undeclared volume {v!r}" for v in service_mounts if v not in declared
        ]
    if "pgdata" not in mounts["postgres"]:
        problems.append("postgres must keep its data in the pgdata volume")
    for name in RAY_SERVICES:
        got = mounts[name]
        if got.get("datasets", ("", ""))[1] != "ro":
            problems.append(f"{name} must mount the datasets volume read-only")
        for volume in ("checkpoints", "artifacts"):
            if got.get(volume, ("", ""))[1] != "rw":
                problems.append(f"{name} must mount the {volume} volume read-write")
    for name, service_mounts in mounts.items():
        if service_mounts.get("datasets", ("", "ro"))[1] != "ro":
            problems.append(f"{name} mounts the datasets volume writable")
    if "artifacts" not in mounts["api"]:
        problems.append("api must mount the artifacts volume to serve the trained weights")
    # The paths the programs are given must be where the volumes are, on every node alike (a rank
    # on a worker writes the checkpoint and the weights that the head's agent and the API read).
    for volume in ("datasets", "checkpoints", "artifacts"):
        targets = {mounts[name].get(volume, ("?",))[0] for name in RAY_SERVICES}
        if len(targets) != 1:
            problems.append(f"the {volume} volume is mounted at different paths: {targets}")
    command = head_command(compose)
    for option, volume in [
        ("--data-root", "datasets"),
        ("--storage-path", "checkpoints"),
        ("--artifacts-dir", "artifacts"),
    ]:
        target = mounts["ray-head"].get(volume, ("?",))[0]
        if flag(command, option) != target:
            problems.append(
                f"the agent's {option} {flag(command, option)} is not where {volume} is mounted ({target})"
            )
    api_artifacts = services["api"].get("environment", {}).get("XSAM_ARTIFACTS_DIR")
    if api_artifacts != mounts["api"].get("artifacts", ("?",))[0]:
        problems.append(f"the API's XSAM_ARTIFACTS_DIR {api_artifacts} is not the artifacts mount")
    return problems


def check_gpu_reservation(text: str) -> list[str]:
    worker = resolved(text)["services"]["ray-worker"]
    devices = (
        worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    )
    if not any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices):
        return [
            "ray-worker must reserve GPUs (deploy.resources.reservations.devices, nvidia, [gpu])"
        ]
    return []


def check_worker_scalable(text: str) -> list[str]:
    worker = resolved(text)["services"]["ray-worker"]
    problems = []
    if "container_name" in worker:
        problems.append("ray-worker has a container_name: `--scale ray-worker=N` would clash")
    if worker.get("ports"):
        problems.append("ray-worker publishes host ports: `--scale ray-worker=N` would clash")
    return problems


def check_dashboard_private(text: str) -> list[str]:
    compose = resolved(text)
    head = compose["services"]["ray-head"]
    problems = []
    if head.get("ports"):
        problems.append(
            f"ray-head publishes ports {head['ports']}: the dashboard must stay private"
        )
    if head.get("network_mode") == "host":
        problems.append("ray-head uses the host network: its ports would all be reachable")
    if flag(head_command(compose), "--dashboard-host") not in ("127.0.0.1", "localhost"):
        problems.append("the dashboard must listen on loopback (--dashboard-host=127.0.0.1)")
    dashboard_port = flag(head_command(compose), "--dashboard-port") or "8265"
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            if str(port).rsplit(":", 1)[-1].split("/")[0] == dashboard_port:
                problems.append(f"{name} publishes the dashboard's port {port}")
    return problems


def check_secrets(text: str) -> list[str]:
    refs = file_references(text)
    problems = [
        f"{ref.text} gives a secret a default or lets it be empty: use ${{{ref.name}:?message}}"
        for ref in refs
        if SECRET_NAME.search(ref.name) and (ref.op != ":?" or not ref.arg.strip())
    ]
    referenced = {ref.name for ref in refs}
    problems += [f"secret {name} is not used" for name in SECRETS if name not in referenced]
    # A secret-looking setting must take its value from a required variable, never a literal.
    for name, service in load(text)["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key) and not any(
                r.op == ":?" and SECRET_NAME.search(r.name) for r in references(str(value))
            ):
                problems.append(f"{name}: {key} is set without a required secret variable")
    for name in SECRETS:
        env = filled_env()
        del env[name]
        try:
            interpolate(load(text), env)
        except MissingVariable as exc:
            if exc.name != name:
                problems.append(f"without {name}, compose stops at {exc.name} instead")
        else:
            problems.append(f"compose would start without {name}")
    return problems


def check_env_example(text: str, env_text: str) -> list[str]:
    entries = env_example_entries(env_text)
    refs = file_references(text)
    used = {ref.name for ref in refs}
    problems = [
        f"{name} is used by the compose file but not in .env.example"
        for name in sorted(used - set(entries))
    ]
    problems += [
        f".env.example lists {name}, which the compose file never uses"
        for name in sorted(set(entries) - used)
    ]
    for name in SECRETS:
        if entries.get(name) != ("", True):
            problems.append(f".env.example must list {name}= uncommented and empty")
    for ref in refs:
        if ref.op == ":-" and ref.name in entries and entries[ref.name][0] != ref.arg:
            problems.append(
                f".env.example says {ref.name}={entries[ref.name][0]}, the compose default is {ref.arg!r}"
            )
    return problems


def check_ray_auth(text: str, other_files: dict[str, str]) -> list[str]:
    services = resolved(text)["services"]
    problems = []
    for name, service in services.items():
        runs_ray = re.search(
            r"\bray\b", json.dumps([service.get("command"), service.get("healthcheck")])
        )
        if not runs_ray and name not in RAY_SERVICES:
            continue
        env = service.get("environment") or {}
        if env.get("RAY_AUTH_MODE") != "token" or not env.get("RAY_AUTH_TOKEN"):
            problems.append(f"{name} runs Ray without RAY_AUTH_MODE=token and a RAY_AUTH_TOKEN")
    for filename, content in {"docker-compose.yml": text, **other_files}.items():
        for mode in re.findall(r"RAY_AUTH_MODE\W+(\w+)", content):
            if mode != "token":
                problems.append(f"{filename} sets RAY_AUTH_MODE={mode}")
    return problems


def check_api_dockerfile(dockerfile: str) -> list[str]:
    instructions = dockerfile_instructions(dockerfile)
    problems = []
    base = next((args for word, args in instructions if word == "FROM"), "")
    if not re.fullmatch(r"python:3\.11-slim\S*", base):
        problems.append(f"the API image must be based on python:3.11-slim, not {base!r}")
    installs = pip_installs(dockerfile)
    extras = {
        e.strip()
        for args in installs
        for m in re.findall(r"\.\[([^\]]*)\]", " ".join(args))
        for e in m.split(",")
    }
    if extras != {"api"}:
        problems.append(f"the API image must install the api extra only, installs {sorted(extras)}")
    for args in installs:
        if any(re.match(r"(torch|ray)\b", arg) for arg in args):
            problems.append(f"the API image installs torch or ray: pip install {' '.join(args)}")
    api_extra = pyproject()["project"]["optional-dependencies"]["api"]
    if any(re.match(r"(torch|ray|xsam-service\[)", req) for req in api_extra):
        problems.append(f"pyproject's api extra pulls in torch, ray or another extra: {api_extra}")
    users = [args for word, args in instructions if word == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the API image must run as a non-root USER")
    healthchecks = [args for word, args in instructions if word == "HEALTHCHECK"]
    if not healthchecks or "/healthz" not in healthchecks[-1] or "urllib" not in healthchecks[-1]:
        problems.append("the API image needs a HEALTHCHECK that GETs /healthz with python's urllib")
    return problems


def check_ray_dockerfile(dockerfile: str) -> list[str]:
    extras = pyproject()["project"]["optional-dependencies"]
    torch_pin = next(
        re.search(r"<=\s*([\d.]+)", r)[1] for r in extras["train"] if r.startswith("torch")
    )
    ray_pin = next(
        re.search(r"==\s*([\d.]+)", r)[1] for r in extras["agent"] if r.startswith("ray")
    )
    installs = " ".join(" ".join(args) for args in pip_installs(dockerfile))
    problems = []
    if f"torch=={torch_pin}" not in installs:
        problems.append(f"the Ray image must pin torch=={torch_pin} (pyproject's train extra)")
    if not re.search(rf"ray\[[^\]]*\]=={re.escape(ray_pin)}\b", installs):
        problems.append(f"the Ray image must pin ray=={ray_pin} (pyproject's agent extra)")
    if ".[agent]" not in installs:
        problems.append("the Ray image must install this project's agent extra")
    for other in re.findall(r"\b(?:torch|ray\[[^\]]*\])==([\d.]+)", installs):
        if other not in (torch_pin, ray_pin):
            problems.append(f"the Ray image pins a version pyproject does not: {other}")
    users = [args for word, args in dockerfile_instructions(dockerfile) if word == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the Ray image must run as a non-root USER")
    return problems


# --- the real files pass ----------------------------------------------------------------------

COMPOSE = COMPOSE_FILE.read_text()
ENV = ENV_EXAMPLE.read_text()
API = API_DOCKERFILE.read_text()
RAY = RAY_DOCKERFILE.read_text()
OTHERS = {".env.example": ENV, "api.Dockerfile": API, "ray.Dockerfile": RAY}

CHECKS: dict[str, Callable[[str, str, str, str], list[str]]] = {
    "services": lambda c, e, a, r: check_services(c),
    "dependencies": lambda c, e, a, r: check_dependencies(c),
    "healthchecks": lambda c, e, a, r: check_healthchecks(c, a),
    "volumes": lambda c, e, a, r: check_volumes(c),
    "gpu reservation": lambda c, e, a, r: check_gpu_reservation(c),
    "worker scalable": lambda c, e, a, r: check_worker_scalable(c),
    "dashboard private": lambda c, e, a, r: check_dashboard_private(c),
    "secrets": lambda c, e, a, r: check_secrets(c),
    ".env.example": lambda c, e, a, r: check_env_example(c, e),
    "ray auth": lambda c, e, a, r: check_ray_auth(
        c, {".env.example": e, "api.Dockerfile": a, "ray.Dockerfile": r}
    ),
    "api image": lambda c, e, a, r: check_api_dockerfile(a),
    "ray image": lambda c, e, a, r: check_ray_dockerfile(r),
}


@pytest.mark.parametrize("check", CHECKS)
def test_deployment_files(check: str) -> None:
    assert CHECKS[check](COMPOSE, ENV, API, RAY) == []


def in_service(text: str, service: str, old: str, new: str) -> str:
    """`text` with `old` replaced by `new` inside one service's block only."""
    start = text.index(f"\n  {service}:\n")
    end = text.find("\n  ", start + 1)
    while end != -1 and text[end + 3] == " ":
        end = text.find("\n  ", end + 1)
    end = len(text) if end == -1 else end
    block = text[start:end]
    assert old in block, f"{old!r} not in {service}"
    return text[:start] + block.replace(old, new, 1) + text[end:]


def replace(text: str, old: str, new: str) -> str:
    assert old in text, f"{old!r} not in the file"
    return text.replace(old, new)


# (check, which file the mutation breaks, the mutation)
BROKEN = [
    # a secret with a default: compose would start with a guessable token
    (
        "secrets",
        "compose",
        lambda t: replace(t, "${RAY_AUTH_TOKEN:?", "${RAY_AUTH_TOKEN:-changeme"),
    ),
    # a literal password in the file
    (
        "secrets",
        "compose",
        lambda t: replace(
            t,
            "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env (see .env.example)}",
            "POSTGRES_PASSWORD: hunter2",
        ),
    ),
    # workers could write into the data sets
    ("volumes", "compose", lambda t: in_service(t, "ray-worker", ":-/data}:ro", ":-/data}")),
    # the agent looks for data where no volume is mounted
    (
        "volumes",
        "compose",
        lambda t: replace(t, "--data-root=${DATASETS_DIR:-/data}", "--data-root=/datasets"),
    ),
    # the API would start before the schema exists
    (
        "dependencies",
        "compose",
        lambda t: in_service(t, "api", "service_completed_successfully", "service_started"),
    ),
    (
        "dependencies",
        "compose",
        lambda t: in_service(t, "migrate", "service_healthy", "service_started"),
    ),
    # waiting for a healthy ray-head that has no healthcheck would never end
    (
        "healthchecks",
        "compose",
        lambda t: in_service(t, "ray-head", "healthcheck:", "x-healthcheck:"),
    ),
    (
        "dashboard private",
        "compose",
        lambda t: in_service(
            t, "ray-head", "    init: true\n", '    init: true\n    ports: ["8265:8265"]\n'
        ),
    ),
    (
        "dashboard private",
        "compose",
        lambda t: replace(t, "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"),
    ),
    (
        "worker scalable",
        "compose",
        lambda t: in_service(
            t, "ray-worker", "    init: true\n", "    init: true\n    container_name: ray-worker\n"
        ),
    ),
    (
        "gpu reservation",
        "compose",
        lambda t: in_service(t, "ray-worker", "driver: nvidia", "driver: none"),
    ),
    (
        "ray auth",
        "compose",
        lambda t: replace(t, "RAY_AUTH_MODE: token", "RAY_AUTH_MODE: disabled"),
    ),
    ("ray auth", "ray", lambda t: t + "\nENV RAY_AUTH_MODE=disabled\n"),
    # a variable the user cannot find in .env.example
    (".env.example", "env", lambda t: replace(t, "RAY_SHM_SIZE=8gb\n", "")),
    # documentation that disagrees with the default
    (".env.example", "env", lambda t: replace(t, "XSAM_API_PUBLISH=8000", "XSAM_API_PUBLISH=8080")),
    ("api image", "api", lambda t: replace(t, '".[api]"', '".[api,agent]"')),
    ("api image", "api", lambda t: replace(t, "\nUSER xsam\n", "\n")),
    ("api image", "api", lambda t: replace(t, "HEALTHCHECK", "# HEALTHCHECK")),
    ("ray image", "ray", lambda t: replace(t, "torch==2.13.0", "torch==2.12.0")),
]


@pytest.mark.parametrize(("check", "which", "mutate"), BROKEN)
def test_checks_catch_broken_files(check: str, which: str, mutate: Callable[[str], str]) -> None:
    files = {"compose": COMPOSE, "env": ENV, "api": API, "ray": RAY}
    files[which] = mutate(files[which])
    assert CHECKS[check](files["compose"], files["env"], files["api"], files["ray"]) != []


def test_compose_refuses_to_start_without_each_secret() -> None:
    for name in SECRETS:
        env = filled_env()
        env[name] = ""  # an unfilled `NAME=` line from .env.example
        with pytest.raises(MissingVariable, match=name):
            interpolate(load(COMPOSE), env)


#: What a Compose v1 user installs instead (the file uses v2's top-level `name:`, v1 refuses it).
COMPOSE_V2_HINT = (
    "the deployment needs Compose v2: install the `docker-compose-plugin` package (Docker's apt "
    "repository) or Debian's `docker-compose-v2`, then use `docker compose`"
)


def compose_version(binary: list[str]) -> str | None:
    """``X.Y.Z`` as ``<binary> version --short`` prints it (v2 may prefix a ``v``), else None."""
    try:
        out = subprocess.run(
            [*binary, "version", "--short"], capture_output=True, text=True, timeout=30
        )
    except OSError:
        return None
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", out.stdout)
    return match[0] if out.returncode == 0 and match else None


def compose_binary() -> tuple[list[str] | None, str]:
    """The Compose v2 command to check the file with, else None and why it cannot be used.

    ``XSAM_COMPOSE_BIN`` names one explicitly; otherwise ``docker compose`` (the v2 plugin),
    then a ``docker-compose`` binary (v2 standalone, or Debian 12's v1, which is refused).
    """
    candidates = []
    if os.environ.get("XSAM_COMPOSE_BIN"):
        candidates.append(shlex.split(os.environ["XSAM_COMPOSE_BIN"]))
    else:
        if shutil.which("docker"):
            candidates.append(["docker", "compose"])
        if shutil.which("docker-compose"):
            candidates.append(["docker-compose"])
    if not candidates:
        return None, "no `docker compose` or `docker-compose` here (set XSAM_COMPOSE_BIN to one)"
    reasons = []
    for binary in candidates:
        version = compose_version(binary)
        if version is None:
            reasons.append(f"`{shlex.join(binary)}` is not a working Compose (`version --short`)")
        elif int(version.split(".")[0]) < 2:
            reasons.append(f"`{shlex.join(binary)}` is Compose v1 ({version}): {COMPOSE_V2_HINT}")
        else:
            return binary, ""
    return None, "; ".join(reasons)


def stand_in_compose(tmp_path, version: str):
    """A script that answers ``version --short`` as a Compose binary of ``version`` would."""
    script = tmp_path / f"compose-{version}"
    script.write_text(
        "#!/bin/sh\n"
        f'[ "$1 $2" = "version --short" ] && {{ echo {version}; exit 0; }}\n'
        "echo unsupported >&2; exit 1\n"
    )
    script.chmod(0o755)
    return str(script)


def test_compose_v1_is_refused_with_what_to_install(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XSAM_COMPOSE_BIN", stand_in_compose(tmp_path, "1.29.2"))
    binary, reason = compose_binary()
    assert binary is None
    assert "Compose v1 (1.29.2)" in reason and "docker-compose-plugin" in reason


def test_compose_v2_is_used(tmp_path, monkeypatch) -> None:
    v2 = stand_in_compose(tmp_path, "2.27.0")
    monkeypatch.setenv("XSAM_COMPOSE_BIN", v2)
    assert compose_binary() == ([v2], "")


def test_docker_compose_reads_the_file_as_the_tests_do(tmp_path) -> None:
    """`docker compose config` (no engine needed) accepts the file, and its interpolation of every
    command, environment and healthcheck equals ours, which the topology test relies on."""
    binary, reason = compose_binary()
    if binary is None:
        pytest.skip(reason)
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in filled_env().items()))
    clean = {k: v for k, v in os.environ.items() if not re.match(r"(POSTGRES|XSAM|RAY)_", k)}
    out = subprocess.run(
        [
            *binary,
            "--project-directory",
            str(REPO),
            "-f",
            str(COMPOSE_FILE),
            "--env-file",
            str(env_file),
            "config",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=clean,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    theirs = json.loads(out.stdout)["services"]
    ours = resolved(COMPOSE)["services"]

    def escaped(node: Any) -> Any:  # `config` writes a literal $ back as $$
        return json.loads(json.dumps(node).replace("$", "$$"))

    for name, service in ours.items():
        assert theirs[name].get("command") == escaped(service.get("command")), name
        assert theirs[name].get("environment", {}) == {
            k: str(v) for k, v in escaped(service.get("environment") or {}).items()
        }, name
        if "healthcheck" in service:
            assert theirs[name]["healthcheck"]["test"] == escaped(service["healthcheck"]["test"]), (
                name
            )
