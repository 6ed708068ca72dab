"""One registry of layer types: how each is shrunk and what its widths are.

Every place that needs to know about a layer type reads this table: the surgery
([`shrink`][lightning_sparsity.pruning.surgery.shrink]), the widths files
(`widths`) and the type groups the analysis and the callbacks use.
A shrink function takes the layer, the output indices to keep and the input indices to keep
(``None`` keeps an axis whole) and returns a new module of the same class, dtype and device whose
parameters and buffers are the kept slices of the old ones (the old module is not modified).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

ShrinkFn = Callable[[nn.Module, "Tensor | None", "Tensor | None"], nn.Module]
Shape = tuple[int, ...]

#: Layers whose output units ("filters") can be pruned.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
#: Layers whose output channels start a new channel space and whose inputs are read (exits).
MIXING_TYPES: tuple[type[nn.Module], ...] = (_ConvNd, nn.Linear)
#: Normalisation layers with one scale/shift (and running statistics) per channel.
CHANNEL_NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, _InstanceNorm)
#: The BatchNorms proper (the callbacks zero their scale and shift with a killed filter).
BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Normalisation layers whose statistics mix channels (kept whole).
MIXING_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
#: Integer attributes that count a module's channels, updated with its tensors' first dimension.
COUNT_ATTRS: tuple[str, ...] = ("num_features", "num_channels", "channels", "dim", "num_parameters")


def _check(name: str, keep: Tensor | None, size: int, axis: str) -> Tensor | None:
    if keep is None:
        return None
    keep = torch.as_tensor(keep, dtype=torch.long).flatten()
    if keep.numel() == 0 or int(keep.min()) < 0 or int(keep.max()) >= size:
        raise ValueError(
            f"`shrink({name})`: expected 1 to {size} `{axis}` indices in [0, {size}), "
            f"got {keep.tolist()}."
        )
    if keep.unique().numel() != keep.numel():
        raise ValueError(f"`shrink({name})`: `{axis}` indices repeat: {keep.tolist()}.")
    return keep


def _copy(module: nn.Module, *keys: str) -> nn.Module:
    """A deep copy of ``module`` that shares (does not copy) the tensors ``keys``.

    The caller replaces those tensors.
    """
    memo: dict[int, Any] = {}
    for key in keys:
        t = getattr(module, key, None)
        if isinstance(t, Tensor):
            memo[id(t)] = t
    return copy.deepcopy(module, memo)


def replace_tensor(new: nn.Module, key: str, value: Tensor) -> None:
    """Replace the parameter or buffer ``key`` of ``new`` by ``value``.

    ``value`` is a fresh tensor (from ``index_select``); the kind (parameter or buffer) and
    ``requires_grad`` are kept.
    """
    if key in new._parameters and new._parameters[key] is not None:
        old = cast(Tensor, new._parameters[key])
        new._parameters[key] = nn.Parameter(value.detach(), requires_grad=old.requires_grad)
    elif key in new._buffers and new._buffers[key] is not None:
        new._buffers[key] = value.detach()


def _group_local(keep_in: Tensor, in_channels: int, groups: int, name: str) -> Tensor:
    """Per-group local input indices ``[groups, kept_per_group]`` (balanced across groups)."""
    per = in_channels // groups
    group_of = keep_in // per
    counts = torch.bincount(group_of, minlength=groups)
    if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
        raise ValueError(
            f"`shrink({name})`: with groups={groups} every group must keep the same number of "
            f"input channels, got {counts.tolist()} per group."
        )
    ordered = keep_in.sort().values
    return (ordered % per).view(groups, -1)


def _shrink_conv(module: nn.Module, keep_out: Tensor | None, keep_in: Tensor | None) -> nn.Module:
    m = cast(_ConvNd, module)
    name = type(m).__name__
    keep_out = _check(name, keep_out, m.out_channels, "keep_out")
    keep_in = _check(name, keep_in, m.in_channels, "keep_in")
    out_idx = keep_out.sort().values if keep_out is not None else torch.arange(m.out_channels)
    in_idx = keep_in.sort().values if keep_in is not None else torch.arange(m.in_channels)
    g = m.groups
    weight = m.weight.detach()
    dev = weight.device
    if g == 1:
        w = weight.index_select(0, out_idx.to(dev)).index_select(1, in_idx.to(dev))
        groups = 1
    elif g == m.in_channels:  # depthwise (possibly with a channel multiplier)
        mult = m.out_channels // g
        expect = (in_idx[:, None] * mult + torch.arange(mult)).flatten()
        if out_idx.numel() != expect.numel() or not bool((out_idx == expect).all()):
            raise ValueError(
                f"`shrink({name})`: a depthwise conv keeps its output channels with their input "
                f"channel; kept inputs {in_idx.tolist()} imply outputs {expect.tolist()}, "
                f"got {out_idx.tolist()}."
            )
        w = weight.index_select(0, out_idx.to(dev))
        groups = int(in_idx.numel())
    else:  # grouped: balanced per group on both axes
        local_in = _group_local(in_idx, m.in_channels, g, name)
        out_per = m.out_channels // g
        out_counts = torch.bincount(out_idx // out_per, minlength=g)
        if not bool((out_counts == out_counts[0]).all()) or int(out_counts[0]) == 0:
            raise ValueError(
                f"`shrink({name})`: with groups={g} every group must keep the same number of "
                f"output channels, got {out_counts.tolist()} per group."
            )
        rows = weight.index_select(0, out_idx.to(dev))
        cols = local_in[out_idx // out_per].to(dev)  # [kept_out, kept_in_per_group]
        index = cols.view(*cols.shape, *([1] * (weight.dim() - 2))).expand(
            -1, -1, *weight.shape[2:]
        )
        w = torch.gather(rows, 1, index)
        groups = g
    new = cast(_ConvNd, _copy(m, "weight", "bias"))
    new.in_channels, new.out_channels, new.groups = (
        int(in_idx.numel()),
        int(out_idx.numel()),
        groups,
    )
    replace_tensor(new, "weight", w)
    if m.bias is not None:
        replace_tensor(new, "bias", m.bias.detach().index_select(0, out_idx.to(dev)))
    return new


def _shrink_conv_transpose(
    module: nn.Module, keep_out: Tensor | None, keep_in: Tensor | None
) -> nn.Module:
    m = cast(_ConvNd, module)
    name = type(m).__name__
    if m.groups != 1 and (keep_out is not None or keep_in is not None):
        raise ValueError(
            f"`shrink({name})`: grouped transposed convolutions (groups={m.groups}) are kept whole."
        )
    keep_out = _check(name, keep_out, m.out_channels, "keep_out")
    keep_in = _check(name, keep_in, m.in_channels, "keep_in")
    out_idx = keep_out.sort().values if keep_out is not None else torch.arange(m.out_channels)
    in_idx = keep_in.sort().values if keep_in is not None else torch.arange(m.in_channels)
    weight = m.weight.detach()  # [in, out, *k]
    dev = weight.device
    w = weight.index_select(0, in_idx.to(dev)).index_select(1, out_idx.to(dev))
    new = cast(_ConvNd, _copy(m, "weight", "bias"))
    new.in_channels, new.out_channels = int(in_idx.numel()), int(out_idx.numel())
    replace_tensor(new, "weight", w)
    if m.bias is not None:
        replace_tensor(new, "bias", m.bias.detach().index_select(0, out_idx.to(dev)))
    return new


def _shrink_linear(module: nn.Module, keep_out: Tensor | None, keep_in: Tensor | None) -> nn.Module:
    m = cast(nn.Linear, module)
    keep_out = _check("Linear", keep_out, m.out_features, "keep_out")
    keep_in = _check("Linear", keep_in, m.in_features, "keep_in")
    out_idx = keep_out.sort().values if keep_out is not None else torch.arange(m.out_features)
    in_idx = keep_in.sort().values if keep_in is not None else torch.arange(m.in_features)
    dev = m.weight.device
    w = m.weight.detach().index_select(0, out_idx.to(dev)).index_select(1, in_idx.to(dev))
    new = cast(nn.Linear, _copy(m, "weight", "bias"))
    new.in_features, new.out_features = int(in_idx.numel()), int(out_idx.numel())
    replace_tensor(new, "weight", w)
    if m.bias is not None:
        replace_tensor(new, "bias", m.bias.detach().index_select(0, out_idx.to(dev)))
    return new


def _shrink_norm(module: nn.Module, keep_out: Tensor | None, keep_in: Tensor | None) -> nn.Module:
    m = cast(_BatchNorm, module)
    name = type(m).__name__
    if keep_in is not None and keep_out is not None and not torch.equal(keep_in, keep_out):
        raise ValueError(
            f"`shrink({name})`: a norm layer keeps the same input and output channels."
        )
    keep = _check(name, keep_out if keep_out is not None else keep_in, m.num_features, "keep")
    if keep is None:
        return copy.deepcopy(m)
    idx = keep.sort().values
    new = cast(_BatchNorm, _copy(m, "weight", "bias", "running_mean", "running_var"))
    new.num_features = int(idx.numel())
    for key in ("weight", "bias", "running_mean", "running_var"):
        old = getattr(m, key, None)
        if isinstance(old, Tensor):
            replace_tensor(new, key, old.detach().index_select(0, idx.to(old.device)))
    return new


def _refuse_mixing_norm(
    module: nn.Module, keep_out: Tensor | None, keep_in: Tensor | None
) -> nn.Module:
    if keep_out is None and keep_in is None:
        return copy.deepcopy(module)
    raise ValueError(
        f"`shrink({type(module).__name__})`: its statistics mix channels, so removing a channel "
        "would change the others; such layers are kept whole."
    )


def _shrink_prelu(module: nn.Module, keep_out: Tensor | None, keep_in: Tensor | None) -> nn.Module:
    m = cast(nn.PReLU, module)
    keep = keep_out if keep_out is not None else keep_in
    if keep is None or m.num_parameters == 1:
        return copy.deepcopy(m)
    idx = cast(Tensor, _check("PReLU", keep, m.num_parameters, "keep")).sort().values
    new = cast(nn.PReLU, _copy(m, "weight"))
    new.num_parameters = int(idx.numel())
    replace_tensor(new, "weight", m.weight.detach().index_select(0, idx.to(m.weight.device)))
    return new


def _conv_shapes(module: nn.Module, w: dict[str, Any]) -> dict[str, Shape]:
    m = cast(_ConvNd, module)
    inc, outc, g = w["in_channels"], w["out_channels"], w["groups"]
    lead = (inc, outc // g) if m.transposed else (outc, inc // g)
    return {"weight": (*lead, *m.kernel_size), "bias": (outc,)}


def _groups_rule(w: dict[str, Any]) -> str | None:
    g = w["groups"]
    if w["in_channels"] % g or w["out_channels"] % g:
        inc, outc = w["in_channels"], w["out_channels"]
        return f"`groups`={g} must divide in_channels={inc} and out_channels={outc}"
    return None


def _norm_groups_rule(w: dict[str, Any]) -> str | None:
    if w["num_channels"] % w["num_groups"]:
        return f"`num_groups`={w['num_groups']} must divide num_channels={w['num_channels']}"
    return None


def _per_feature(attr: str) -> Callable[[nn.Module, dict[str, Any]], dict[str, Shape]]:
    def shapes(m: nn.Module, w: dict[str, Any]) -> dict[str, Shape]:
        n = (w[attr],)
        return {"weight": n, "bias": n, "running_mean": n, "running_var": n}

    return shapes


@dataclass(frozen=True)
class Layer:
    """How one family of layer types is shrunk and how it stores its widths.

    Attributes:
        types: the classes (their subclasses included, first match along the MRO).
        shrink: the shrink function.
        attrs: the attributes that hold its widths (none: it has no width to save).
        shapes: ``(module, widths) -> {tensor name: shape}`` the widths imply.
        rule: ``widths -> problem or None`` (groups that must divide channels, ...).
    """

    types: tuple[type[nn.Module], ...]
    shrink: ShrinkFn
    attrs: tuple[str, ...] = ()
    shapes: Callable[[nn.Module, dict[str, Any]], dict[str, Shape]] = lambda m, w: {}
    rule: Callable[[dict[str, Any]], str | None] = lambda w: None


def _linear_shapes(m: nn.Module, w: dict[str, Any]) -> dict[str, Shape]:
    return {"weight": (w["out_features"], w["in_features"]), "bias": (w["out_features"],)}


def _layer_norm_shapes(m: nn.Module, w: dict[str, Any]) -> dict[str, Shape]:
    return {"weight": tuple(w["normalized_shape"]), "bias": tuple(w["normalized_shape"])}


_CONV_ATTRS = ("in_channels", "out_channels", "groups")

LAYERS: list[Layer] = [
    Layer((nn.Conv1d, nn.Conv2d, nn.Conv3d), _shrink_conv, _CONV_ATTRS, _conv_shapes, _groups_rule),
    Layer(
        (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
        _shrink_conv_transpose,
        _CONV_ATTRS,
        _conv_shapes,
        _groups_rule,
    ),
    Layer((nn.Linear,), _shrink_linear, ("in_features", "out_features"), _linear_shapes),
    Layer(CHANNEL_NORM_TYPES, _shrink_norm, ("num_features",), _per_feature("num_features")),
    Layer(
        (nn.GroupNorm,),
        _refuse_mixing_norm,
        ("num_groups", "num_channels"),
        _per_feature("num_channels"),
        _norm_groups_rule,
    ),
    Layer((nn.LayerNorm,), _refuse_mixing_norm, ("normalized_shape",), _layer_norm_shapes),
    Layer((nn.LocalResponseNorm,), _refuse_mixing_norm),
    Layer((nn.PReLU,), _shrink_prelu, ("num_parameters",), _per_feature("num_parameters")),
]


def layer_of(module: nn.Module) -> Layer | None:
    """The registry entry of ``module``'s class (first match along its MRO)."""
    for cls in type(module).__mro__:
        for layer in LAYERS:
            if cls in layer.types:
                return layer
    return None
