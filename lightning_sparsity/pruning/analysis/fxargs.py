"""Small helpers shared by the coupling rules: fx node arguments, shapes and constants."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import Tensor

from lightning_sparsity.pruning.analysis.spaces import NAN, Space, finite

if TYPE_CHECKING:
    from lightning_sparsity.pruning.analysis.coupling import Analysis

Rule = Callable[["Analysis", fx.Node], Any]


def arg(node: fx.Node, i: int, key: str, default: Any = None) -> Any:
    """Argument ``i`` of ``node``, positional or keyword ``key`` (``default`` when absent)."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def shape_of(value: Any) -> tuple[int, ...] | None:
    """The shape of the tensor a node produces (``None`` for anything else)."""
    if not isinstance(value, fx.Node):
        return None
    shape = getattr(value.meta.get("tensor_meta"), "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def input_space(a: Analysis, node: fx.Node) -> tuple[Space | None, tuple[int, ...] | None]:
    """The space (``None`` unless a `Space`) and the shape of ``node``'s first input."""
    x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    space = a.space(x)
    return (space if isinstance(space, Space) else None), shape_of(x)


def keeps_channels(x: Space, node: fx.Node, in_shape: tuple[int, ...] | None) -> bool:
    """Whether ``node``'s output has its input's rank and ``x``'s channel dims in place."""
    out_shape = shape_of(node)
    if in_shape is None or out_shape is None or len(in_shape) != len(out_shape):
        return False
    k = x.slots.dim()
    return out_shape[x.dim : x.dim + k] == tuple(x.slots.shape)


def zero_only(value: Tensor) -> Tensor:
    """Zeros stay zeros, any other constant stops being constant."""
    return torch.where(value == 0, value, torch.full_like(value, NAN))


def apply_const(fn: Callable[[Tensor], Any], value: Tensor) -> Tensor:
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


def has_node(values: Any) -> bool:
    """Whether the (nested) argument ``values`` contains a graph node."""
    found = False

    def visit(n: fx.Node) -> fx.Node:
        nonlocal found
        found = True
        return n

    fx.node.map_arg(values, visit)
    return found


def tuple_of(x: Any) -> tuple[Any, ...]:
    """``x`` as a tuple (an int argument such as ``dim=1`` becomes ``(1,)``)."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)
