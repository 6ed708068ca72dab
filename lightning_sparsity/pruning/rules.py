"""The rule table of the coupling analysis: how each op maps its inputs' channels to its output's.

A rule takes the :class:`~lightning_sparsity.pruning.coupling.Analysis` and an fx node and returns
the node's :class:`~lightning_sparsity.pruning.spaces.Space` (a tuple of them for ``chunk``).
Channel-wise ops pass the space on with updated constants; Conv/Linear layers start a new space
(their output channels) and record their input as an *exit*; ``+``/``*`` merge the channels they
combine; ``cat`` concatenates spaces; ``chunk`` and grouped convs add balance constraints; a channel
shuffle merges the channels it interleaves. An op without a rule keeps every channel reaching it
and raises if one of them could otherwise be removed.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from lightning_sparsity.pruning.spaces import (
    NAN,
    Space,
    compress,
    expand_to,
    finite,
    live,
    merge_sizes,
    mix_value,
    norm_value,
)
from lightning_sparsity.pruning.surgery import CHANNEL_NORM_TYPES

if TYPE_CHECKING:
    from lightning_sparsity.pruning.coupling import Analysis

Rule = Callable[["Analysis", fx.Node], Any]
ValueFn = Callable[["Analysis", fx.Node, Tensor], Tensor]


# -- small helpers -------------------------------------------------------------------------------
def _arg(node: fx.Node, i: int, key: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def _shape(arg: Any) -> tuple[int, ...] | None:
    if not isinstance(arg, fx.Node):
        return None
    shape = getattr(arg.meta.get("tensor_meta"), "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _input(a: Analysis, node: fx.Node) -> tuple[Space | None, tuple[int, ...] | None]:
    x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    space = a.space(x)
    return (space if isinstance(space, Space) else None), _shape(x)


def _keeps_channels(x: Space, node: fx.Node, in_shape: tuple[int, ...] | None) -> bool:
    out_shape = _shape(node)
    if in_shape is None or out_shape is None or len(in_shape) != len(out_shape):
        return False
    k = x.slots.dim()
    return out_shape[x.dim : x.dim + k] == tuple(x.slots.shape)


def _zero_only(value: Tensor) -> Tensor:
    """Zeros stay zeros, any other constant stops being constant."""
    return torch.where(value == 0, value, torch.full_like(value, NAN))


def _apply(fn: Callable[[Tensor], Any], value: Tensor) -> Tensor:
    """``fn`` applied to the constant entries of ``value`` (``NaN`` stays ``NaN``)."""
    known = ~torch.isnan(value)
    if not bool(known.any()):
        return value
    try:
        with torch.no_grad():
            out = fn(torch.where(known, value, torch.zeros_like(value)).clone())
    except Exception:  # an activation that does not take float64 / these shapes: trust nothing
        return torch.full_like(value, NAN)
    if not isinstance(out, Tensor) or out.shape != value.shape:
        return torch.full_like(value, NAN)
    return finite(torch.where(known, out.to(torch.float64), torch.full_like(value, NAN)))


def _has_node(values: Any) -> bool:
    found = False

    def visit(n: fx.Node) -> fx.Node:
        nonlocal found
        found = True
        return n

    fx.node.map_arg(values, visit)
    return found


def _channelwise(value_fn: ValueFn) -> Rule:
    """A rule for an op that acts on each channel separately (activations, pooling, dropout)."""

    def rule(a: Analysis, node: fx.Node) -> Any:
        x, in_shape = _input(a, node)
        if x is None:
            return None if _shape(node) is not None and in_shape is not None else a.unknown(node)
        if not _keeps_channels(x, node, in_shape):
            return a.unknown(node, "it changes the channel dimension")
        return x.with_value(value_fn(a, node, x.value))

    return rule


def _same(a: Analysis, node: fx.Node, v: Tensor) -> Tensor:
    return v


def _zero(a: Analysis, node: fx.Node, v: Tensor) -> Tensor:
    return _zero_only(v)


def _module_act(a: Analysis, node: fx.Node, v: Tensor) -> Tensor:
    module = a.module(node)
    if isinstance(module, nn.PReLU):
        w = float(module.weight.detach().flatten()[0])
        return _apply(lambda t: torch.where(t >= 0, t, w * t), v)
    return _apply(module, v)


def _function_act(a: Analysis, node: fx.Node, v: Tensor) -> Tensor:
    rest, kwargs = node.args[1:], dict(node.kwargs)
    if _has_node((rest, kwargs)):
        return _zero_only(v) if node.target in _ZERO_KEEPING else torch.full_like(v, NAN)
    kwargs.pop("inplace", None)
    fn = cast(Callable[..., Tensor], node.target)
    return _apply(lambda t: fn(t, *rest, **kwargs), v)


def _method_act(a: Analysis, node: fx.Node, v: Tensor) -> Tensor:
    rest, kwargs = node.args[1:], dict(node.kwargs)
    if _has_node((rest, kwargs)):
        return torch.full_like(v, NAN)
    name = str(node.target)
    return _apply(lambda t: getattr(t, name)(*rest, **kwargs), v)


def _tuple_of(x: Any) -> tuple[int, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _avg_keeps(padding: Any, count_include_pad: Any, divisor_override: Any) -> bool:
    pads = _tuple_of(padding)
    if divisor_override is not None or _has_node((pads, count_include_pad)):
        return False
    return not count_include_pad or all(p == 0 for p in pads)


def _pool_module(a: Analysis, node: fx.Node, v: Tensor) -> Tensor:
    m = a.module(node)
    if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        divisor = getattr(m, "divisor_override", None)
        return v if _avg_keeps(m.padding, m.count_include_pad, divisor) else _zero_only(v)
    if isinstance(m, (nn.LPPool1d, nn.LPPool2d)):
        return _zero_only(v)
    return v  # max / adaptive max / adaptive avg: a constant stays the same constant


def _pool_function(a: Analysis, node: fx.Node, v: Tensor) -> Tensor:
    if node.target in _AVG_POOLS:
        keeps = _avg_keeps(
            _arg(node, 3, "padding", 0),
            _arg(node, 5, "count_include_pad", True),
            _arg(node, 6, "divisor_override", None),
        )
        return v if keeps else _zero_only(v)
    if node.target in (F.lp_pool1d, F.lp_pool2d):
        return _zero_only(v)
    return v


def _pad_module(a: Analysis, node: fx.Node, v: Tensor) -> Tensor:
    m = a.module(node)
    if isinstance(m, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)):
        return torch.where(v == float(m.value), v, torch.full_like(v, NAN))
    return v  # reflection / replication / circular padding repeat the constant


def _pad_function(a: Analysis, node: fx.Node, v: Tensor) -> Tensor:
    mode = _arg(node, 2, "mode", "constant")
    fill = _arg(node, 3, "value", None)
    if mode != "constant":
        return v
    if isinstance(fill, fx.Node):
        return torch.full_like(v, NAN)
    return torch.where(v == float(fill or 0.0), v, torch.full_like(v, NAN))


def _softmax(a: Analysis, node: fx.Node) -> Any:
    x, in_shape = _input(a, node)
    if x is None:
        return None
    dim = a.module(node).dim if node.op == "call_module" else _arg(node, 1, "dim")
    if not isinstance(dim, int) or in_shape is None or not _keeps_channels(x, node, in_shape):
        return a.unknown(node)
    dim %= len(in_shape)
    if x.dim <= dim < x.dim + x.slots.dim():
        a.pin(x.slots, f"{a.describe(node)} normalises over the channels")
    return x.with_value(torch.full_like(x.value, NAN))


# -- layers ---------------------------------------------------------------------------------------
def _tracked_input(a: Analysis, node: fx.Node, slots: Tensor, dim: int) -> Tensor:
    """Merge the call's input space with the layer's input slots; the input's constants."""
    x, _ = _input(a, node)
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
    uneven = m.padding_mode == "zeros" and _zero_pads(m)
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
    x, in_shape = _input(a, node)
    out_shape = _shape(node)
    if in_shape is None or out_shape is None:
        return a.unknown(node)
    last = len(in_shape) - 1
    if x is not None and x.slots.dim() == 1 and x.dim < last:  # acts along a non-channel dim
        if m.bias is None:
            return x.with_value(_zero_only(x.value))
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


def _prelu(a: Analysis, node: fx.Node) -> Any:
    if cast(nn.PReLU, a.module(node)).num_parameters == 1:
        return _channelwise(_module_act)(a, node)
    return _norm(a, node)


def _mixing_norm(a: Analysis, node: fx.Node) -> Any:
    x, in_shape = _input(a, node)
    if x is None or not _keeps_channels(x, node, in_shape):
        return a.unknown(node)
    a.pin(x.slots, f"{a.describe(node)} normalises channels jointly, so they are kept")
    return x.with_value(torch.full_like(x.value, NAN))


# -- combining and reshaping ---------------------------------------------------------------------
def _binary(op: str) -> Rule:
    def rule(a: Analysis, node: fx.Node) -> Any:
        out_shape = _shape(node)
        if out_shape is None or (len(node.args) < 2 and "other" not in node.kwargs):
            return a.unknown(node)
        operands = [_arg(node, 0, "input"), _arg(node, 1, "other")]
        rank = len(out_shape)
        full: list[tuple[Space, int]] = []
        for o in operands:
            s, sh = a.space(o), _shape(o)
            if isinstance(s, Space) and sh is not None:
                pos = rank + s.dim - len(sh)
                if out_shape[pos : pos + s.slots.dim()] == tuple(s.slots.shape):
                    full.append((s, s.dim - len(sh)))
        if not full or len({neg for _, neg in full}) != 1:
            return a.unknown(node)
        ref, neg = full[0]
        k = ref.slots.dim()
        values: list[Tensor] = []
        for o in operands:
            s, sh = a.space(o), _shape(o)
            if sh is None:  # a Python number, or a size computed in the graph
                number = isinstance(o, (int, float)) and not isinstance(o, bool)
                values.append(torch.tensor(float(o) if number else NAN, dtype=torch.float64))
                continue
            p = len(sh) + neg
            sizes = sh[max(p, 0) : p + k] if p >= 0 else ()
            if isinstance(s, Space) and any(s is f for f, _ in full):
                if tuple(s.slots.shape) != tuple(ref.slots.shape):
                    return a.unknown(node)
                a.uf.union(s.slots, ref.slots)
                values.append(s.value)
            elif all(size == 1 for size in sizes):  # broadcast over the channels
                if isinstance(s, Space):
                    a.pin(s.slots, f"broadcast over channels by {a.describe(node)}")
                one = isinstance(s, Space) and s.value.numel() == 1
                values.append(s.value.reshape(()) if one and s is not None else torch.tensor(NAN))
            else:
                why = "an operand's channels are not tracked (a parameter used in `forward`?)"
                return a.unknown(node, why)
        alpha = node.kwargs.get("alpha", 1)
        alpha = float(alpha) if isinstance(alpha, (int, float)) else NAN
        lhs, rhs = (v.to(torch.float64) for v in values)
        if op == "add":
            out = lhs + alpha * rhs
        elif op == "sub":
            out = lhs - alpha * rhs
        elif op == "mul":
            out = torch.where((lhs == 0) | (rhs == 0), torch.zeros(()), lhs * rhs)
        else:
            known = ~torch.isnan(rhs) & (rhs != 0)
            out = torch.where((lhs == 0) & known, torch.zeros(()), lhs / rhs)
        out = finite(out.to(torch.float64).expand(ref.slots.shape).clone())
        return Space(rank + neg, ref.slots, out, ref.fixed_axis)

    return rule


def _cat(a: Analysis, node: fx.Node) -> Any:
    tensors = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0)
    out_shape = _shape(node)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or out_shape is None:
        return a.unknown(node)
    dim %= len(out_shape)
    spaces = [a.space(t) for t in tensors]
    if not all(isinstance(s, Space) for s in spaces):
        return a.unknown(node)
    first = spaces[0]
    if all(s.dim == dim and s.slots.dim() == 1 for s in spaces):
        return Space(
            dim, torch.cat([s.slots for s in spaces]), torch.cat([s.value for s in spaces])
        )
    k = first.slots.dim()
    if not first.dim <= dim < first.dim + k and all(
        s.dim == first.dim and s.slots.shape == first.slots.shape for s in spaces
    ):
        stack = torch.stack([s.value for s in spaces])
        for s in spaces[1:]:
            a.uf.union(s.slots, first.slots)
        agree = (stack == stack[0]).all(0)
        return first.with_value(torch.where(agree, stack[0], torch.full_like(stack[0], NAN)))
    return a.unknown(node)


def _split_parts(a: Analysis, node: fx.Node, x: Space, dim: int) -> tuple[Space, ...] | None:
    metas = node.meta.get("tensor_meta")
    if not isinstance(metas, (tuple, list)):
        return None
    if x.dim == dim and x.slots.dim() == 1:
        sizes = [int(m.shape[dim]) for m in metas]
        slots, values = torch.split(x.slots, sizes), torch.split(x.value, sizes)
        return tuple(Space(dim, s, v) for s, v in zip(slots, values))
    if not x.dim <= dim < x.dim + x.slots.dim():
        return tuple(x for _ in metas)
    return None


def _chunk(a: Analysis, node: fx.Node) -> Any:
    x, in_shape = _input(a, node)
    chunks, dim = _arg(node, 1, "chunks"), _arg(node, 2, "dim", 0)
    if x is None or in_shape is None or not isinstance(chunks, int) or not isinstance(dim, int):
        return a.unknown(node)
    dim %= len(in_shape)
    parts = _split_parts(a, node, x, dim)
    if parts is None:
        return a.unknown(node)
    if x.dim == dim:
        sizes = {p.slots.numel() for p in parts}
        if len(sizes) == 1:
            why = f"{a.describe(node)} splits the channels into {len(parts)} equal chunks"
            a.balance.append(([p.slots for p in parts], why))
            for p in parts:
                a.nonempty.append((p.slots, why))
        else:
            a.pin(x.slots, f"{a.describe(node)} makes uneven chunks", error=True, node=node)
    return parts


def _split(a: Analysis, node: fx.Node) -> Any:
    x, in_shape = _input(a, node)
    dim = _arg(node, 2, "dim", 0)
    if x is None or in_shape is None or not isinstance(dim, int):
        return a.unknown(node)
    dim %= len(in_shape)
    parts = _split_parts(a, node, x, dim)
    if parts is None:
        return a.unknown(node)
    if x.dim == dim:
        why = f"{a.describe(node)} splits the channels at sizes written in the code"
        a.pin(x.slots, why + " (HINT: use `chunk`)", error=True, node=node)
    return parts


def _getitem(a: Analysis, node: fx.Node) -> Any:
    src, index = node.args[0], node.args[1]
    s = a.space(src)
    if isinstance(s, tuple) and isinstance(index, int):
        return s[index]
    if _shape(src) is None:  # an item of a size or of a tuple without channels
        return None
    if s is None:
        return None
    parts = index if isinstance(index, tuple) else (index,)
    if all(p is Ellipsis or p == slice(None) for p in parts):
        return s
    return a.unknown(node, "it indexes the tensor")


def _reduce(scale: bool) -> Rule:
    def rule(a: Analysis, node: fx.Node) -> Any:
        x, in_shape = _input(a, node)
        if x is None or in_shape is None:
            return None if in_shape is not None else a.unknown(node)
        dims, keepdim = _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False)
        if dims is None or _has_node(dims) or not isinstance(keepdim, bool):
            return a.unknown(node, "it reduces over every dimension")
        rank = len(in_shape)
        dims = [d % rank for d in _tuple_of(dims)]
        if any(x.dim <= d < x.dim + x.slots.dim() for d in dims):
            return a.unknown(node, "it reduces over the channels")
        new_dim = x.dim if keepdim else x.dim - sum(d < x.dim for d in dims)
        value = x.value * math.prod(in_shape[d] for d in dims) if scale else x.value
        return Space(new_dim, x.slots, finite(value), x.fixed_axis)

    return rule


def _permute(a: Analysis, node: fx.Node) -> Any:
    x, in_shape = _input(a, node)
    if in_shape is None:
        return a.unknown(node)
    rank = len(in_shape)
    name = str(node.target) if node.op == "call_method" else node.target.__name__  # type: ignore[union-attr]
    if name in ("transpose", "swapaxes", "swapdims", "transpose_"):
        d0, d1 = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
        if not isinstance(d0, int) or not isinstance(d1, int):
            return a.unknown(node)
        perm = list(range(rank))
        perm[d0 % rank], perm[d1 % rank] = perm[d1 % rank], perm[d0 % rank]
    else:
        dims: tuple[Any, ...] = (
            tuple(node.args[1:]) if len(node.args) > 2 else _tuple_of(_arg(node, 1, "dims"))
        )
        if len(dims) != rank or not all(isinstance(d, int) for d in dims):
            return a.unknown(node)
        perm = [int(d) % rank for d in dims]
    if x is None:
        return None
    if x.slots.dim() == 1:
        return Space(perm.index(x.dim), x.slots, x.value)
    d = x.dim
    if perm[d] == d and perm[d + 1] == d + 1:
        return x
    if perm[d] == d + 1 and perm[d + 1] == d and x.fixed_axis is not None:
        return Space(d, x.slots.T.contiguous(), x.value.T.contiguous(), 1 - x.fixed_axis)
    return a.unknown(node)


def _literal_sizes(node: fx.Node) -> list[Any]:
    sizes = list(node.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = list(sizes[0])
    if not sizes:
        sizes = list(cast(Any, node.kwargs.get("shape", node.kwargs.get("size", ()))))
    return sizes


def _is_literal(size: Any) -> bool:
    return isinstance(size, int) and not isinstance(size, bool) and size != -1


def _view_literal(node: fx.Node, pos: int) -> bool:
    sizes = _literal_sizes(node)
    out_shape = _shape(node) or ()
    if len(sizes) != len(out_shape):
        return True
    return _is_literal(sizes[pos])


def _never_literal(node: fx.Node, pos: int) -> bool:
    return False


def _unflatten_literal(a: Analysis, node: fx.Node, pos: int) -> bool:
    if node.op == "call_module":
        m = cast(nn.Unflatten, a.module(node))
        dim, sizes = m.dim, list(m.unflattened_size)
    else:
        dim, sizes = _arg(node, 1, "dim"), list(_tuple_of(_arg(node, 2, "sizes")))
    rank = len(_shape(node) or ())
    if not isinstance(dim, int) or rank == 0:
        return True
    dim %= rank - len(sizes) + 1
    return dim <= pos < dim + len(sizes) and _is_literal(sizes[pos - dim])


def _reshape(literal: Callable[[Analysis, fx.Node, int], bool]) -> Rule:
    def rule(a: Analysis, node: fx.Node) -> Any:
        x, in_shape = _input(a, node)
        out_shape = _shape(node)
        if x is None:
            return None if in_shape is not None else a.unknown(node)
        if in_shape is None or out_shape is None:
            return a.unknown(node)
        if out_shape == in_shape:
            return x
        d, k = x.dim, x.slots.dim()
        full = expand_to(x, in_shape[d:])
        if out_shape[:d] != in_shape[:d] or len(out_shape) <= d or full is None:
            return a.unknown(node, "it reshapes the dimensions before the channels")
        slots, value = compress(full[0].reshape(out_shape[d:]), full[1].reshape(out_shape[d:]))
        j = slots.dim()
        fixed_size = f"{a.describe(node)} writes the size of the channel dimension literally"
        merged = out_shape[d] == in_shape[d] or merge_sizes(in_shape[d:], out_shape[d])
        if j == 1 and (
            (k == 1 and merged) or (k == 2 and out_shape[d] == in_shape[d] * in_shape[d + 1])
        ):
            if literal(a, node, d):
                hint = " (HINT: use `torch.flatten(x, 1)` or `x.view(x.size(0), -1)`)"
                a.pin(slots, fixed_size + hint, error=True, node=node)
            return Space(d, slots, value)
        if k == 1 and j == 2 and out_shape[d] * out_shape[d + 1] == in_shape[d]:
            lit = (literal(a, node, d), literal(a, node, d + 1))
            fixed = 0 if lit[0] else 1
            if lit[0] == lit[1]:
                a.pin(slots, f"{a.describe(node)} splits the channels ambiguously", True, node)
            grid = slots if fixed == 0 else slots.T
            for j in range(grid.shape[1]):
                a.uf.union_all(grid[:, j])
            return Space(d, slots, value, fixed)
        return a.unknown(node, "it reshapes the channel dimension in a way it cannot follow")

    return rule


def _shuffle(a: Analysis, node: fx.Node) -> Any:
    x, _ = _input(a, node)
    groups = a.module(node).groups if node.op == "call_module" else _arg(node, 1, "groups")
    if x is None or x.dim != 1 or x.slots.dim() != 1 or not isinstance(groups, int):
        return a.unknown(node)
    grid = x.slots.view(groups, -1)
    for j in range(grid.shape[1]):
        a.uf.union_all(grid[:, j])
    return Space(1, grid.T.flatten(), x.value.view(groups, -1).T.flatten())


def _tuple(a: Analysis, node: fx.Node) -> Any:
    return tuple(a.space(arg) for arg in node.args)


def _ignore(a: Analysis, node: fx.Node) -> Any:
    return None


def _modules_rule(m: nn.Module) -> Rule | None:
    for types, rule in _MODULE_RULES:
        if isinstance(m, types):
            return rule
    return None


def lookup(a: Analysis, node: fx.Node) -> Rule | None:
    """The rule for ``node``, or ``None`` when the analysis cannot follow it."""
    if node.op == "call_module":
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
        return _tuple
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
    ((nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm), _mixing_norm),
    (_ACTIVATIONS, _channelwise(_module_act)),
    (_IDENTITIES, _channelwise(_same)),
    (_POOLS, _channelwise(_pool_module)),
    (_PADS, _channelwise(_pad_module)),
    ((nn.Flatten,), _reshape(lambda a, n, p: False)),
    ((nn.Unflatten,), _reshape(_unflatten_literal)),
    ((nn.Softmax, nn.LogSoftmax), _softmax),
    ((nn.ChannelShuffle,), _shuffle),
)

_ACT_FUNCTIONS = (
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.elu, F.elu_,
    F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.sigmoid, torch.sigmoid,
    F.tanh, torch.tanh, F.hardtanh, F.hardtanh_, F.softplus, F.softsign, F.logsigmoid,
    torch.clamp, torch.clip, torch.abs, torch.neg,
)  # fmt: skip
_ZERO_KEEPING = (torch.clamp, torch.clip, F.hardtanh, F.leaky_relu, F.elu)
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
    **dict.fromkeys((operator.add, operator.iadd, torch.add), _binary("add")),
    **dict.fromkeys((operator.sub, operator.isub, torch.sub, torch.subtract), _binary("sub")),
    **dict.fromkeys((operator.mul, operator.imul, torch.mul, torch.multiply), _binary("mul")),
    **dict.fromkeys((operator.truediv, operator.itruediv, torch.div, torch.divide), _binary("div")),
    **dict.fromkeys((torch.cat, torch.concat, torch.concatenate), _cat),
    torch.chunk: _chunk,
    **dict.fromkeys((torch.split, torch.tensor_split), _split),
    operator.getitem: _getitem,
    **dict.fromkeys((torch.mean, torch.amax, torch.amin), _reduce(scale=False)),
    torch.sum: _reduce(scale=True),
    **dict.fromkeys((torch.permute, torch.transpose, torch.swapaxes, torch.swapdims), _permute),
    torch.flatten: _reshape(lambda a, n, p: False),
    torch.reshape: _reshape(lambda a, n, p: _view_literal(n, p)),
    **dict.fromkeys((torch.squeeze, torch.unsqueeze), _reshape(lambda a, n, p: False)),
    **dict.fromkeys((F.softmax, F.log_softmax, torch.softmax, torch.log_softmax), _softmax),
    **dict.fromkeys((torch.channel_shuffle, torch.native_channel_shuffle), _shuffle),
    builtins.getattr: _ignore,
    builtins.len: _ignore,
}

_ACT_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
    "clamp_min", "clamp_max", "abs", "neg",
)  # fmt: skip
_METHOD_RULES: dict[str, Rule] = {
    **dict.fromkeys(_ACT_METHODS, _channelwise(_method_act)),
    **dict.fromkeys(("contiguous", "clone", "detach"), _channelwise(_same)),
    **dict.fromkeys(("add", "add_"), _binary("add")),
    **dict.fromkeys(("sub", "sub_"), _binary("sub")),
    **dict.fromkeys(("mul", "mul_"), _binary("mul")),
    **dict.fromkeys(("div", "div_"), _binary("div")),
    "chunk": _chunk,
    **dict.fromkeys(("split", "tensor_split"), _split),
    **dict.fromkeys(("mean", "amax", "amin"), _reduce(scale=False)),
    "sum": _reduce(scale=True),
    **dict.fromkeys(("permute", "transpose", "transpose_", "swapaxes", "swapdims"), _permute),
    **dict.fromkeys(("view", "reshape"), _reshape(lambda a, n, p: _view_literal(n, p))),
    **dict.fromkeys(("flatten", "squeeze", "unsqueeze"), _reshape(lambda a, n, p: False)),
    "unflatten": _reshape(_unflatten_literal),
    **dict.fromkeys(("softmax", "log_softmax"), _softmax),
    **dict.fromkeys(("size", "dim", "numel", "ndimension", "nelement"), _ignore),
}
