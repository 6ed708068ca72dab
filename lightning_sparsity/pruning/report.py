"""What pruning saved: per-layer widths, parameters and multiply-accumulates, before and after.

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the example inputs (convs and
matrix products; MACs = FLOPs / 2, per example). Parameters are counted two ways: all of them,
and the weights and biases of Conv/Linear layers only (the convention of the papers' tables,
e.g. VGG-16 on CIFAR: 14,982,474).

>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
>>> with torch.no_grad():
...     net[0].weight[1:3] = 0
...     net[0].bias[1:3] = 0
>>> from lightning_sparsity.pruning.export import prune_model
>>> x = torch.randn(1, 1, 8, 8)
>>> report = size_report(net, prune_model(net, x), x)
>>> report.params_before, report.params_after, report.macs_before, report.macs_after
(330, 166, 1584, 792)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.utils.flop_counter import FlopCounterMode

from lightning_sparsity.pruning.layers import CHANNEL_NORM_TYPES

_WIDTH_TYPES: tuple[type[nn.Module], ...] = (_ConvNd, nn.Linear, *CHANNEL_NORM_TYPES, nn.PReLU)


@dataclass(frozen=True)
class LayerReport:
    """One layer: its input/output widths, own parameters and MACs (per example), before/after."""

    name: str
    kind: str
    in_before: int
    in_after: int
    out_before: int
    out_after: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int


@dataclass(frozen=True)
class PruneReport:
    """The size of a model before and after [`prune_model`][lightning_sparsity.prune_model].

    Attributes:
        layers: per-layer widths, parameters and MACs (Conv/Linear/norm layers).
        params_before: all parameters of the original model.
        params_after: all parameters of the pruned model.
        conv_linear_params_before: weights and biases of Conv/Linear layers only (the papers'
            counting), original model.
        conv_linear_params_after: the same, pruned model.
        macs_before: multiply-accumulates per example, original model.
        macs_after: the same, pruned model.
    """

    layers: tuple[LayerReport, ...]
    params_before: int
    params_after: int
    conv_linear_params_before: int
    conv_linear_params_after: int
    macs_before: int
    macs_after: int

    @property
    def params_removed(self) -> float:
        """Fraction of all parameters removed."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def conv_linear_params_removed(self) -> float:
        """Fraction of Conv/Linear weights and biases removed."""
        before = self.conv_linear_params_before
        return 1.0 - self.conv_linear_params_after / before if before else 0.0

    @property
    def macs_removed(self) -> float:
        """Fraction of multiply-accumulates removed."""
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0

    def kept_widths(self) -> dict[str, int]:
        """Output widths of the Conv/Linear layers after pruning."""
        return {
            layer.name: layer.out_after
            for layer in self.layers
            if layer.kind.startswith(("Conv", "Linear", "FeatureLinear"))
        }

    def architecture(self, after: bool = True) -> str:
        """The published form of an architecture: conv filters, then Linear input features.

        In layer order, e.g. ``"5-10-76-16"`` for LeNet-5-Caffe (conv1-conv2-fc1-fc2).
        """
        counts = [
            (layer.out_after if after else layer.out_before)
            if layer.kind.startswith("Conv")
            else (layer.in_after if after else layer.in_before)
            for layer in self.layers
            if layer.kind.startswith(("Conv", "Linear", "FeatureLinear"))
        ]
        return "-".join(str(n) for n in counts)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (ints, floats, strings, lists, dicts): totals first, then ``layers``."""
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_removed": self.params_removed,
            "conv_linear_params_before": self.conv_linear_params_before,
            "conv_linear_params_after": self.conv_linear_params_after,
            "conv_linear_params_removed": self.conv_linear_params_removed,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_removed": self.macs_removed,
            "architecture_before": self.architecture(after=False),
            "architecture_after": self.architecture(),
            "layers": [asdict(layer) for layer in self.layers],
        }

    def __str__(self) -> str:
        rows = [("layer", "type", "in", "out", "params", "MACs")]
        for layer in self.layers:
            rows.append(
                (
                    layer.name,
                    layer.kind,
                    _change(layer.in_before, layer.in_after),
                    _change(layer.out_before, layer.out_after),
                    _change(layer.params_before, layer.params_after),
                    _change(layer.macs_before, layer.macs_after, _short),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(
            f"parameters: {self.params_before:,} -> {self.params_after:,} "
            f"(-{100 * self.params_removed:.1f}%); Conv/Linear only: "
            f"{self.conv_linear_params_before:,} -> {self.conv_linear_params_after:,} "
            f"(-{100 * self.conv_linear_params_removed:.1f}%)"
        )
        lines.append(
            f"MACs per example: {_short(self.macs_before)} -> {_short(self.macs_after)} "
            f"(-{100 * self.macs_removed:.1f}%)"
        )
        lines.append(
            "architecture (conv filters, then Linear inputs): "
            f"{self.architecture(after=False)} -> {self.architecture()}"
        )
        return "\n".join(lines)


def _short(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _change(before: int, after: int, fmt: Any = str) -> str:
    return fmt(before) if before == after else f"{fmt(before)} -> {fmt(after)}"


def _widths(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, _ConvNd):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.PReLU):
        return module.num_parameters, module.num_parameters
    n = int(getattr(module, "num_features", 0))
    return n, n


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def count_macs(model: nn.Module, example_inputs: tuple[Tensor, ...]) -> tuple[int, dict[str, int]]:
    """Multiply-accumulates per example (total, and per qualified module name), eval mode."""
    flags = [(m, m.training) for m in model.modules()]
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with counter, torch.no_grad():
            model(*example_inputs)
    finally:
        for m, flag in flags:
            m.training = flag
    batch = max(int(example_inputs[0].shape[0]), 1) if example_inputs[0].dim() else 1
    prefix = type(model).__name__ + "."
    per_module = {
        key[len(prefix) :]: int(sum(counts.values())) // 2 // batch
        for key, counts in counter.get_flop_counts().items()
        if key.startswith(prefix)
    }
    return int(counter.get_total_flops()) // 2 // batch, per_module


def count_params(model: nn.Module, conv_linear_only: bool = False) -> int:
    """All parameters, or only the weights and biases of Conv/Linear layers."""
    if not conv_linear_only:
        return sum(p.numel() for p in model.parameters())
    return sum(_own_params(m) for m in model.modules() if isinstance(m, (_ConvNd, nn.Linear)))


def size_report(original: nn.Module, pruned: nn.Module, example_inputs: Any) -> PruneReport:
    """Compare ``original`` and ``pruned`` (same module names) on ``example_inputs``.

    Raises:
        TypeError: ``example_inputs`` is not a tensor or a tuple of tensors.
        ValueError: ``pruned`` lacks a layer of ``original`` (not a pruned copy of it).
    """
    from lightning_sparsity.pruning.export import as_inputs

    inputs = as_inputs(example_inputs, "size_report")
    macs_before, per_before = count_macs(original, inputs)
    macs_after, per_after = count_macs(pruned, inputs)
    pruned_modules = dict(pruned.named_modules())
    layers = []
    for name, module in original.named_modules():
        if not isinstance(module, _WIDTH_TYPES):
            continue
        small = pruned_modules.get(name)
        if small is None or not isinstance(small, type(module)):
            raise ValueError(
                f"`size_report(pruned=...)`: expected a pruned copy of the original model, but "
                f"its layer {name!r} is missing or of another type. HINT: pass the model "
                "returned by `prune_model(original, ...)`."
            )
        (in_b, out_b), (in_a, out_a) = _widths(module), _widths(small)
        layers.append(
            LayerReport(
                name,
                type(module).__name__,
                in_b,
                in_a,
                out_b,
                out_a,
                _own_params(module),
                _own_params(small),
                per_before.get(name, 0),
                per_after.get(name, 0),
            )
        )
    return PruneReport(
        layers=tuple(layers),
        params_before=count_params(original),
        params_after=count_params(pruned),
        conv_linear_params_before=count_params(original, conv_linear_only=True),
        conv_linear_params_after=count_params(pruned, conv_linear_only=True),
        macs_before=macs_before,
        macs_after=macs_after,
    )


@torch.no_grad()
def pruned_size(
    model: nn.Module, dead: dict[str, Tensor], example_inputs: tuple[Tensor, ...]
) -> tuple[int, int]:
    """Parameters and MACs per sample once the filters ``dead`` (layer name -> indices) are removed.

    That is what [`prune_model`][lightning_sparsity.prune_model] would give; ``model`` is not
    changed.

    A copy has those filters killed (with the BatchNorm after each) and is pruned without the
    equivalence check, then counted like [`size_report`][lightning_sparsity.size_report]: the
    measurement of [`Sizer`][lightning_sparsity.pruning.budget.Sizer].
    """
    from lightning_sparsity.pruning.budget import Sizer
    from lightning_sparsity.pruning.masks import build_groups

    dead = {name: idx for name, idx in dead.items() if idx.numel()}
    groups = build_groups(model, list(dead), owner="SparsityMonitor") if dead else {}
    masks = {}
    for name, group in groups.items():
        masks[name] = torch.ones(group.out_features, dtype=torch.bool)
        masks[name][dead[name].cpu()] = False
    size = Sizer(model, groups, example_inputs).size(masks)
    return size["params"], size["macs"]
