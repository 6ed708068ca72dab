"""Shrink one layer: a small registry ``layer type -> function`` that returns a new, narrower copy.

Each function takes the layer, the output indices to keep and the input indices to keep (``None``
keeps an axis whole) and returns a new module of the same class, dtype and device whose
parameters and buffers are the kept slices of the old ones. The old module is not modified.

>>> from torch import nn
>>> conv = nn.Conv2d(4, 6, 3, groups=2)
>>> small = shrink(conv, keep_out=torch.tensor([0, 1, 3, 4]), keep_in=torch.tensor([0, 2]))
>>> (small.in_channels, small.out_channels, small.groups, tuple(small.weight.shape))
(2, 4, 2, (4, 1, 3, 3))
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize, prune

ShrinkFn = Callable[[nn.Module, "Tensor | None", "Tensor | None"], nn.Module]

_REGISTRY: dict[type[nn.Module], ShrinkFn] = {}

#: Normalisation layers with one scale/shift (and running statistics) per channel.
CHANNEL_NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, _InstanceNorm)


def register(*types: type[nn.Module]) -> Callable[[ShrinkFn], ShrinkFn]:
    """Register a shrink function for ``types`` (and their subclasses)."""

    def decorate(fn: ShrinkFn) -> ShrinkFn:
        for t in types:
            _REGISTRY[t] = fn
        return fn

    return decorate


def shrink_fn(module: nn.Module) -> ShrinkFn | None:
    """The registered shrink function for ``module``'s class (first match along its MRO)."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def is_masked(module: nn.Module) -> bool:
    """Whether ``module`` itself (not its children) has a ``torch.nn.utils.prune`` mask or a
    parametrization: its ``weight`` is then recomputed on every call and cannot be sliced."""
    hooks = module._forward_pre_hooks.values()
    masked = any(isinstance(h, prune.BasePruningMethod) for h in hooks)
    return masked or parametrize.is_parametrized(module)


def shrink(
    module: nn.Module, keep_out: Tensor | None = None, keep_in: Tensor | None = None
) -> nn.Module:
    """A new copy of ``module`` keeping only the ``keep_out`` output and ``keep_in`` input indices.

    Raises:
        TypeError: no shrink function is registered for the module's class.
        ValueError: the indices do not fit the layer (out of range, unbalanced groups, a layer
            that cannot be shrunk such as GroupNorm/LayerNorm, a parametrized layer).
    """
    fn = shrink_fn(module)
    if fn is None:
        raise TypeError(
            f"`shrink({type(module).__name__})`: no shrink function for this layer type; "
            f"supported: {sorted(t.__name__ for t in _REGISTRY)}."
        )
    if is_masked(module):
        raise ValueError(
            f"`shrink({type(module).__name__})`: the layer is parametrized or carries a "
            "`torch.nn.utils.prune` mask. HINT: call `torch.nn.utils.prune.remove(module, "
            "'weight')` or `parametrize.remove_parametrizations` before exporting."
        )
    return fn(module, keep_out, keep_in)


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
    """A deep copy of ``module`` that shares (does not copy) the tensors ``keys``, which the caller
    replaces."""
    memo: dict[int, Any] = {}
    for key in keys:
        t = getattr(module, key, None)
        if isinstance(t, Tensor):
            memo[id(t)] = t
    return copy.deepcopy(module, memo)


def _replace(new: nn.Module, key: str, value: Tensor) -> None:
    """Replace the parameter or buffer ``key`` of ``new`` by ``value`` (a fresh tensor, from
    ``index_select``), keeping its kind (parameter or buffer) and ``requires_grad``."""
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


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
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
    _replace(new, "weight", w)
    if m.bias is not None:
        _replace(new, "bias", m.bias.detach().index_select(0, out_idx.to(dev)))
    return new


@register(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
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
    _replace(new, "weight", w)
    if m.bias is not None:
        _replace(new, "bias", m.bias.detach().index_select(0, out_idx.to(dev)))
    return new


@register(nn.Linear)
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
    _replace(new, "weight", w)
    if m.bias is not None:
        _replace(new, "bias", m.bias.detach().index_select(0, out_idx.to(dev)))
    return new


@register(*CHANNEL_NORM_TYPES)
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
            _replace(new, key, old.detach().index_select(0, idx.to(old.device)))
    return new


@register(nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
def _refuse_mixing_norm(
    module: nn.Module, keep_out: Tensor | None, keep_in: Tensor | None
) -> nn.Module:
    if keep_out is None and keep_in is None:
        return copy.deepcopy(module)
    raise ValueError(
        f"`shrink({type(module).__name__})`: its statistics mix channels, so removing a channel "
        "would change the others; such layers are kept whole."
    )


@register(nn.PReLU)
def _shrink_prelu(module: nn.Module, keep_out: Tensor | None, keep_in: Tensor | None) -> nn.Module:
    m = cast(nn.PReLU, module)
    keep = keep_out if keep_out is not None else keep_in
    if keep is None or m.num_parameters == 1:
        return copy.deepcopy(m)
    idx = cast(Tensor, _check("PReLU", keep, m.num_parameters, "keep")).sort().values
    new = cast(nn.PReLU, _copy(m, "weight"))
    new.num_parameters = int(idx.numel())
    _replace(new, "weight", m.weight.detach().index_select(0, idx.to(m.weight.device)))
    return new
