"""The model registry: every network a TrainConfig can name, built for its data set's shape.

``build_model("resnet18", input_shape=(3, 32, 32), num_classes=10)`` or
``build_model(config.model, input_shape=..., num_classes=...)``. The input shape excludes the
batch dimension: ``(C, H, W)`` for images, ``(C, L)`` for 1-D signals. Options a model does not
accept raise `ConfigurationError` naming ``model.options.<key>``; a model that cannot take the
data's shape raises `ModelError`.

- ``resnet18`` / ``resnet50`` — CIFAR-style ResNets (3×3 stem, no max-pool); option ``width``
  (channels of the first stage, default 64).
- ``vgg11_bn`` — VGG-11 with BatchNorm and the reference head 512→4096→4096→C (ReLU, Dropout);
  needs H, W >= 32; options ``width`` (64), ``hidden`` (4096), ``dropout`` (0.5).
- ``wrn16_8`` — WideResNet-16-8 (pre-activation); options ``depth`` (16), ``widen_factor`` (8),
  ``dropout`` (0.0).
- ``mlp`` — flattens any input; options ``hidden`` (list of widths, default [256, 256]),
  ``batch_norm`` (False).
- ``cnn1d`` — 1-D CNN with BatchNorm for MNIST-1D (input (1, 40)); options ``channels`` (32),
  ``depth`` (3 strided conv blocks).
- ``densenet121`` — DenseNet-121 with a 3×3 stem for 32×32 inputs (`xsam.densenet`); option
  ``growth_rate`` (32).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from xsam.densenet import DenseNet
from xsam.errors import ConfigurationError, ModelError


def _image_shape(name: str, input_shape: Sequence[int], min_size: int) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ModelError(
            f"model {name!r} needs image inputs (C, H, W), but the data set gives shape "
            f"{tuple(input_shape)}; use 'mlp' or 'cnn1d' for 1-D data"
        )
    c, h, w = input_shape
    if min(h, w) < min_size:
        raise ModelError(
            f"model {name!r} needs images of at least {min_size}×{min_size}, "
            f"but the data set gives {h}×{w}"
        )
    return c, h, w


# --- ResNet (CIFAR style) ---------------------------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stem conv, no max-pool, four stages, global average pool."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        num_blocks: Sequence[int],
        in_channels: int,
        num_classes: int,
        width: int = 64,
    ) -> None:
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages = []
        for i, n in enumerate(num_blocks):
            stages.append(self._stage(block, width * 2**i, n, stride=1 if i == 0 else 2))
        self.layers = nn.Sequential(*stages)
        self.linear = nn.Linear(width * 8 * block.expansion, num_classes)

    def _stage(self, block, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def resnet18(*, input_shape: Sequence[int], num_classes: int, width: int = 64) -> nn.Module:
    c, _, _ = _image_shape("resnet18", input_shape, 8)
    return ResNet(BasicBlock, [2, 2, 2, 2], c, num_classes, width=width)


def resnet50(*, input_shape: Sequence[int], num_classes: int, width: int = 64) -> nn.Module:
    c, _, _ = _image_shape("resnet50", input_shape, 8)
    return ResNet(Bottleneck, [3, 4, 6, 3], c, num_classes, width=width)


# --- VGG-11 with BatchNorm ---------------------------------------------------------------


def vgg11_bn(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    width: int = 64,
    hidden: int = 4096,
    dropout: float = 0.5,
) -> nn.Module:
    """VGG-11-BN; the head is the reference code's: Linear-ReLU-Dropout twice, then Linear."""
    # Five 2×2 max-pools: a 32×32 image ends as 1×1, anything smaller vanishes.
    c, _, _ = _image_shape("vgg11_bn", input_shape, 32)
    plan: list[int | str] = [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"]
    layers: list[nn.Module] = []
    in_ch = c
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            out_ch = width * int(item)
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU()]
            in_ch = out_ch
    if not 0 <= dropout < 1:
        raise ConfigurationError(f"model.options.dropout: must be in [0, 1) (got {dropout})")
    # At 32×32 the pool is a no-op (1×1 already); larger images are averaged down to 8·width.
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    layers += [nn.Linear(in_ch, hidden), nn.ReLU(), nn.Dropout(dropout)]
    layers += [nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout)]
    layers.append(nn.Linear(hidden, num_classes))
    return nn.Sequential(*layers)


# --- WideResNet ---------------------------------------------------------------------------


class _WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if not isinstance(self.shortcut, nn.Identity) else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + shortcut


def wrn16_8(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    depth: int = 16,
    widen_factor: int = 8,
    dropout: float = 0.0,
) -> nn.Module:
    c, _, _ = _image_shape("wrn16_8", input_shape, 4)
    if depth < 10 or (depth - 4) % 6:
        raise ConfigurationError(f"model.options.depth: must be 6n+4 >= 10 (got {depth})")
    n = (depth - 4) // 6
    widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    layers: list[nn.Module] = [nn.Conv2d(c, widths[0], 3, 1, 1, bias=False)]
    in_planes = widths[0]
    for stage, planes in enumerate(widths[1:]):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(_WideBlock(in_planes, planes, stride, dropout))
            in_planes = planes
    layers += [
        nn.BatchNorm2d(in_planes),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(in_planes, num_classes),
    ]
    return nn.Sequential(*layers)


# --- DenseNet-121 -------------------------------------------------------------------------


def densenet121(
    *, input_shape: Sequence[int], num_classes: int, growth_rate: int = 32
) -> nn.Module:
    # Three transitions halve the resolution: 8×8 keeps a 1×1 map for the last block.
    c, _, _ = _image_shape("densenet121", input_shape, 8)
    if growth_rate < 1:
        raise ConfigurationError(f"model.options.growth_rate: must be >= 1 (got {growth_rate})")
    return DenseNet([6, 12, 24, 16], c, num_classes, growth_rate=growth_rate)


# --- MLP and 1-D CNN ---------------------------------------------------------------------


def mlp(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (256, 256),
    batch_norm: bool = False,
) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers.append(nn.Linear(width, int(h)))
        if batch_norm:
            layers.append(nn.BatchNorm1d(int(h)))
        layers.append(nn.ReLU())
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn1d(
    *, input_shape: Sequence[int], num_classes: int, channels: int = 32, depth: int = 3
) -> nn.Module:
    """Strided Conv1d–BatchNorm–ReLU blocks, then one linear layer on the flattened features."""
    if len(input_shape) != 2:
        raise ModelError(
            f"model 'cnn1d' needs 1-D inputs (C, L), but the data set gives shape "
            f"{tuple(input_shape)}; use an image model or 'mlp'"
        )
    c, length = input_shape
    if length < 2**depth:
        raise ModelError(f"model 'cnn1d' with depth {depth} needs length >= {2**depth}")
    layers: list[nn.Module] = []
    in_ch = c
    for i in range(depth):
        layers += [
            nn.Conv1d(in_ch, channels, 5 if i == 0 else 3, stride=2, padding=2 if i == 0 else 1),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
        ]
        in_ch = channels
    with torch.no_grad():
        features = nn.Sequential(*layers)(torch.zeros(2, c, length)).shape
    layers += [nn.Flatten(), nn.Linear(features[1] * features[2], num_classes)]
    return nn.Sequential(*layers)


#: name → builder(*, input_shape, num_classes, **options); keys equal xsam.config.MODEL_NAMES.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vgg11_bn": vgg11_bn,
    "wrn16_8": wrn16_8,
    "mlp": mlp,
    "cnn1d": cnn1d,
    "densenet121": densenet121,
}


def build_model(
    config_or_name: Any, *, input_shape: Sequence[int], num_classes: int, **options: Any
) -> nn.Module:
    """Build a registered model for inputs of ``input_shape`` (no batch dim) and ``num_classes``.

    ``config_or_name`` is a model name, a `ModelConfig`, or a `TrainConfig` (its ``model``);
    a config's ``options`` are merged under the keyword ``options``.
    """
    if isinstance(config_or_name, str):
        name = config_or_name
    else:
        model_config = getattr(config_or_name, "model", config_or_name)
        name = model_config.name
        options = {**model_config.options, **options}
    if name not in MODELS:
        raise ConfigurationError(f"model.name: unknown model {name!r}; known: {', '.join(MODELS)}")
    builder = MODELS[name]
    accepted = set(inspect.signature(builder).parameters) - {"input_shape", "num_classes"}
    for key in options:
        if key not in accepted:
            known = ", ".join(sorted(accepted)) or "none"
            raise ConfigurationError(
                f"model.options.{key}: not an option of model {name!r} (options: {known})"
            )
    try:
        return builder(input_shape=tuple(input_shape), num_classes=num_classes, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"model.options: cannot build {name!r}: {exc}") from exc
