"""Layers as the zoos write them, each with a known answer: which channels go, which stay and why.

Hand-written copies of the constructs timm and torchvision use: a conv subclass padding "same" in
its own forward (shape-dependent Python torch.fx cannot trace), a BatchNorm subclass with a fused
activation, a frozen BatchNorm holding buffers, a layer scale module, a weight-standardised conv
(whose input channels cannot go), outputs as a dict and a dataclass; and the analysis leaving the
caller's model exactly as it was.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sparsity import prune_model
from lightning_sparsity.pruning.analysis.graph import batchnorm_after
from lightning_sparsity.pruning.export import dead_channels, plan_pruning
from lightning_sparsity.pruning.masks import FilterGroup, zero_filters


class Conv2dSame(nn.Conv2d):
    """TensorFlow's "same" padding, computed from the input size in Python (as timm's)."""

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        pad_h = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pad_w = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm with a fused activation (as timm's)."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
        return self.act(x)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with buffers only (as torchvision's detection backbones)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(c))
        self.register_buffer("bias", torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class LayerScale(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class StdConv2d(nn.Conv2d):
    """Weight standardisation: the statistics of every filter see all its input channels."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class ZooNet(nn.Module):
    def __init__(self, std: bool = False) -> None:
        super().__init__()
        self.stem = Conv2dSame(3, 8, 3, stride=2)
        self.bn1 = BatchNormAct2d(8)
        self.conv2 = (StdConv2d if std else nn.Conv2d)(8, 6, 3, padding=1)
        self.bn2 = FrozenBatchNorm2d(6)
        self.scale = LayerScale(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.stem(x))
        x = self.scale(torch.relu(self.bn2(self.conv2(x))))
        return self.head(x.mean((2, 3)))


@torch.no_grad()
def randomise(net: nn.Module) -> nn.Module:
    for t in [*net.parameters(), *net.buffers()]:
        if t.is_floating_point():
            t.copy_(torch.rand_like(t) + 0.5 if t.dim() == 1 else torch.randn_like(t))
    return net.eval()


def kill(layer: nn.Module, norm: nn.Module, idx: list[int]) -> None:
    zero_filters(FilterGroup("layer", layer, norm), torch.tensor(idx))


def test_zoo_layers_are_pruned_like_their_torch_counterparts() -> None:
    net = randomise(ZooNet())
    kill(net.stem, net.bn1, [1, 5])
    kill(net.conv2, net.bn2, [0, 3])
    x = torch.randn(2, 3, 11, 11)  # odd size: "same" padding is asymmetric
    plan = plan_pruning(net, x)
    assert plan.leaf_kinds == {
        "stem": "conv",
        "bn1": "channelwise",
        "bn2": "channelwise",
        "scale": "channelwise",
    }
    pruned = prune_model(net, x)
    assert (pruned.stem.out_channels, pruned.bn1.num_features, pruned.conv2.in_channels) == (6,) * 3
    assert (pruned.conv2.out_channels, pruned.bn2.weight.numel()) == (4, 4)
    assert pruned.scale.gamma.shape == (4,)
    assert pruned.head.in_features == 4
    assert type(pruned.stem) is Conv2dSame
    assert type(pruned.bn2) is FrozenBatchNorm2d
    y = torch.randn(3, 3, 13, 9)  # another batch and size
    torch.testing.assert_close(pruned(y), net(y))


def test_weight_standardised_conv_keeps_its_inputs_and_says_why() -> None:
    net = randomise(ZooNet(std=True))
    kill(net.stem, net.bn1, [1, 5])  # stem's channels feed the standardised conv2
    kill(net.conv2, net.bn2, [0])  # the standardisation of a zero filter still gives zeros
    x = torch.randn(2, 3, 11, 11)
    plan = plan_pruning(net, x)
    assert "conv2" not in plan.leaf_kinds  # traced through: F.conv2d with a computed weight
    why = plan.kept_dead["stem"][1]
    assert re.search(r"reaches `torch.conv2d` in `conv2` at .*test_zoo_layers\.py:\d+", why), why
    pruned = prune_model(net, x, allow_unchanged=True)
    assert pruned.stem.out_channels == 8
    torch.testing.assert_close(pruned(x), net(x))


def test_analysis_leaves_the_callers_model_exactly_as_it_was() -> None:
    """In training mode, with a hook: BatchNorm statistics, flags and hooks untouched."""
    net = randomise(ZooNet())
    kill(net.conv2, net.bn2, [0, 3])
    net.train()
    net.bn1.eval()
    calls: list[int] = []
    net.stem.register_forward_hook(lambda *a: calls.append(1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [m.training for m in net.modules()]
    x = torch.randn(2, 3, 11, 11)
    dead_channels(net, x)
    plan_pruning(net, x)
    assert calls == []  # the analysis runs a copy, without the user's hooks
    prune_model(net, x)  # its final check runs the model itself (in eval mode, flags restored)
    assert [m.training for m in net.modules()] == flags
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@dataclass
class Out:
    logits: Tensor
    features: dict[str, Tensor]


class Structured(nn.Module):
    def __init__(self, as_dataclass: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)
        self.as_dataclass = as_dataclass

    def forward(self, x: Tensor, scale: float = 1.0) -> Out | dict[str, Tensor]:
        f = torch.relu(self.bn(self.conv(x)))
        out = self.fc(f.mean((2, 3))) * scale
        if self.as_dataclass:
            return Out(out, {"pooled": out.detach()})
        return {"logits": out, "aux": out.sum(1)}


@pytest.mark.parametrize("as_dataclass", [False, True])
def test_outputs_of_any_structure_are_checked_leaf_by_leaf(as_dataclass: bool) -> None:
    net = randomise(Structured(as_dataclass))
    kill(net.conv, net.bn, [2, 4])
    x = torch.randn(2, 3, 8, 8)
    pruned = prune_model(net, x)
    assert pruned.conv.out_channels == 4


def test_callbacks_find_the_zoo_norm_after_each_conv() -> None:
    """FilterThresholding and the monitor read `batchnorm_after`: zoo norms count too."""
    net = ZooNet()
    assert batchnorm_after(net) == {"stem": "bn1", "conv2": "bn2"}


def test_timm_efficientnet_norms_are_found() -> None:
    timm = pytest.importorskip("timm")
    net = timm.create_model("efficientnet_b0", num_classes=10)
    after = batchnorm_after(net)
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 81
    # every conv but the squeeze-excitation ones (which have no norm) has its BatchNormAct2d
    assert sorted(after) == sorted(c for c in convs if ".se." not in c)


class Sliced(nn.Module):
    """Slices as the zoos write them: spatial crops, a full-width channel slice, a partial one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 4, 1)
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x))[:, :, 1:, 1:]  # a crop: channels untouched
        x = torch.relu(self.conv2(x[:, :8]))  # every channel (still all of them once pruned)
        x = torch.relu(self.conv3(x))
        return self.head(x[:, :3, ..., ::2])  # part of the channels: those stay


def test_slices_keep_only_what_they_cut() -> None:
    net = randomise(Sliced())
    with torch.no_grad():
        for layer, idx in ((net.conv1, [0, 5]), (net.conv2, [2]), (net.conv3, [1, 3])):
            layer.weight[idx] = 0
            layer.bias[idx] = 0
    x = torch.randn(2, 3, 9, 9)
    plan = plan_pruning(net, x)
    assert plan.removed_out() == {"conv1": [0, 5], "conv2": [2]}
    for channel in (1, 3):  # removing any channel would move what `[:, :3]` takes
        assert "takes part of the channels" in plan.kept_dead["conv3"][channel]
    pruned = prune_model(net, x)
    y = torch.randn(1, 3, 7, 7)
    torch.testing.assert_close(pruned(y), net(y))


class ScaledBlock(nn.Module):
    """A residual block with a layer scale and a learnable shift used directly in `forward`."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.register_buffer("shift", torch.zeros(c, 1, 1))
        self.alpha = nn.Parameter(torch.tensor(0.7))  # a scalar: every channel alike

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x) * self.gamma.view(1, -1, 1, 1) + self.shift
        return x + self.alpha * y


class ScaledNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = FrozenBatchNorm2d(8)
        self.block = ScaledBlock(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(torch.relu(self.bn(self.stem(x)))).mean((2, 3)))


def test_parameters_used_in_forward_are_sliced_with_their_channel(tmp_path: object) -> None:
    from pathlib import Path

    from lightning_sparsity import load_pruned, save_pruned

    net = randomise(ScaledNet())
    with torch.no_grad():
        net.block.shift.zero_()
    kill(net.stem, net.bn, [2, 6])
    with torch.no_grad():  # the residual stream's channels 2 and 6: the block's conv too
        net.block.conv.weight[[2, 6]] = 0
        net.block.conv.bias[[2, 6]] = 0
    x = torch.randn(2, 3, 8, 8)
    plan = plan_pruning(net, x)
    assert plan.removed_out() == {"stem": [2, 6], "block.conv": [2, 6]}
    pruned = prune_model(net, x)
    assert pruned.block.gamma.shape == (6,)
    assert pruned.block.shift.shape == (6, 1, 1)
    assert pruned.bn.weight.shape == (6,)
    assert pruned.block.alpha.shape == ()
    y = torch.randn(3, 3, 10, 10)
    torch.testing.assert_close(pruned(y), net(y))
    path = save_pruned(pruned, Path(str(tmp_path)) / "scaled.pt", example_inputs=x)
    again = load_pruned(path, ScaledNet()).eval()
    torch.testing.assert_close(again(y), net(y))


def test_thresholding_and_export_agree_on_a_timm_network(tmp_path: object) -> None:
    """FilterThresholding kills filters of timm's EfficientNet-B0 with their BatchNormAct2d, the
    monitor counts them dead, and the export removes them (what stays says why).
    """
    from pathlib import Path

    import lightning.pytorch as pl
    from _shared import make_trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_sparsity import FilterThresholding, PrunedExport, SparsityMonitor

    timm = pytest.importorskip("timm")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = timm.create_model("efficientnet_b0", num_classes=3)

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            return F.cross_entropy(self.model(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def train_dataloader(self) -> DataLoader:
            data = TensorDataset(torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,)))
            return DataLoader(data, batch_size=2)

    root = Path(str(tmp_path))
    thresholding = FilterThresholding(
        criterion="l1", fraction=0.25, layers=lambda n, m: n.startswith("blocks.6")
    )
    monitor = SparsityMonitor(histograms=False, layers=lambda n, m: n.startswith("blocks.6"))
    export = PrunedExport(dirpath=root, formats=("pt",))
    module = Module()
    trainer = make_trainer(root, [export, monitor, thresholding], logger=True)
    trainer.fit(module)
    killed = {n: (~m).nonzero().flatten().tolist() for n, m in thresholding.masks.items()}
    assert sum(map(len, killed.values())) > 0
    for name, idx in killed.items():  # the monitor saw them dead
        live = int(trainer.callback_metrics[f"sparsity/{name}/filters"])
        assert live == thresholding.masks[name].numel() - len(idx)
    assert export.report.params_after < export.report.params_before


class NormInside(nn.Module):
    """A block that calls `F.batch_norm` on its own tensors, with an activation, in `forward`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.rand(8) + 0.5)
        self.bias = nn.Parameter(torch.rand(8))
        self.register_buffer("running_mean", torch.rand(8))
        self.register_buffer("running_var", torch.rand(8) + 0.5)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        y = F.batch_norm(y, self.running_mean, self.running_var, self.weight, self.bias, False)
        return self.head(F.silu(y))


def test_a_functional_batch_norm_on_a_modules_tensors_is_sliced() -> None:
    net = NormInside().eval()
    with torch.no_grad():
        net.conv.weight[[1, 5]] = 0
        net.conv.bias[[1, 5]] = 0
        for t in (net.weight, net.bias, net.running_mean):
            t[[1, 5]] = 0
    x = torch.randn(2, 3, 6, 6)
    assert plan_pruning(net, x).removed_out() == {"conv": [1, 5]}
    pruned = prune_model(net, x)
    assert pruned.weight.shape == pruned.running_var.shape == (6,)
    assert pruned.head.in_channels == 6
    y = torch.randn(1, 3, 7, 7)
    torch.testing.assert_close(pruned(y), net(y))
