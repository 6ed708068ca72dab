"""Coupling rules for ops that combine or rearrange channels.

The ops are ``+ - * /``, ``cat``, ``chunk``, ``split``, indexing, reductions,
``permute``/``transpose``, ``view``/``reshape``/``flatten`` and the channel shuffle. See
`rules` for the table that uses them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.fx as fx
from torch import Tensor, nn

from lightning_sparsity.pruning.analysis.fxargs import (
    Rule,
    arg,
    has_node,
    input_space,
    shape_of,
    tuple_of,
)
from lightning_sparsity.pruning.analysis.spaces import (
    NAN,
    ParamRef,
    Space,
    compress,
    expand_to,
    finite,
    merge_sizes,
)

if TYPE_CHECKING:
    from lightning_sparsity.pruning.analysis.coupling import Analysis


def binary(op: str) -> Rule:  # noqa: C901 (one case per broadcasting shape pair)
    """The rule for the element-wise ``op`` (add, sub, mul, div): it couples the operands."""

    def rule(a: Analysis, node: fx.Node) -> Any:  # noqa: C901 (one case per broadcasting shape pair)
        out_shape = shape_of(node)
        if out_shape is None or (len(node.args) < 2 and "other" not in node.kwargs):
            return a.unknown(node)
        operands = [arg(node, 0, "input"), arg(node, 1, "other")]
        rank = len(out_shape)
        full: list[tuple[Space, int]] = []
        for o in operands:
            s, sh = a.space(o), shape_of(o)
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
            s, sh = a.space(o), shape_of(o)
            if sh is None:  # a Python number, or a size computed in the graph
                number = isinstance(o, (int, float)) and not isinstance(o, bool)
                values.append(torch.tensor(float(o) if number else NAN, dtype=torch.float64))
                continue
            p = len(sh) + neg
            sizes = sh[max(p, 0) : p + k] if p >= 0 else ()
            if isinstance(s, ParamRef) and k == 1:
                if s.pos - s.rank != neg or s.size != ref.slots.numel():
                    return a.unknown(node, "a parameter used in `forward` along other dimensions")
                a.uf.union(a.param_slots(s), ref.slots)
                values.append(s.value)
                continue
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


def cat(a: Analysis, node: fx.Node) -> Any:
    """Rule for ``cat``: along the channels their slots are concatenated, else coupled."""
    tensors = arg(node, 0, "tensors")
    dim = arg(node, 1, "dim", 0)
    out_shape = shape_of(node)
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


def chunk(a: Analysis, node: fx.Node) -> Any:
    """Rule for ``chunk``: chunks of the channels stay equal and non-empty."""
    x, in_shape = input_space(a, node)
    chunks, dim = arg(node, 1, "chunks"), arg(node, 2, "dim", 0)
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


def split(a: Analysis, node: fx.Node) -> Any:
    """Rule for ``split``: the channels it splits at sizes written in the code are kept."""
    x, in_shape = input_space(a, node)
    dim = arg(node, 2, "dim", 0)
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


def getitem(a: Analysis, node: fx.Node) -> Any:  # noqa: C901 (one case per index kind)
    """Rule for indexing: a tuple's item, or a tensor index (part of the channels: kept)."""
    src, index = node.args[0], node.args[1]
    s = a.space(src)
    if isinstance(s, tuple) and isinstance(index, int):
        return s[index]
    if shape_of(src) is None:  # an item of a size or of a tuple without channels
        return None
    if s is None:
        return None
    parts = index if isinstance(index, tuple) else (index,)
    if all(p is Ellipsis or p == slice(None) for p in parts):
        return s
    if not isinstance(s, Space) or has_node(parts) or any(p is None for p in parts):
        return a.unknown(node, "it indexes the tensor")
    rank = len(shape_of(src) or ())
    if parts.count(Ellipsis) > 1:
        return a.unknown(node, "it indexes the tensor")
    if Ellipsis in parts:
        i = parts.index(Ellipsis)
        parts = parts[:i] + (slice(None),) * (rank - len(parts) + 1) + parts[i + 1 :]
    new_dim = s.dim
    for axis, p in enumerate(parts):
        if s.dim <= axis < s.dim + s.slots.dim():
            if not (isinstance(p, slice) and _full_width(p, int(s.slots.shape[axis - s.dim]))):
                why = f"{a.describe(node)} takes part of the channels (a slice written in the code)"
                a.pin(s.slots, why, error=True, node=node)
                return a.fixed(node.meta.get("tensor_meta"), f"output of {a.describe(node)}")
        elif isinstance(p, int) and not isinstance(p, bool):
            new_dim -= axis < s.dim  # an integer index drops that dimension
        elif not isinstance(p, slice):
            return a.unknown(node, "it indexes the tensor")
    return Space(new_dim, s.slots, s.value, s.fixed_axis)


def _full_width(p: slice, width: int) -> bool:
    """Whether ``p`` keeps every channel, also once fewer are left.

    ``x[:, :C]`` with ``C`` the full width still takes them all.
    """
    start, stop, step = p.start, p.stop, p.step
    return (
        step in (None, 1)
        and start in (None, 0)
        and (stop is None or (isinstance(stop, int) and stop >= width))
    )


def reduce(scale: bool) -> Rule:
    """The rule for a reduction over other dims than the channels (``scale``: a sum)."""

    def rule(a: Analysis, node: fx.Node) -> Any:
        x, in_shape = input_space(a, node)
        if x is None or in_shape is None:
            return None if in_shape is not None else a.unknown(node)
        dims, keepdim = arg(node, 1, "dim"), arg(node, 2, "keepdim", False)
        if dims is None or has_node(dims) or not isinstance(keepdim, bool):
            return a.unknown(node, "it reduces over every dimension")
        rank = len(in_shape)
        dims = [d % rank for d in tuple_of(dims)]
        if any(x.dim <= d < x.dim + x.slots.dim() for d in dims):
            return a.unknown(node, "it reduces over the channels")
        new_dim = x.dim if keepdim else x.dim - sum(d < x.dim for d in dims)
        value = x.value * math.prod(in_shape[d] for d in dims) if scale else x.value
        return Space(new_dim, x.slots, finite(value), x.fixed_axis)

    return rule


def permute(a: Analysis, node: fx.Node) -> Any:
    """Rule for ``permute``/``transpose``: the channel dimension moves with the permutation."""
    x, in_shape = input_space(a, node)
    if in_shape is None:
        return a.unknown(node)
    rank = len(in_shape)
    name = str(node.target) if node.op == "call_method" else node.target.__name__  # type: ignore[union-attr]
    if name in ("transpose", "swapaxes", "swapdims", "transpose_"):
        d0, d1 = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        if not isinstance(d0, int) or not isinstance(d1, int):
            return a.unknown(node)
        perm = list(range(rank))
        perm[d0 % rank], perm[d1 % rank] = perm[d1 % rank], perm[d0 % rank]
    else:
        dims: tuple[Any, ...] = (
            tuple(node.args[1:]) if len(node.args) > 2 else tuple_of(arg(node, 1, "dims"))
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


def view_literal(node: fx.Node, pos: int) -> bool:
    """Whether ``view``/``reshape`` writes the size of output dim ``pos`` in the code."""
    sizes = _literal_sizes(node)
    out_shape = shape_of(node) or ()
    if len(sizes) != len(out_shape):
        return True
    return _is_literal(sizes[pos])


def unflatten_literal(a: Analysis, node: fx.Node, pos: int) -> bool:
    """Whether ``unflatten`` writes the size of output dim ``pos`` in the code."""
    if node.op == "call_module":
        m = cast(nn.Unflatten, a.module(node))
        dim, sizes = m.dim, list(m.unflattened_size)
    else:
        dim, sizes = arg(node, 1, "dim"), list(tuple_of(arg(node, 2, "sizes")))
    rank = len(shape_of(node) or ())
    if not isinstance(dim, int) or rank == 0:
        return True
    dim %= rank - len(sizes) + 1
    return dim <= pos < dim + len(sizes) and _is_literal(sizes[pos - dim])


def reshape(literal: Callable[[Analysis, fx.Node, int], bool]) -> Rule:
    """The rule for a reshape; ``literal`` tells whether a size is written in the code."""

    def rule(a: Analysis, node: fx.Node) -> Any:
        x, in_shape = input_space(a, node)
        out_shape = shape_of(node)
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


def shuffle(a: Analysis, node: fx.Node) -> Any:
    """Rule for the channel shuffle: it merges the channels it interleaves."""
    x, _ = input_space(a, node)
    groups = a.module(node).groups if node.op == "call_module" else arg(node, 1, "groups")
    if x is None or x.dim != 1 or x.slots.dim() != 1 or not isinstance(groups, int):
        return a.unknown(node)
    grid = x.slots.view(groups, -1)
    for j in range(grid.shape[1]):
        a.uf.union_all(grid[:, j])
    return Space(1, grid.T.flatten(), x.value.view(groups, -1).T.flatten())


def tuple_rule(a: Analysis, node: fx.Node) -> Any:
    """Rule for building a tuple: the tuple of its arguments' spaces."""
    return tuple(a.space(arg) for arg in node.args)


def ignore(a: Analysis, node: fx.Node) -> Any:
    """Rule for an op whose result carries no channels (``getattr``, ``len``)."""
    return None
