"""prune_model on torchvision's classification models and on lightning_sparsity.models.

Each case kills random filters (weights, bias and the following BatchNorm's scale and shift) at
places named by hand from the architecture (which layers then lose a row, a BatchNorm channel or
an input column), then checks that the pruned model's outputs equal the original's and that the
parameter count drops by exactly what those hand-named width changes imply.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn

from lightning_sparsity import models
from lightning_sparsity.pruning.export import plan_pruning, prune_model
from lightning_sparsity.pruning.report import size_report

tvm = pytest.importorskip("torchvision.models")


@pytest.fixture(autouse=True)
def _one_thread() -> None:  # the CPU is shared: one thread is faster than two fighting
    torch.set_num_threads(1)


@dataclass
class Kill:
    """Channels ``channels`` of ``rows[0]`` are killed; with them go the listed layers' rows
    (output channels), norm channels and reader columns (``block`` columns per channel).
    """

    channels: list[int]
    rows: list[str]
    norms: list[str] = field(default_factory=list)
    readers: list[tuple[str, int]] = field(default_factory=list)
    zero: int = 2  # how many of rows[0], norms[0], rows[1], norms[1] ... are zeroed (the kill)


def pick(n: int, frac: float = 0.25) -> list[int]:
    k = max(1, int(n * frac))
    return sorted(torch.randperm(n)[:k].tolist())


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def layer_params(m: nn.Module, d_out: int = 0, d_in: int = 0) -> int:
    """Parameters of layer ``m`` with ``d_out`` outputs and ``d_in`` inputs fewer."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return 2 * (m.num_features - d_out)
    if isinstance(m, nn.Linear):
        out, inp = m.out_features - d_out, m.in_features - d_in
        return out * inp + (out if m.bias is not None else 0)
    assert isinstance(m, nn.Conv2d)
    out = m.out_channels - d_out
    if is_depthwise(m):
        inp, groups = m.in_channels - d_out, m.in_channels - d_out
    else:
        inp, groups = m.in_channels - d_in, m.groups
    return out * (inp // groups) * math.prod(m.kernel_size) + (out if m.bias is not None else 0)


def apply_kills(model: nn.Module, kills: list[Kill]) -> int:
    """Zero the killed filters; the exact number of parameters the export must remove."""
    named = dict(model.named_modules())
    d_out: Counter[str] = Counter()
    d_in: Counter[str] = Counter()
    with torch.no_grad():
        for kill in kills:
            idx, k = kill.channels, len(kill.channels)
            interleaved = [x for pair in zip(kill.rows, kill.norms + [""] * 9) for x in pair]
            for name in [n for n in interleaved if n][: kill.zero]:
                m = named[name]
                m.weight[idx] = 0
                if getattr(m, "bias", None) is not None:
                    m.bias[idx] = 0
            for name in kill.rows + kill.norms:
                d_out[name] += k
            for name, block in kill.readers:
                d_in[name] += k * block
    return sum(
        layer_params(named[n]) - layer_params(named[n], d_out[n], d_in[n]) for n in {*d_out, *d_in}
    )


def randomize(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_case(model: nn.Module, kills: list[Kill], x: Tensor) -> tuple[nn.Module, int, int]:
    """Kill, prune, compare outputs and the exact parameter drop."""
    randomize(model)
    expected_drop = apply_kills(model, kills)
    with torch.no_grad():
        ref = model(x)
    pruned = prune_model(model, x)
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x), ref, rtol=1e-4, atol=1e-5)
    before, after = n_params(model), n_params(pruned)
    assert before - after == expected_drop
    return pruned, before, after


def blocks(model: nn.Module, pattern: str) -> list[str]:
    return [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]


# -- kills per architecture ---------------------------------------------------------------------
def resnet18_kills(m: nn.Module) -> list[Kill]:
    named = dict(m.named_modules())
    return [
        Kill(
            pick(named[f"{b}.conv1"].out_channels),
            [f"{b}.conv1"],
            [f"{b}.bn1"],
            [(f"{b}.conv2", 1)],
        )
        for b in blocks(m, r"layer\d\.\d+")
    ]


def resnet50_kills(m: nn.Module) -> list[Kill]:
    named = dict(m.named_modules())
    out = []
    for b in blocks(m, r"layer\d\.\d+"):
        for i, j in ((1, 2), (2, 3)):
            conv = f"{b}.conv{i}"
            out.append(
                Kill(pick(named[conv].out_channels), [conv], [f"{b}.bn{i}"], [(f"{b}.conv{j}", 1)])
            )
    return out


def vgg_kills(m: nn.Module) -> list[Kill]:
    convs = [n for n, x in m.named_modules() if isinstance(x, nn.Conv2d)]
    out = []
    for i, conv in enumerate(convs):
        bn = f"features.{int(conv.split('.')[1]) + 1}"
        reader = (convs[i + 1], 1) if i + 1 < len(convs) else ("classifier.0", 49)
        out.append(Kill(pick(m.get_submodule(conv).out_channels), [conv], [bn], [reader]))
    out.append(Kill(pick(4096, 0.1), ["classifier.0"], [], [("classifier.3", 1)], zero=1))
    out.append(Kill(pick(4096, 0.1), ["classifier.3"], [], [("classifier.6", 1)], zero=1))
    return out


def mobilenet_v2_kills(m: nn.Module) -> list[Kill]:
    out = []
    for b in blocks(m, r"features\.\d+"):
        conv = m.get_submodule(b)
        if not hasattr(conv, "conv") or len(conv.conv) != 4:
            continue  # the stem, the last 1x1, or a block without expansion
        c = f"{b}.conv"
        out.append(
            Kill(
                pick(m.get_submodule(f"{c}.0.0").out_channels),
                [f"{c}.0.0", f"{c}.1.0"],  # the expansion and its depthwise conv
                [f"{c}.0.1", f"{c}.1.1"],
                [(f"{c}.2", 1)],
                zero=2,  # the depthwise BN turns the zeros into a constant: folded into conv.3
            )
        )
    return out


def inverted_kills(m: nn.Module, pattern: str) -> list[Kill]:
    """MobileNet v3 / EfficientNet blocks: expansion -> depthwise -> [SE] -> projection."""
    out = []
    for b in blocks(m, pattern):
        if not hasattr(m.get_submodule(b), "block"):
            continue  # the stem or the last 1x1
        block = m.get_submodule(f"{b}.block")
        if block[0][0].groups != 1:
            continue  # no expansion
        se = [i for i, x in enumerate(block) if type(x).__name__ == "SqueezeExcitation"]
        p = f"{b}.block"
        rows, norms = [f"{p}.0.0", f"{p}.1.0"], [f"{p}.0.1", f"{p}.1.1"]
        readers = [(f"{p}.{len(block) - 1}.0", 1)]
        if se:  # the gate multiplies a constant by a live value: the depthwise channel dies too
            rows.append(f"{p}.{se[0]}.fc2")
            readers.append((f"{p}.{se[0]}.fc1", 1))
        n = block[0][0].out_channels
        out.append(Kill(pick(n), rows, norms, readers, zero=4 if se else 2))
    return out


def densenet_kills(m: nn.Module) -> list[Kill]:
    out = []
    for b in blocks(m, r"features\.denseblock\d\.denselayer\d+"):
        out.append(Kill(pick(128, 0.125), [f"{b}.conv1"], [f"{b}.norm2"], [(f"{b}.conv2", 1)]))
    # block 4: a dead growth channel reaches every later layer's norm1 -> relu -> 1x1 conv (no
    # bias; folded into its norm2's mean), then norm5 -> relu -> pool -> classifier (folded into
    # its bias). Only the conv2 weights are zeroed: the constants are what the BNs make of zero.
    for layer in (3, 10):
        later = [f"features.denseblock4.denselayer{j}" for j in range(layer + 1, 17)]
        out.append(
            Kill(
                pick(32, 0.2),
                [f"features.denseblock4.denselayer{layer}.conv2"],
                [f"{b}.norm1" for b in later] + ["features.norm5"],
                [(f"{b}.conv1", 1) for b in later] + [("classifier", 1)],
                zero=1,
            )
        )
    return out


def shufflenet_kills(m: nn.Module) -> list[Kill]:
    out = []
    for b in blocks(m, r"stage\d\.\d+"):
        p = f"{b}.branch2"
        n = m.get_submodule(f"{p}.0").out_channels
        out.append(Kill(pick(n), [f"{p}.0", f"{p}.3"], [f"{p}.1", f"{p}.4"], [(f"{p}.5", 1)]))
    return out


def regnet_kills(m: nn.Module) -> list[Kill]:
    out = []
    for b in blocks(m, r"trunk_output\.block\d\.block\d-\d+"):
        gconv = m.get_submodule(f"{b}.f.b.0")
        g, width = gconv.groups, gconv.in_channels
        per = width // g
        local_in, local_out = pick(per), pick(per)  # the same places in every group: balanced
        in_idx = [k * per + j for k in range(g) for j in local_in]
        out_idx = [k * per + j for k in range(g) for j in local_out]
        f = f"{b}.f"
        out.append(Kill(in_idx, [f"{f}.a.0"], [f"{f}.a.1"], [(f"{f}.b.0", 1)]))
        out.append(Kill(out_idx, [f"{f}.b.0"], [f"{f}.b.1"], [(f"{f}.c.0", 1)]))
    return out


def googlenet_kills(m: nn.Module) -> list[Kill]:
    out = []
    for b in blocks(m, r"inception\d\w"):
        for branch in ("branch2", "branch3"):
            p = f"{b}.{branch}"
            n = m.get_submodule(f"{p}.0.conv").out_channels
            out.append(Kill(pick(n), [f"{p}.0.conv"], [f"{p}.0.bn"], [(f"{p}.1.conv", 1)]))
    for aux in ("aux1", "aux2"):  # only in the training-mode graph: traced in training mode
        out.append(Kill(pick(128), [f"{aux}.conv.conv"], [f"{aux}.conv.bn"], [(f"{aux}.fc1", 16)]))
    return out


def squeezenet_kills(m: nn.Module) -> list[Kill]:
    fires = blocks(m, r"features\.\d+")
    fires = [f for f in fires if type(m.get_submodule(f)).__name__ == "Fire"]
    out = []
    for i, f in enumerate(fires):
        fire = m.get_submodule(f)
        readers = [(f"{f}.expand1x1", 1), (f"{f}.expand3x3", 1)]
        out.append(Kill(pick(fire.squeeze.out_channels), [f"{f}.squeeze"], [], readers, zero=1))
        nxt = f"{fires[i + 1]}.squeeze" if i + 1 < len(fires) else "classifier.1"
        out.append(
            Kill(pick(fire.expand1x1.out_channels), [f"{f}.expand1x1"], [], [(nxt, 1)], zero=1)
        )
    return out


def fast_vgg11_bn() -> nn.Module:
    """Torchvision's vgg11_bn, initialised once with uniform noise (its own init costs 3 passes
    over 129M parameters on a shared CPU).
    """
    with torch.device("meta"):
        model = tvm.vgg11_bn(num_classes=10)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            bound = 1 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.1
            p.uniform_(-bound, bound)
        for b in model.buffers():
            b.zero_() if b.dtype == torch.long else b.fill_(1.0)
    return model


Build = Callable[[], nn.Module]
CASES: dict[str, tuple[Build, Callable[[nn.Module], list[Kill]], tuple[int, ...]]] = {
    "resnet18": (lambda: tvm.resnet18(num_classes=10), resnet18_kills, (2, 3, 64, 64)),
    "resnet50": (lambda: tvm.resnet50(num_classes=10), resnet50_kills, (2, 3, 64, 64)),
    "vgg11_bn": (fast_vgg11_bn, vgg_kills, (2, 3, 32, 32)),
    "mobilenet_v2": (lambda: tvm.mobilenet_v2(num_classes=10), mobilenet_v2_kills, (2, 3, 64, 64)),
    "mobilenet_v3_small": (
        lambda: tvm.mobilenet_v3_small(num_classes=10),
        lambda m: inverted_kills(m, r"features\.\d+"),
        (2, 3, 64, 64),
    ),
    "densenet121": (lambda: tvm.densenet121(num_classes=10), densenet_kills, (2, 3, 64, 64)),
    "shufflenet_v2_x0_5": (
        lambda: tvm.shufflenet_v2_x0_5(num_classes=10),
        shufflenet_kills,
        (2, 3, 64, 64),
    ),
    "efficientnet_b0": (
        lambda: tvm.efficientnet_b0(num_classes=10),
        lambda m: inverted_kills(m, r"features\.\d\.\d+"),
        (2, 3, 64, 64),
    ),
    "regnet_x_400mf": (lambda: tvm.regnet_x_400mf(num_classes=10), regnet_kills, (2, 3, 64, 64)),
    "googlenet": (
        lambda: tvm.googlenet(num_classes=10, init_weights=False),
        googlenet_kills,
        (2, 3, 64, 64),
    ),
    "squeezenet1_0": (lambda: tvm.squeezenet1_0(num_classes=10), squeezenet_kills, (2, 3, 64, 64)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_torchvision_model(name: str) -> None:
    build, kills_of, shape = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet's init warning
        model = build()
    kills = kills_of(model)
    assert kills
    pruned, _, _ = run_case(model, kills, torch.randn(shape))
    assert type(pruned) is type(model)
    assert [n for n, _ in pruned.named_modules()] == [n for n, _ in model.named_modules()]
    if name == "googlenet":  # the auxiliary heads (training mode only) were shrunk consistently
        aux = pruned.train()(torch.randn(shape))
        assert aux.aux_logits1.shape == aux.aux_logits2.shape == (shape[0], 10)


def test_regnet_unbalanced_group_is_kept() -> None:
    model = randomize(tvm.regnet_x_400mf(num_classes=10))
    b = "trunk_output.block1.block1-0.f"
    apply_kills(model, [Kill([0], [f"{b}.a.0"], [f"{b}.a.1"])])  # one channel of one group
    plan = plan_pruning(model, torch.randn(1, 3, 64, 64))
    assert not plan.removed_out()
    assert "grouped conv `trunk_output.block1.block1-0.f.b.0`" in plan.kept_dead[f"{b}.a.0"][0]


def test_resnet_residual_channel_is_kept() -> None:
    model = randomize(tvm.resnet18(num_classes=10))
    apply_kills(model, [Kill([5], ["layer1.0.conv2"], ["layer1.0.bn2"])])
    plan = plan_pruning(model, torch.randn(1, 3, 64, 64))
    assert not plan.removed_out()
    assert "carry a signal" in plan.kept_dead["layer1.0.conv2"][5]


# -- lightning_sparsity.models --------------------------------------------------------------------
def test_lenet5() -> None:
    model = models.LeNet5Caffe()
    kills = [
        Kill([0, 7, 19], ["features.0"], [], [("features.3", 1)], zero=1),
        Kill(pick(50), ["features.3"], [], [("classifier.1", 16)], zero=1),
        Kill(pick(500), ["classifier.1"], [], [("classifier.3", 1)], zero=1),
    ]
    _, _, after = run_case(model, kills, torch.randn(2, 1, 28, 28))
    c1, c2, h = 17, 50 - len(kills[1].channels), 500 - len(kills[2].channels)
    assert after == 26 * c1 + (25 * c1 + 1) * c2 + (16 * c2 + 1) * h + 10 * h + 10  # REFERENCES


def test_vgg16_cifar() -> None:
    model = models.VGG16CIFAR()
    convs = [n for n, x in model.named_modules() if isinstance(x, nn.Conv2d)]
    kills = []
    for i, conv in enumerate(convs):
        bn = f"features.{int(conv.split('.')[1]) + 1}"
        reader = (convs[i + 1], 1) if i + 1 < len(convs) else ("classifier.2", 1)
        kills.append(Kill(pick(model.get_submodule(conv).out_channels), [conv], [bn], [reader]))
    kills.append(Kill(pick(512), ["classifier.2"], ["classifier.3"], [("classifier.6", 1)]))
    run_case(model, kills, torch.randn(2, 3, 32, 32))


def test_resnet_cifar() -> None:
    model = models.ResNetCIFAR(20)
    kills = [
        Kill(
            pick(model.get_submodule(f"{b}.conv1").out_channels),
            [f"{b}.conv1"],
            [f"{b}.bn1"],
            [(f"{b}.conv2", 1)],
        )
        for b in blocks(model, r"layer\d\.\d+")
    ]
    # the stem's channel 3 dies in every branch of stage 1's residual sums: it goes everywhere
    stage1 = blocks(model, r"layer1\.\d+")
    kills.append(
        Kill(
            [3],
            ["conv1"] + [f"{b}.conv2" for b in stage1],
            ["bn1"] + [f"{b}.bn2" for b in stage1],
            [(f"{b}.conv1", 1) for b in stage1]
            + [("layer2.0.conv1", 1), ("layer2.0.shortcut.0", 1)],
            zero=2 + 2 * len(stage1),
        )
    )
    run_case(model, kills, torch.randn(2, 3, 32, 32))


def test_wide_resnet() -> None:
    model = models.WideResNet(10, 2)
    kills = [
        Kill(
            pick(model.get_submodule(f"{b}.conv1").out_channels),
            [f"{b}.conv1"],
            [f"{b}.bn2"],
            [(f"{b}.conv2", 1)],
        )
        for b in blocks(model, r"block\d\.\d+")
    ]
    run_case(model, kills, torch.randn(2, 3, 32, 32))


def test_lenet5_report_matches_the_reference_formulas() -> None:
    model = models.LeNet5Caffe()
    apply_kills(
        model,
        [
            Kill(list(range(5, 20)), ["features.0"], zero=1),  # conv 5
            Kill(list(range(10, 50)), ["features.3"], zero=1),  # conv 10 -> fc1 sees 160
            Kill(list(range(16, 500)), ["classifier.1"], zero=1),  # fc 16
        ],
    )
    x = torch.randn(2, 1, 28, 28)
    report = size_report(model, prune_model(model, x), x)
    c1, c2, f, h = 5, 10, 160, 16
    assert (report.params_before, report.macs_before) == (431_080, 2_293_000)
    assert report.params_after == 26 * c1 + (25 * c1 + 1) * c2 + (f + 1) * h + 10 * h + 10
    assert report.macs_after == 14400 * c1 + 1600 * c1 * c2 + f * h + 10 * h
    assert report.kept_widths() == {
        "features.0": 5, "features.3": 10, "classifier.1": 16, "classifier.3": 10
    }  # fmt: skip
    row = report.to_dict()["layers"][2]
    assert (row["name"], row["in_before"], row["in_after"]) == ("classifier.1", 800, 160)
    text = str(report)
    assert "classifier.1  Linear  800 -> 160  500 -> 16" in text
    assert "parameters: 431,080 -> 4,136 (-99.0%)" in text


def test_li_et_al_vgg16_widths_remove_64_0_percent_params_34_2_percent_flops() -> None:
    """REFERENCES.md: Li et al. 2017's VGG-16 widths reproduce 64.0% / 34.2% exactly under the
    counting of conv + linear weights and biases (no BN) and MACs as FLOPs.
    """
    model = randomize(models.VGG16CIFAR())
    li = [32, 64, 128, 128, 256, 256, 256, 256, 256, 256, 256, 256, 256]
    convs = [n for n, x in model.named_modules() if isinstance(x, nn.Conv2d)]
    kills = []
    for conv, width in zip(convs, li):
        bn = f"features.{int(conv.split('.')[1]) + 1}"
        n = model.get_submodule(conv).out_channels
        kills.append(Kill(list(range(width, n)), [conv], [bn]))
    apply_kills(model, kills)
    x = torch.randn(1, 3, 32, 32)
    report = size_report(model, prune_model(model, x), x)
    assert (report.conv_linear_params_before, report.macs_before) == (14_982_474, 313_463_808)
    assert [row.out_after for row in report.layers if row.kind == "Conv2d"] == li
    assert f"{100 * report.conv_linear_params_removed:.1f}" == "64.0"
    assert f"{100 * report.macs_removed:.1f}" == "34.2"
