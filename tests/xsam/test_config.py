"""TrainConfig: each bad value is refused with its field named; YAML and JSON files load."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from xsam.config import TrainConfig, describe_errors, load_config, locate_error
from xsam.errors import ConfigurationError, XsamError

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
    with pytest.raises(ConfigurationError, match=message):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigurationError, match="cannot read"):
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
    with pytest.raises(ConfigurationError, match=r"optimizer\.alpha_(delta|max):"):
        load_config(path)
    done = subprocess.run(
        [sys.executable, "-m", "cli", "train", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert "optimizer.alpha_" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("path", "value", "line"),
    [
        # each constraint type says what the value must be, and what it was
        ("optimizer.rho", -1.0, "optimizer.rho: must be >= 0 (got -1.0)"),
        ("optimizer.lr", 0, "optimizer.lr: must be > 0 (got 0.0)"),
        ("optimizer.lr", float("inf"), "optimizer.lr: must be a finite number (got inf)"),
        ("optimizer.rho", 1e308, "optimizer.rho: must be <= 1e+09 (got 1e+308)"),
        ("data.batch_size", 0, "data.batch_size: must be >= 1 (got 0)"),
        ("data.num_train", 2**31, "data.num_train: must be <= 2147483647 (got 2147483648)"),
        ("schedule.warmup_epochs", -1, "schedule.warmup_epochs: must be >= 0 (got -1)"),
        ("optimizer.momentum", 1.0, "optimizer.momentum: must be in [0, 1) (got 1.0)"),
        ("data.val_fraction", float("nan"), "data.val_fraction: must be in [0, 1) (got nan)"),
        ("optimizer.steps", 101, "optimizer.steps: must be in [1, 100] (got 101)"),
        ("resources.num_workers", 0, "resources.num_workers: must be in [1, 1024] (got 0)"),
        ("seed", 2**63, f"seed: must be in [0, 2**63) (got {2**63})"),
        ("optimizer.alpha", -1.0, 'optimizer.alpha: must be "dynamic" or a number >= 0 (got -1.0)'),
        ("model.name", "resnet999", "model.name: unknown model 'resnet999'; known: resnet18, "
         "resnet50, vgg11_bn, wrn16_8, mlp, cnn1d, densenet121"),
    ],
)  # fmt: skip
def test_each_constraint_gives_one_readable_line(path, value, line):
    with pytest.raises(ValidationError) as info:
        TrainConfig.model_validate(with_value(path, value))
    assert describe_errors(info.value) == [line]


@pytest.mark.parametrize(
    ("loc", "msg", "located"),
    [
        # a field's own check: pydantic's loc already ends with the field
        (("optimizer", "rho"), "Value error, must be >= 0 (got -1.0)",
         (("optimizer", "rho"), "must be >= 0 (got -1.0)")),
        # a cross-field check on the model names its field first: loc gets it
        (("optimizer",), "Value error, rho_max: must be >= rho (0.5) and <= 1e+09 (got 0.1)",
         (("optimizer", "rho_max"), "must be >= rho (0.5) and <= 1e+09 (got 0.1)")),
        # … on the top-level model, whose loc is empty
        ((), "Value error, cuda_graphs: one GPU only",
         (("cuda_graphs",), "one GPU only")),
        # a loc that already ends with the named field is not extended twice
        (("body", "config", "rho_max"), "rho_max: must be >= rho",
         (("body", "config", "rho_max"), "must be >= rho")),
        # pydantic's own messages name no field
        (("data", "name"), "Field required", (("data", "name"), "Field required")),
    ],
)  # fmt: skip
def test_locate_error_finds_the_field_an_error_is_about(loc, msg, located):
    assert locate_error(loc, msg) == located


def test_a_config_that_cannot_be_used_is_one_error_type(tmp_path):
    # load_config's errors are the ones training raises: a failed job, never retried.
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: cnn1d}\ndata: {name: mnist1d, batch_size: 0}\n")
    with pytest.raises(ConfigurationError) as info:
        load_config(path)
    assert isinstance(info.value, XsamError) and isinstance(info.value, ValueError)
    assert info.value.code == "invalid_config"
