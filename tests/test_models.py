"""Reference models: parameter and MAC counts from the papers, shapes, fx-traceability, registry."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_sparsity.models import (
    VGG16CIFAR,
    LeNet5Caffe,
    ResNetCIFAR,
    WideResNet,
    available_models,
    build_model,
)


def conv_linear_params(model: nn.Module) -> int:
    """Weights and biases of the Conv/Linear layers only (the papers' counting: no BatchNorm)."""
    return sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
        for p in m.parameters(recurse=False)
    )


def macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *shape))
    return counter.get_total_flops() // 2


def resnet_option_b_params(depth: int, num_classes: int = 10) -> int:
    """All parameters of a CIFAR ResNet with option-B shortcuts, by formula."""
    n = (depth - 2) // 6
    conv_bn = lambda cin, cout, k: cin * cout * k * k + 2 * cout  # noqa: E731
    total = conv_bn(3, 16, 3)
    cin = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv_bn(cin, width, 3) + conv_bn(width, width, 3)
            if cin != width:
                total += conv_bn(cin, width, 1)
            cin = width
    return total + 64 * num_classes + num_classes


def wrn_params(depth: int, k: int, num_classes: int = 10) -> int:
    """All parameters of WRN-d-k by formula (pre-activation: a block's first BN is on its input)."""
    n = (depth - 4) // 6
    total = 3 * 16 * 9
    cin = 16
    for width in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += 2 * cin + cin * width * 9 + 2 * width + width * width * 9
            if cin != width:
                total += cin * width
            cin = width
    return total + 2 * cin + cin * num_classes + num_classes


def test_lenet5_counts_match_the_papers() -> None:
    model = LeNet5Caffe()
    assert sum(p.numel() for p in model.parameters()) == 431_080
    # REFERENCES.md: MACs = 14400*c1 + 1600*c1*c2 + f*h + 10*h with c1=20, c2=50, f=800, h=500
    assert macs(model, (1, 28, 28)) == 14400 * 20 + 1600 * 20 * 50 + 800 * 500 + 10 * 500
    assert macs(model, (1, 28, 28)) == 2_293_000


def test_lenet5_without_conv_relu_is_caffe_graph() -> None:
    model = LeNet5Caffe(conv_relu=False)
    assert sum(p.numel() for p in model.parameters()) == 431_080
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 1


def test_vgg16_counts_match_li_et_al() -> None:
    model = VGG16CIFAR()
    assert conv_linear_params(model) == 14_982_474
    assert round(macs(model, (3, 32, 32)) / 1e6, 2) == 313.46
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 13
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [512, 10]


@pytest.mark.parametrize(("depth", "approx"), [(20, 0.27e6), (56, 0.85e6)])
def test_resnet_option_b_params(depth: int, approx: float) -> None:
    model = ResNetCIFAR(depth)
    count = sum(p.numel() for p in model.parameters())
    assert count == resnet_option_b_params(depth)
    assert abs(count - approx) / approx < 0.02
    # option B: exactly two projection shortcuts (16->32 and 32->64), both 1x1 convs
    projections = [
        m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    ]
    assert [(m.in_channels, m.out_channels) for m in projections] == [(16, 32), (32, 64)]


def test_wide_resnet_params() -> None:
    assert sum(p.numel() for p in WideResNet(16, 2).parameters()) == wrn_params(16, 2)
    # WRN-28-10 is the paper's 36.5M-parameter network
    count = sum(p.numel() for p in build_model("wrn-28-10").parameters())
    assert count == wrn_params(28, 10)
    assert round(count / 1e6, 1) == 36.5


def test_wide_resnet_dropout_is_used_in_training_only() -> None:
    model = WideResNet(10, 1, dropout=0.5)
    assert all(m.p == 0.5 for m in model.modules() if isinstance(m, nn.Dropout))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


MODELS = [
    ("lenet5", (1, 28, 28)),
    ("vgg16", (3, 32, 32)),
    ("resnet20", (3, 32, 32)),
    ("resnet56", (3, 32, 32)),
    ("wrn-10-2", (3, 32, 32)),
]


@pytest.mark.parametrize(("name", "shape"), MODELS)
def test_forward_shape_and_fx_trace_equivalence(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, num_classes=7).eval()
    x = torch.randn(3, *shape)
    out = model(x)
    assert out.shape == (3, 7)
    traced = fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), out)
    # residual sums appear as graph additions (the export follows them)
    adds = [n for n in traced.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert bool(adds) == (name.startswith(("resnet", "wrn")))


def test_build_model_names_and_kwargs() -> None:
    assert isinstance(build_model("LeNet5"), LeNet5Caffe)
    wrn = build_model("wrn-16-4", num_classes=100, dropout=0.3)
    assert isinstance(wrn, WideResNet)
    assert wrn.fc.out_features == 100
    assert wrn.fc.in_features == 256
    assert "wrn-d-k" in available_models()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: build_model("resnet18"),
            ValueError,
            r"expected one of .*'lenet5'.*'vgg16'.*wrn-d-k",
        ),
        (lambda: build_model("wrn-27-10"), ValueError, r"6n \+ 4"),
        (lambda: build_model("wrn-28-0"), ValueError, r"widen_factor"),
        (lambda: ResNetCIFAR(21), ValueError, r"6n \+ 2"),
        (lambda: build_model(3), TypeError, r"expected a str"),
    ],
)
def test_bad_input(call, error: type[Exception], match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        call()
