"""DenseNet-BC for 32×32 inputs (Huang et al. 2017), as the CIFAR codes the SAM papers use build it.

DenseNet-121 is growth rate k = 32 and dense blocks of 6, 12, 24 and 16 bottleneck layers
(BN-ReLU-Conv1×1 to 4k channels, BN-ReLU-Conv3×3 to k), joined by transitions that halve the
channels (compression 0.5) and the resolution (2×2 average pool). The ImageNet stem (7×7
stride-2 conv and a max-pool) would shrink a 32×32 image to 8×8 before the first block; the CIFAR
version uses one 3×3 stride-1 conv to 2k channels instead, and the network ends in BN-ReLU,
global average pooling and one linear layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class _DenseLayer(nn.Module):
    def __init__(self, in_planes: int, growth_rate: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class _Transition(nn.Sequential):
    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_planes),
            nn.ReLU(),
            nn.Conv2d(in_planes, out_planes, 1, bias=False),
            nn.AvgPool2d(2),
        )


class DenseNet(nn.Module):
    """DenseNet-BC with a 3×3 stem; ``blocks`` layers per dense block, growth ``growth_rate``."""

    def __init__(
        self,
        blocks: Sequence[int],
        in_channels: int,
        num_classes: int,
        growth_rate: int = 32,
        reduction: float = 0.5,
    ) -> None:
        super().__init__()
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for i, n in enumerate(blocks):
            for _ in range(n):
                stages.append(_DenseLayer(planes, growth_rate))
                planes += growth_rate
            if i < len(blocks) - 1:
                out_planes = int(planes * reduction)
                stages.append(_Transition(planes, out_planes))
                planes = out_planes
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(self.conv1(x))
        out = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(out)), 1)
        return self.linear(torch.flatten(out, 1))
