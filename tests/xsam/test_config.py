"""TrainConfig: each bad value is refused with its field named; YAML and JSON files load."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from xsam.config import ConfigError, TrainConfig, describe_errors, load_config

BASE = {"model": {"name": "cnn1d"}, "data": {"name": "mnist1d"}}


def with_value(path: str, value):
    raw = json.loads(json.dumps(BASE))
    *parents, leaf = path.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("model.name", "resnet999", "model.name"),  # not in the registry
        ("model.extra", 1, "model.extra"),  # unknown keys are refused, not ignored
        ("data.name", "imagenet", "data.name"),  # no such data set offline
        ("data.root", "/etc", "data.root"),  # absolute paths escape the data root
        ("data.root", "a/../../b", "data.root"),  # so does '..'
        ("data.batch_size", 0, "data.batch_size"),
        ("data.num_train", 0, "data.num_train"),
        ("optimizer.name", "adam", "optimizer.name"),
        ("optimizer.lr", 0, "optimizer.lr"),
        ("optimizer.lr", float("inf"), "optimizer.lr"),
        ("optimizer.momentum", 1.0, "optimizer.momentum"),
        ("optimizer.weight_decay", -1e-4, "optimizer.weight_decay"),
        ("optimizer.rho", -0.1, "optimizer.rho"),
        ("optimizer.steps", 0, "optimizer.steps"),
        ("optimizer.alpha", -1.0, "optimizer.alpha"),
        ("optimizer.alpha", 3.0, "optimizer.alpha"),  # beyond alpha_max (cross-field)
        ("optimizer.rho_max", 0.01, "optimizer.rho_max"),  # below rho (cross-field)
        ("optimizer.alpha_delta", 1e-6, "optimizer.alpha_delta"),  # far too many probes
        ("optimizer.search_every", 0, "optimizer.search_every"),
        ("schedule.epochs", 0, "schedule.epochs"),
        ("schedule.lr_schedule", "linear", "schedule.lr_schedule"),
        ("schedule.warmup_epochs", 300, "schedule.warmup_epochs"),  # not < epochs
        ("resources.num_workers", 0, "resources.num_workers"),
        ("resources.cpus_per_worker", 0, "resources.cpus_per_worker"),
        ("seed", -1, "seed"),
        ("precision", "fp16", "precision"),  # fp16 needs a scaler XSAM does not fit
        ("eval_every", 0, "eval_every"),
        ("log_every", 0, "log_every"),
        # extreme numbers: refused naming the field, never an OverflowError (issue 9)
        ("optimizer.alpha_delta", 5e-324, "optimizer.alpha_delta"),  # α_max/Δα = inf
        ("optimizer.alpha_max", 1e308, "optimizer.alpha_max"),
        ("optimizer.lr", 1e308, "optimizer.lr"),
        ("optimizer.rho", 1e308, "optimizer.rho"),  # 2·ρ would be inf
        ("optimizer.rho_max", 1e308, "optimizer.rho_max"),
        ("resources.cpus_per_worker", 1e308, "resources.cpus_per_worker"),  # × workers
        ("data.batch_size", 10**30, "data.batch_size"),
        ("data.num_train", 2**63, "data.num_train"),
        ("optimizer.search_every", 2**31, "optimizer.search_every"),
        ("eval_every", 10**30, "eval_every"),
        ("log_every", 2**63, "log_every"),
        # free-form options must survive a JSON round trip
        ("model.options", {"width": float("nan")}, "model.options"),
        ("data.options", {"shape": [float("inf")]}, "data.options"),
        ("data.options", {"k": "\ud800"}, "data.options"),
    ],
)
def test_bad_value_names_its_field(path, value, field):
    with pytest.raises(ValidationError) as info:
        TrainConfig.model_validate(with_value(path, value))
    lines = describe_errors(info.value)
    assert any(line.startswith(f"{field}:") for line in lines), lines


def test_defaults_are_the_papers():
    config = TrainConfig.model_validate(BASE)
    o = config.optimizer
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.rho) == ("xsam", 0.05, 0.9, 1e-3, 0.15)
    assert o.effective_rho_max == pytest.approx(0.3) and o.effective_alpha == "dynamic"
    assert config.data.batch_size == 125 and config.schedule.epochs == 200


@pytest.mark.parametrize(("arm", "alpha"), [("sgd+", 0.0), ("sam", 1.0), ("xsam", "dynamic")])
def test_effective_alpha_per_arm(arm, alpha):
    config = TrainConfig.model_validate(with_value("optimizer.name", arm))
    assert config.optimizer.effective_alpha == alpha


def test_yaml_and_json_files_load_the_same(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(
        "model: {name: cnn1d}\ndata: {name: mnist1d, batch_size: 50}\n"
        "optimizer: {name: sam, rho: 0.1}\nschedule: {epochs: 3}\n"
    )
    raw = {
        "model": {"name": "cnn1d"},
        "data": {"name": "mnist1d", "batch_size": 50},
        "optimizer": {"name": "sam", "rho": 0.1},
        "schedule": {"epochs": 3},
    }
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps(raw))
    assert load_config(yaml_file) == load_config(json_file) == TrainConfig.model_validate(raw)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.yaml", "model: [unclosed", "not valid YAML"),
        ("bad.json", "{", "not valid JSON"),
        ("list.yaml", "- 1\n- 2\n", "mapping at the top level"),
        (
            "field.yaml",
            "model: {name: cnn1d}\ndata: {name: mnist1d, batch_size: -5}\n",
            "data.batch_size: must be >= 1",
        ),
    ],
)
def test_load_config_errors_are_readable(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_examples_are_valid():
    from pathlib import Path

    examples = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
    assert len(examples) >= 5
    for path in examples:
        load_config(path)


@pytest.mark.parametrize(
    "optimizer",
    [
        {"alpha_delta": 5e-324},
        {"alpha_max": 1e308, "alpha_delta": 1e-308},
    ],
)
def test_xsam_train_refuses_overflowing_config_with_exit_2(tmp_path, optimizer):
    # Was an OverflowError traceback (math.floor(inf)) from `xsam train`.
    import subprocess
    import sys

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, "optimizer": optimizer}))
    with pytest.raises(ConfigError, match=r"optimizer\.alpha_(delta|max):"):
        load_config(path)
    done = subprocess.run(
        [sys.executable, "-m", "cli", "train", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert "optimizer.alpha_" in done.stderr and "Traceback" not in done.stderr
