"""The rule table of the coupling analysis: how each op maps its inputs' channels to its output's.

A rule takes the [`Analysis`][lightning_sparsity.pruning.analysis.coupling.Analysis] and an fx node
and returns the node's
[`Space`][lightning_sparsity.pruning.analysis.spaces.Space] (a tuple of them for ``chunk``).
Channel-wise ops pass the space on with updated constants; Conv/Linear layers start a new space
(their output channels) and record their input as an *exit*; ``+``/``*`` merge the channels they
combine; ``cat`` concatenates spaces; ``chunk`` and grouped convs add balance constraints; a channel
shuffle merges the channels it interleaves. An op without a rule keeps every channel reaching it
and raises if one of them could otherwise be removed.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable
from itertools import chain
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from lightning_sparsity.pruning.analysis.fxargs import (
    Rule,
    apply_const,
    arg,
    has_node,
    input_space,
    keeps_channels,
    shape_of,
    tuple_of,
    zero_only,
)
from lightning_sparsity.pruning.analysis.reshapes import (
    binary,
    cat,
    chunk,
    getitem,
    ignore,
    permute,
    reduce,
    reshape,
    shuffle,
    split,
    tuple_rule,
    unflatten_literal,
    view_literal,
)
from lightning_sparsity.pruning.analysis.spaces import (
    NAN,
    ParamRef,
    Space,
    finite,
    live,
    mix_value,
    norm_value,
)
from lightning_sparsity.pruning.features import FeatureLinear
from lightning_sparsity.pruning.layers import CHANNEL_NORM_TYPES, MIXING_NORM_TYPES

if TYPE_CHECKING:
    from lightning_sparsity.pruning.analysis.coupling import Analysis

ValueFn = Callable[["Analysis", fx.Node, Tensor], Tensor]


def _channelwise(value_fn: ValueFn) -> Rule:
    """A rule for an op that acts on each channel separately (activations, pooling, dropout)."""

    def rule(a: Analysis, node: fx.Node) -> Any:
        x, in_shape = input_space(a, node)
        if x is None:
            return None if shape_of(node) is not None and in_shape is not None else a.unknown(node)
        if not keeps_channels(x, node, in_shape):
            return a.unknown(node, "it changes the channel dimension")
        return x.with_value(value_fn(a, node, x.value))

    return rule


def _same(a: Analysis, node: fx.Node, v: Tensor) -> Tensor:
    return v


def _module_act(a: Analysis, node: fx.Node, v: Tensor) -> Tensor:
    module = a.module(node)
    if isinstance(module, nn.PReLU):
        w = float(module.weight.detach().flatten()[0])
        return apply_const(lambda t: torch.where(t >= 0, t, w * t), v)
    return apply_const(module.forward, v)  # forward: no user hooks fire on these constants


def _function_act(a: Analysis, node: fx.Node, v: Tensor) -> Tensor:
    rest, kwargs = node.args[1:], dict(node.kwargs)
    if has_node((rest, kwargs)):
        return zero_only(v) if node.target in _ZERO_KEEPING else torch.full_like(v, NAN)
    kwargs.pop("inplace", None)
    fn = cast(Callable[..., Tensor], node.target)
    return apply_const(lambda t: fn(t, *rest, **kwargs), v)


def _method_act(a: Analysis, node: fx.Node, v: Tensor) -> Tensor:
    rest, kwargs = node.args[1:], dict(node.kwargs)
    if has_node((rest, kwargs)):
        return torch.full_like(v, NAN)
    name = str(node.target)
    return apply_const(lambda t: getattr(t, name)(*rest, **kwargs), v)


def _avg_keeps(padding: Any, count_include_pad: Any, divisor_override: Any) -> bool:
    pads = tuple_of(padding)
    if divisor_override is not None or has_node((pads, count_include_pad)):
        return False
    return not count_include_pad or all(p == 0 for p in pads)


def _pool_module(a: Analysis, node: fx.Node, v: Tensor) -> Tensor:
    m = a.module(node)
    if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        divisor = getattr(m, "divisor_override", None)
        return v if _avg_keeps(m.padding, m.count_include_pad, divisor) else zero_only(v)
    if isinstance(m, (nn.LPPool1d, nn.LPPool2d)):
        return zero_only(v)
    return v  # max / adaptive max / adaptive avg: a constant stays the same constant


def _pool_function(a: Analysis, node: fx.Node, v: Tensor) -> Tensor:
    if node.target in _AVG_POOLS:
        keeps = _avg_keeps(
            arg(node, 3, "padding", 0),
            arg(node, 5, "count_include_pad", True),
            arg(node, 6, "divisor_override", None),
        )
        return v if keeps else zero_only(v)
    if node.target in (F.lp_pool1d, F.lp_pool2d):
        return zero_only(v)
    return v


def _pad_module(a: Analysis, node: fx.Node, v: Tensor) -> Tensor:
    m = a.module(node)
    if isinstance(m, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)):
        return torch.where(v == float(m.value), v, torch.full_like(v, NAN))
    return v  # reflection / replication / circular padding repeat the constant


def _pad_function(a: Analysis, node: fx.Node, v: Tensor) -> Tensor:
    mode = arg(node, 2, "mode", "constant")
    fill = arg(node, 3, "value", None)
    if mode != "constant":
        return v
    if isinstance(fill, fx.Node):
        return torch.full_like(v, NAN)
    return torch.where(v == float(fill or 0.0), v, torch.full_like(v, NAN))


def _softmax(a: Analysis, node: fx.Node) -> Any:
    x, in_shape = input_space(a, node)
    if x is None:
        return None
    dim = a.module(node).dim if node.op == "call_module" else arg(node, 1, "dim")
    if not isinstance(dim, int) or in_shape is None or not keeps_channels(x, node, in_shape):
        return a.unknown(node)
    dim %= len(in_shape)
    if x.dim <= dim < x.dim + x.slots.dim():
        a.pin(x.slots, f"{a.describe(node)} normalises over the channels")
    return x.with_value(torch.full_like(x.value, NAN))


# -- layers ---------------------------------------------------------------------------------------
def _tracked_input(a: Analysis, node: fx.Node, slots: Tensor, dim: int) -> Tensor:
    """Merge the call's input space with the layer's input slots; the input's constants."""
    x, _ = input_space(a, node)
    n = slots.numel()
    if x is not None and x.dim == dim and x.slots.dim() == 1 and x.slots.numel() == n:
        a.uf.union(x.slots, slots)
        return x.value
    why = f"{a.describe(node)} does not see its input's channels in a way the analysis follows"
    if x is not None:
        a.pin_all(x, why, error=True, node=node)
    a.pin(slots, why, error=x is not None, node=node)
    return live(n)


def _conv(a: Analysis, node: fx.Node) -> Any:
    m = cast(_ConvNd, a.module(node))
    name = str(node.target)
    in_slots = a.module_slots(a.layer_in, name, m.in_channels)
    out_slots = a.module_slots(a.layer_out, name, m.out_channels)
    value_in = _tracked_input(a, node, in_slots, 1)
    g = m.groups
    # a zoo conv (a proven leaf) may pad in its own forward: never fold constants through it
    uneven = (m.padding_mode == "zeros" and _zero_pads(m)) or name in a.leaves
    if m.transposed:
        if g != 1:
            why = f"grouped transposed conv `{name}` is kept whole"
            a.pin(in_slots, why, error=True, node=node)
            a.pin(out_slots, why, error=True, node=node)
            value = live(m.out_channels)
        else:
            value = mix_value(m.weight, m.bias, 1, value_in, uneven=True, transposed=True)
        a.exits.setdefault(name, []).append((node, value_in))
    elif g > 1 and g == m.in_channels:  # depthwise: an output channel goes with its input
        a.uf.union(out_slots, in_slots.repeat_interleave(m.out_channels // g))
        value = mix_value(m.weight, m.bias, g, value_in, uneven=uneven)
    else:
        if g > 1:
            why = f"grouped conv `{name}` keeps its {g} groups the same size"
            a.balance.append((list(in_slots.view(g, -1)), why))
            a.balance.append((list(out_slots.view(g, -1)), why))
        value = mix_value(m.weight, m.bias, g, value_in, uneven=uneven)
        a.exits.setdefault(name, []).append((node, value_in))
    a.record_dead(name, value)
    a.nonempty.append((out_slots, f"`{name}` keeps at least one output channel"))
    return Space(1, out_slots, value)


def _zero_pads(m: _ConvNd) -> bool:
    if isinstance(m.padding, str):
        return m.padding == "same" and any(k > 1 for k in m.kernel_size)
    return any(p > 0 for p in m.padding)


def _linear(a: Analysis, node: fx.Node) -> Any:
    m = cast(nn.Linear, a.module(node))
    name = str(node.target)
    x, in_shape = input_space(a, node)
    out_shape = shape_of(node)
    if in_shape is None or out_shape is None:
        return a.unknown(node)
    last = len(in_shape) - 1
    if x is not None and x.slots.dim() == 1 and x.dim < last:  # acts along a non-channel dim
        if m.bias is None:
            return x.with_value(zero_only(x.value))
        return x.with_value(torch.full_like(x.value, NAN))
    in_slots = a.module_slots(a.layer_in, name, m.in_features)
    out_slots = a.module_slots(a.layer_out, name, m.out_features)
    value_in = _tracked_input(a, node, in_slots, last)
    value = mix_value(m.weight, m.bias, 1, value_in, uneven=False)
    a.exits.setdefault(name, []).append((node, value_in))
    a.record_dead(name, value)
    a.nonempty.append((out_slots, f"`{name}` keeps at least one output unit"))
    return Space(len(out_shape) - 1, out_slots, value)


def _norm(a: Analysis, node: fx.Node) -> Any:
    m = a.module(node)
    name = str(node.target)
    n = int(m.num_parameters if isinstance(m, nn.PReLU) else cast(Any, m).num_features)
    slots = a.module_slots(a.norms, name, n)
    value_in = _tracked_input(a, node, slots, 1)
    if isinstance(m, nn.PReLU):
        w = m.weight.detach().to("cpu", torch.float64)
        value = finite(torch.where(value_in >= 0, value_in, w * value_in))
    else:
        value = norm_value(m, value_in)
    src = node.args[0]
    if isinstance(src, fx.Node) and src.op == "call_module" and str(src.target) in a.layer_out:
        a.record_dead(str(src.target), value)  # conv -> bn: a zero scale kills the filter too
    a.nonempty.append((slots, f"`{name}` keeps at least one channel"))
    return Space(1, slots, value)


_PROBES: tuple[float, ...] = (-1e3, -1.0, 0.0, 1.0, 1e3)


@torch.no_grad()
def constants_through(module: nn.Module, value: Tensor, shape: tuple[int, ...]) -> Tensor:
    """What a per-channel module makes of constant channels (``NaN``: not a known constant).

    Each channel is fed, over the recorded spatial size, its constant (or, for a live channel,
    each of a few probe values); an output channel is a known constant when it is uniform and
    the same for every probe (a zeroed scale and shift kill a channel whatever comes in).
    """
    param = next(chain(module.parameters(), module.buffers()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    tail = tuple(shape[2:])
    outs = []
    for p in _PROBES:
        v = torch.where(torch.isnan(value), torch.full_like(value, p), value)
        x = v.to(dtype).view(1, -1, *([1] * len(tail))).expand(1, v.numel(), *tail).contiguous()
        y = module(x.to(device)).to(torch.float64).cpu().reshape(v.numel(), -1)
        uniform = (y == y[:, :1]).all(dim=1)
        outs.append(torch.where(uniform, y[:, 0], torch.full_like(y[:, 0], NAN)))
    first = outs[0]
    same = torch.stack([(o == first) for o in outs]).all(dim=0)
    return finite(torch.where(same, first, torch.full_like(first, NAN)))


def _leaf_channelwise(a: Analysis, node: fx.Node) -> Any:
    """A zoo module proven per-channel (a frozen or fused norm, a layer scale): like a norm."""
    name = str(node.target)
    x, in_shape = input_space(a, node)
    if x is None or in_shape is None or x.dim != 1 or x.slots.dim() != 1:
        return a.unknown(node, "a per-channel module whose input the analysis does not follow")
    slots = a.module_slots(a.norms, name, x.slots.numel())
    value_in = _tracked_input(a, node, slots, 1)
    value = constants_through(a.module(node), value_in, in_shape)
    src = node.args[0]
    if isinstance(src, fx.Node) and src.op == "call_module" and str(src.target) in a.layer_out:
        a.record_dead(str(src.target), value)
    a.nonempty.append((slots, f"`{name}` keeps at least one channel"))
    return Space(1, slots, value)


def _functional_batch_norm(a: Analysis, node: fx.Node) -> Any:
    """``F.batch_norm(...)`` whose tensors are a module's own: like a BatchNorm layer.

    That is ``F.batch_norm(x, mean, var, weight, bias, training=False, ...)`` with the statistics
    and the affine parameters a module's own tensors (a zoo's norm written in a larger ``forward``):
    like a BatchNorm layer, its tensors sliced with the channels.
    """
    x, in_shape = input_space(a, node)
    if x is None or in_shape is None or x.dim != 1 or x.slots.dim() != 1:
        return a.unknown(node)
    n = x.slots.numel()
    training, eps = arg(node, 5, "training", False), arg(node, 7, "eps", 1e-5)
    refs = [a.space(arg(node, i, key)) for i, key in enumerate(_BN_ARGS, start=1)]
    if training is not False or not isinstance(eps, float | int):
        return a.unknown(node, "a batch norm in training mode, or one the analysis cannot read")
    if any(r is not None and (not isinstance(r, ParamRef) or r.size != n) for r in refs):
        return a.unknown(node, "a batch norm whose statistics are not a module's own tensors")
    for r in refs:
        if isinstance(r, ParamRef):
            a.uf.union(a.param_slots(r), x.slots)
    mean, var, weight, bias = (
        r.value if isinstance(r, ParamRef) else torch.full((n,), d, dtype=torch.float64)
        for r, d in zip(refs, (0.0, 1.0, 1.0, 0.0))
    )
    scale = weight / torch.sqrt(var + float(eps))
    value = torch.where(scale == 0, bias, (x.value - mean) * scale + bias)
    src = node.args[0]
    if isinstance(src, fx.Node) and src.op == "call_module" and str(src.target) in a.layer_out:
        a.record_dead(str(src.target), finite(value))
    return Space(1, x.slots, finite(value))


_BN_ARGS = ("running_mean", "running_var", "weight", "bias")


def _prelu(a: Analysis, node: fx.Node) -> Any:
    if cast(nn.PReLU, a.module(node)).num_parameters == 1:
        return _channelwise(_module_act)(a, node)
    return _norm(a, node)


def _mixing_norm(a: Analysis, node: fx.Node) -> Any:
    x, in_shape = input_space(a, node)
    if x is None or not keeps_channels(x, node, in_shape):
        return a.unknown(node)
    a.pin(x.slots, f"{a.describe(node)} normalises channels jointly, so they are kept")
    return x.with_value(torch.full_like(x.value, NAN))


def _modules_rule(m: nn.Module) -> Rule | None:
    if isinstance(m, FeatureLinear):  # reads a selection of its input: kept whole
        return None
    for types, rule in _MODULE_RULES:
        if isinstance(m, types):
            return rule
    return None


def lookup(a: Analysis, node: fx.Node) -> Rule | None:
    """The rule for ``node``, or ``None`` when the analysis cannot follow it."""
    if node.op == "call_module":
        name = str(node.target)
        kind = a.leaves.get(name)
        if kind is not None:
            return {"conv": _conv, "linear": _linear, "channelwise": _leaf_channelwise}[kind]
        if name in a.opaque:
            return None
        return _modules_rule(a.module(node))
    if node.op == "call_method":
        return _METHOD_RULES.get(str(node.target))
    target = node.target
    try:
        rule = _FUNCTION_RULES.get(target)
    except TypeError:  # unhashable target
        rule = None
    if rule is not None:
        return rule
    if isinstance(target, type) and issubclass(target, tuple):  # a namedtuple of outputs
        return tuple_rule
    module = getattr(target, "__module__", "") or ""
    if getattr(target, "__name__", "") == "stochastic_depth" and module.startswith("torchvision"):
        return _channelwise(_same)  # identity in eval mode; zeros stay zeros in training
    return None


_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.LogSigmoid,
)  # fmt: skip
_IDENTITIES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)  # fmt: skip
_POOLS: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
)  # fmt: skip
_PADS: tuple[type[nn.Module], ...] = (
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
    nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
)  # fmt: skip

_MODULE_RULES: tuple[tuple[tuple[type[nn.Module], ...], Rule], ...] = (
    ((_ConvNd,), _conv),
    ((nn.Linear,), _linear),
    (CHANNEL_NORM_TYPES, _norm),
    ((nn.PReLU,), _prelu),
    (MIXING_NORM_TYPES, _mixing_norm),
    (_ACTIVATIONS, _channelwise(_module_act)),
    (_IDENTITIES, _channelwise(_same)),
    (_POOLS, _channelwise(_pool_module)),
    (_PADS, _channelwise(_pad_module)),
    ((nn.Flatten,), reshape(lambda a, n, p: False)),
    ((nn.Unflatten,), reshape(unflatten_literal)),
    ((nn.Softmax, nn.LogSoftmax), _softmax),
    ((nn.ChannelShuffle,), shuffle),
)

_ACT_FUNCTIONS = (
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.elu, F.elu_,
    F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.sigmoid, torch.sigmoid,
    F.tanh, torch.tanh, F.hardtanh, F.hardtanh_, F.softplus, F.softsign, F.logsigmoid,
    torch.clamp, torch.clip, torch.abs, torch.neg,
)  # fmt: skip
_ZERO_KEEPING = (F.leaky_relu, F.elu)  # f(0) = 0 whatever their other arguments
_AVG_POOLS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
_POOL_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d,
    torch.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.lp_pool1d,
    F.lp_pool2d, *_AVG_POOLS,
)  # fmt: skip
_IDENTITY_FUNCTIONS = (
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    F.interpolate, F.upsample, torch.clone,
)  # fmt: skip

_FUNCTION_RULES: dict[Any, Rule] = {
    **dict.fromkeys(_ACT_FUNCTIONS, _channelwise(_function_act)),
    **dict.fromkeys(_POOL_FUNCTIONS, _channelwise(_pool_function)),
    **dict.fromkeys(_IDENTITY_FUNCTIONS, _channelwise(_same)),
    F.pad: _channelwise(_pad_function),
    F.batch_norm: _functional_batch_norm,
    **dict.fromkeys((operator.add, operator.iadd, torch.add), binary("add")),
    **dict.fromkeys((operator.sub, operator.isub, torch.sub, torch.subtract), binary("sub")),
    **dict.fromkeys((operator.mul, operator.imul, torch.mul, torch.multiply), binary("mul")),
    **dict.fromkeys((operator.truediv, operator.itruediv, torch.div, torch.divide), binary("div")),
    **dict.fromkeys((torch.cat, torch.concat, torch.concatenate), cat),
    torch.chunk: chunk,
    **dict.fromkeys((torch.split, torch.tensor_split), split),
    operator.getitem: getitem,
    **dict.fromkeys((torch.mean, torch.amax, torch.amin), reduce(scale=False)),
    torch.sum: reduce(scale=True),
    **dict.fromkeys((torch.permute, torch.transpose, torch.swapaxes, torch.swapdims), permute),
    torch.flatten: reshape(lambda a, n, p: False),
    torch.reshape: reshape(lambda a, n, p: view_literal(n, p)),
    **dict.fromkeys((torch.squeeze, torch.unsqueeze), reshape(lambda a, n, p: False)),
    **dict.fromkeys((F.softmax, F.log_softmax, torch.softmax, torch.log_softmax), _softmax),
    **dict.fromkeys((torch.channel_shuffle, torch.native_channel_shuffle), shuffle),
    builtins.getattr: ignore,
    builtins.len: ignore,
}

_ACT_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
    "clamp_min", "clamp_max", "abs", "neg",
)  # fmt: skip
_METHOD_RULES: dict[str, Rule] = {
    **dict.fromkeys(_ACT_METHODS, _channelwise(_method_act)),
    **dict.fromkeys(("contiguous", "clone", "detach"), _channelwise(_same)),
    # a broadcast that keeps the channel dimension (an SE gate expanded over the image)
    **dict.fromkeys(("expand_as", "expand"), _channelwise(_same)),
    **dict.fromkeys(("add", "add_"), binary("add")),
    **dict.fromkeys(("sub", "sub_"), binary("sub")),
    **dict.fromkeys(("mul", "mul_"), binary("mul")),
    **dict.fromkeys(("div", "div_"), binary("div")),
    "chunk": chunk,
    **dict.fromkeys(("split", "tensor_split"), split),
    **dict.fromkeys(("mean", "amax", "amin"), reduce(scale=False)),
    "sum": reduce(scale=True),
    **dict.fromkeys(("permute", "transpose", "transpose_", "swapaxes", "swapdims"), permute),
    **dict.fromkeys(("view", "reshape"), reshape(lambda a, n, p: view_literal(n, p))),
    **dict.fromkeys(("flatten", "squeeze", "unsqueeze"), reshape(lambda a, n, p: False)),
    "unflatten": reshape(unflatten_literal),
    **dict.fromkeys(("softmax", "log_softmax"), _softmax),
    **dict.fromkeys(("size", "dim", "numel", "ndimension", "nelement"), ignore),
}
