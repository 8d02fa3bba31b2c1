"""The option declarations (xsam/option_specs.py) match the builders, and refuse at validation
what the builders would refuse (or fail to allocate) only when the job runs."""

from __future__ import annotations

import inspect

import pytest
from pydantic import ValidationError

from xsam import data, models
from xsam.config import DATASET_NAMES, MODEL_NAMES, TrainConfig, describe_errors
from xsam.option_specs import DATASET_OPTIONS, MODEL_OPTIONS


def keyword_defaults(function, *, given: tuple[str, ...]) -> dict:
    """The keyword arguments of `function` a config's options may set (not those it is given)."""
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if (p.kind is p.KEYWORD_ONLY or p.default is not p.empty) and name not in given
    }


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_declarations_match_the_builders(name):
    declared = MODEL_OPTIONS[name]().model_dump()
    builder = keyword_defaults(models.MODELS[name], given=("input_shape", "num_classes"))
    assert set(declared) == set(builder)
    for key, default in builder.items():
        assert declared[key] == (list(default) if isinstance(default, tuple) else default), key


def test_dataset_declarations_match_the_loaders():
    assert set(DATASET_OPTIONS) == set(DATASET_NAMES)
    assert DATASET_OPTIONS["mnist1d"]().model_dump() == data.MNIST1D_DEFAULTS
    synthetic = keyword_defaults(data._synthetic, given=("directory",))
    declared = DATASET_OPTIONS["synthetic"]().model_dump()
    assert declared == {k: list(v) if isinstance(v, tuple) else v for k, v in synthetic.items()}
    # (its loader reads `size` from **options: the default is checked here by hand)
    assert DATASET_OPTIONS["tiny_imagenet"]().model_dump() == {"size": 32}
    for name in ("digits", "cifar10", "cifar100"):
        assert DATASET_OPTIONS[name].model_fields == {}


@pytest.mark.parametrize(
    ("section", "options", "field", "reason"),
    [
        ("model", {"name": "mlp", "options": {"depthh": 3}}, "model.options", "depthh: not an"),
        ("model", {"name": "mlp", "options": {"hidden": [256] * 1000}}, "model.options", "hidden"),
        ("model", {"name": "resnet18", "options": {"width": 10**6}}, "model.options", "width"),
        ("data", {"name": "digits", "options": {"colour": "red"}}, "data.options", "colour"),
        # a resource bomb: 10^9 CIFAR-sized samples would be 12 TB
        ("data", {"name": "synthetic", "options": {"num_train": 10**9}}, "data.options",
         "num_train"),
        ("data", {"name": "synthetic", "options": {"shape": [3, 4096, 4096], "num_train": 1000}},
         "data.options", "GiB of samples"),
    ],
)  # fmt: skip
def test_config_refuses_undeclared_and_oversized_options(section, options, field, reason):
    raw = {"model": {"name": "mlp"}, "data": {"name": "digits"}, section: options}
    with pytest.raises(ValidationError) as info:
        TrainConfig.model_validate(raw)
    lines = describe_errors(info.value)
    assert any(line.startswith(f"{field}:") and reason in line for line in lines), lines


def test_declared_options_are_accepted():
    TrainConfig.model_validate(
        {
            "model": {"name": "wrn16_8", "options": {"depth": 22, "dropout": 0.3}},
            "data": {"name": "synthetic", "options": {"shape": [3, 32, 32], "num_train": 1000}},
        }
    )
