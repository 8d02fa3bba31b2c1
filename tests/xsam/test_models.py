"""The model registry: every configured name builds, fits its data's shape, and trains."""

from __future__ import annotations

import pytest
import torch

from xsam.config import MODEL_NAMES
from xsam.errors import ConfigurationError, ModelError
from xsam.models import MODELS, build_model


def test_registry_matches_the_config_schema():
    assert tuple(MODELS) == MODEL_NAMES


# name, input shape, options: small sizes that keep a CPU step fast.
CASES = [
    ("resnet18", (3, 16, 16), {"width": 8}),
    ("vgg11_bn", (3, 32, 32), {"width": 4, "hidden": 64}),
    ("wrn16_8", (3, 16, 16), {"widen_factor": 1}),
    ("mlp", (1, 8, 8), {"hidden": [32]}),
    ("cnn1d", (1, 40), {"channels": 8}),
    ("densenet121", (3, 16, 16), {"growth_rate": 4}),
]


@pytest.mark.parametrize(("name", "shape", "options"), CASES, ids=[c[0] for c in CASES])
def test_model_trains_a_few_steps(name, shape, options):
    torch.manual_seed(0)
    model = build_model(name, input_shape=shape, num_classes=5, **options)
    x, y = torch.randn(16, *shape), torch.arange(16) % 5
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert model(x).shape == (16, 5)
    assert losses[-1] < losses[0], losses  # it learns the fixed batch


def test_resnet50_forward_backward_at_cifar_size():
    model = build_model("resnet50", input_shape=(3, 32, 32), num_classes=100)
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 100)
    assert all(p.grad is not None for p in model.parameters())


def test_resnet18_is_cifar_style():
    model = build_model("resnet18", input_shape=(3, 32, 32), num_classes=10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 11_300_000


def test_vgg11_bn_has_the_reference_head():
    model = build_model("vgg11_bn", input_shape=(3, 32, 32), num_classes=100)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (512, 4096),
        (4096, 4096),
        (4096, 100),
    ]
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert [m.p for m in dropouts] == [0.5, 0.5]
    head = [type(m).__name__ for m in list(model)[-7:]]
    assert head == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]


def test_densenet121_is_cifar_style_and_trains_at_32px():
    torch.manual_seed(0)
    model = build_model("densenet121", input_shape=(3, 32, 32), num_classes=10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.out_channels == 64  # 2 × growth rate 32
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    # torchvision's densenet121 has 7 978 856 parameters; ours swaps the 7×7 stem conv
    # (9 408) for a 3×3 one (1 728), drops the stem BatchNorm (128) and has a 10-class head
    # (10 250 instead of 1 025 000): 6 956 298. Every dense layer and transition is the same.
    assert sum(p.numel() for p in model.parameters()) == 6_956_298
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 10)
    assert all(p.grad is not None for p in model.parameters())


def test_cnn1d_has_batchnorm_for_mnist1d():
    model = build_model("cnn1d", input_shape=(1, 40), num_classes=10)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    assert model(torch.randn(3, 1, 40)).shape == (3, 10)


def test_build_from_config_merges_options():
    from xsam.config import TrainConfig

    config = TrainConfig.model_validate(
        {"model": {"name": "mlp", "options": {"hidden": [7]}}, "data": {"name": "digits"}}
    )
    model = build_model(config, input_shape=(1, 8, 8), num_classes=10)
    assert model[1].out_features == 7


def test_unknown_option_names_the_config_key():
    with pytest.raises(ConfigurationError, match=r"model\.options\.depthh"):
        build_model("cnn1d", input_shape=(1, 40), num_classes=10, depthh=3)


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("vgg11_bn", {"dropout": 1.0}, "dropout"),  # would zero the whole head
        ("densenet121", {"growth_rate": 0}, "growth_rate"),  # no channels to grow
    ],
)
def test_bad_model_option_names_the_config_key(name, options, field):
    with pytest.raises(ConfigurationError, match=rf"model\.options\.{field}: must be"):
        build_model(name, input_shape=(3, 32, 32), num_classes=10, **options)


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("cnn1d", (3, 32, 32), "needs 1-D inputs"),  # an image data set
        ("resnet18", (1, 40), r"needs image inputs \(C, H, W\)"),  # MNIST-1D
        ("vgg11_bn", (1, 8, 8), "at least 32×32"),  # digits: five max-pools would vanish it
    ],
)
def test_incompatible_shape_is_a_model_error(name, shape, message):
    with pytest.raises(ModelError, match=message):
        build_model(name, input_shape=shape, num_classes=10)
