"""What options each registry entry accepts: names, types and bounds, checked at submit.

`xsam/models.py` and `xsam/data.py` build what a config names and refuse unknown options there,
but only when the job runs, on a GPU node, after it has waited in the queue. These declarations
let `TrainConfig` (no torch) refuse the same things at submit, with the field named, and also
sizes no node can hold (a synthetic data set of 10^30 samples, an MLP a million layers deep)
that would otherwise fail only at allocation. A test keeps the names here equal to the
builders' keyword arguments (tests/xsam/test_option_specs.py).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

#: Largest in-memory size of a generated data set (float32 samples): more than this is a size
#: a training node is not expected to hold, refused at submit rather than at allocation.
MAX_GENERATED_BYTES = 8 * 1024**3


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


Width = Annotated[int, Field(ge=1, le=4096)]


class _WidthOptions(_Options):
    width: Width = 64


class _VGGOptions(_Options):
    width: Width = 64
    hidden: int = Field(default=4096, ge=1, le=65536)
    dropout: float = Field(default=0.5, ge=0.0, lt=1.0)


class _WideResNetOptions(_Options):
    depth: int = Field(default=16, ge=10, le=100)
    widen_factor: int = Field(default=8, ge=1, le=32)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class _MLPOptions(_Options):
    hidden: list[Annotated[int, Field(ge=1, le=65536)]] = Field(
        default_factory=lambda: [256, 256], max_length=64
    )
    batch_norm: bool = False


class _CNN1DOptions(_Options):
    channels: Width = 32
    depth: int = Field(default=3, ge=1, le=16)


class _DenseNetOptions(_Options):
    growth_rate: int = Field(default=32, ge=1, le=256)


class _NoOptions(_Options):
    pass


class _TinyImageNetOptions(_Options):
    size: int = Field(default=32, ge=8, le=64)


class _MNIST1DOptions(_Options):
    num_samples: int = Field(default=5000, ge=10, le=1_000_000)
    train_split: float = Field(default=0.8, gt=0.0, lt=1.0)
    template_len: int = Field(default=12, ge=1, le=1000)
    padding: list[Annotated[int, Field(ge=0, le=10_000)]] = Field(
        default_factory=lambda: [36, 60], min_length=2, max_length=2
    )
    scale_coeff: float = Field(default=0.4, ge=0.0, le=100.0)
    max_translation: int = Field(default=48, ge=0, le=10_000)
    corr_noise_scale: float = Field(default=0.25, ge=0.0, le=100.0)
    iid_noise_scale: float = Field(default=0.02, ge=0.0, le=100.0)
    shear_scale: float = Field(default=0.75, ge=0.0, le=100.0)
    shuffle_seq: bool = False
    final_seq_length: int = Field(default=40, ge=1, le=100_000)
    seed: int = Field(default=42, ge=0, le=2**32 - 1)


class _SyntheticOptions(_Options):
    shape: list[Annotated[int, Field(ge=1, le=65536)]] = Field(
        default_factory=lambda: [3, 32, 32], min_length=1, max_length=4
    )
    num_classes: int = Field(default=10, ge=2, le=100_000)
    num_train: int = Field(default=512, ge=1, le=100_000_000)
    num_test: int = Field(default=128, ge=1, le=100_000_000)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)

    @model_validator(mode="after")
    def _fits_a_node(self) -> _SyntheticOptions:
        size = 4 * (self.num_train + self.num_test) * math.prod(self.shape)
        if size > MAX_GENERATED_BYTES:
            raise ValueError(
                f"{size / 1024**3:.3g} GiB of samples ((num_train + num_test) x shape x 4 "
                f"bytes); at most {MAX_GENERATED_BYTES / 1024**3:g} GiB fit a node"
            )
        return self


#: model name -> its options (keys equal xsam.config.MODEL_NAMES; a test keeps them in step).
MODEL_OPTIONS: dict[str, type[_Options]] = {
    "resnet18": _WidthOptions,
    "resnet50": _WidthOptions,
    "vgg11_bn": _VGGOptions,
    "wrn16_8": _WideResNetOptions,
    "mlp": _MLPOptions,
    "cnn1d": _CNN1DOptions,
    "densenet121": _DenseNetOptions,
}

#: data set name -> its options (keys equal xsam.config.DATASET_NAMES).
DATASET_OPTIONS: dict[str, type[_Options]] = {
    "mnist1d": _MNIST1DOptions,
    "digits": _NoOptions,
    "cifar10": _NoOptions,
    "cifar100": _NoOptions,
    "synthetic": _SyntheticOptions,
    "tiny_imagenet": _TinyImageNetOptions,
}


def option_problems(declared: type[_Options], options: dict[str, Any]) -> list[str]:
    """``"<key>: reason"`` for each option `declared` refuses (an unknown key included)."""
    try:
        declared.model_validate(options)
    except ValidationError as exc:
        problems = []
        for item in exc.errors():
            where = ".".join(str(p) for p in item["loc"])
            reason = item["msg"].removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                known = ", ".join(declared.model_fields) or "none"
                reason = f"not an option here (options: {known})"
            problems.append(f"{where}: {reason}" if where else reason)
        return problems
    return []
