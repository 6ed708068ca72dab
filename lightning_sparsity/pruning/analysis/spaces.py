"""Channel spaces: which source channel each index of a tensor's channel dimension carries.

A [`Space`][lightning_sparsity.pruning.analysis.spaces.Space] maps the channel dimension of one
tensor in the traced graph to *slots* (ints)
and, per index, the constant the channel holds (``NaN`` when it varies with the input). Slots are
merged in a union-find: merged slots are removed together or not at all (a residual sum merges
the channels it adds, a BatchNorm merges its channels with its input's, ...).

Spaces are stored compressed: ``slots`` covers the tensor dimensions ``dim .. dim+slots.dim()-1``
and is constant along the dimensions after them (a conv output ``[N, C, H, W]`` has a 1-D space of
``C`` slots at ``dim=1``; after ``flatten`` it becomes ``C*H*W`` slots, each repeated ``H*W``
times). A 2-D space appears only inside a channel shuffle (``view`` into ``[N, g, C/g, H, W]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

NAN = float("nan")


@dataclass(frozen=True)
class Space:
    """The channel dimension of one tensor.

    Attributes:
        dim: the tensor dimension that carries the channels.
        slots: int64 slot ids, 1-D (or 2-D inside a channel shuffle).
        value: float64, same shape: the constant each channel holds, ``NaN`` if it varies.
        fixed_axis: for a 2-D space, the axis whose size is written literally in the model code
            (its size cannot change, so slots along it are merged).
    """

    dim: int
    slots: Tensor
    value: Tensor
    fixed_axis: int | None = None

    def with_value(self, value: Tensor) -> Space:
        """This space with the values ``value`` (non-finite entries become NaN)."""
        return replace(self, value=finite(value))


@dataclass(frozen=True, eq=False)
class ParamRef:
    """A per-channel parameter or buffer used directly in ``forward``.

    For example a layer scale ``x * self.gamma.view(1, -1, 1, 1)``: one dimension of ``size``
    entries, at ``pos`` in a tensor of ``rank`` dimensions, which is the parameter's own dimension
    ``axis``.

    Attributes:
        target: the parameter's qualified name (relative to the graph).
        value: its entries (float64), the constants it contributes.
    """

    target: str
    size: int
    pos: int
    rank: int
    axis: int
    value: Tensor


def param_ref(target: str, t: Tensor) -> ParamRef | None:
    """A `ParamRef` for a tensor with exactly one dimension larger than 1."""
    big = [i for i, n in enumerate(t.shape) if n > 1]
    if len(big) != 1 or not t.is_floating_point():
        return None
    i = big[0]
    return ParamRef(target, int(t.shape[i]), i, t.dim(), i, t.detach().double().flatten().cpu())


def moved(ref: ParamRef, out_shape: tuple[int, ...] | None) -> ParamRef | None:
    """``ref`` after a view that only adds or drops dimensions of size 1."""
    if out_shape is None:
        return None
    big = [i for i, n in enumerate(out_shape) if n > 1]
    if big != [i for i, n in enumerate(out_shape) if n == ref.size and n > 1] or len(big) != 1:
        return None
    return replace(ref, pos=big[0], rank=len(out_shape))


def finite(value: Tensor) -> Tensor:
    """``value`` with every non-finite entry replaced by ``NaN`` (``inf`` cannot be folded)."""
    return torch.where(torch.isfinite(value), value, torch.full_like(value, NAN))


def live(n: int) -> Tensor:
    """A value vector of ``n`` channels that all vary."""
    return torch.full((n,), NAN, dtype=torch.float64)


class UnionFind:
    """Union-find over consecutive integer slots (path halving)."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def __len__(self) -> int:
        return len(self.parent)

    def new(self, n: int) -> Tensor:
        """``n`` new slots, each a set of its own; their indices."""
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n, dtype=torch.long)

    def find(self, i: int) -> int:
        """The root of slot ``i``'s set (halving the path on the way)."""
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: Tensor, b: Tensor) -> None:
        """Merge ``a[k]`` with ``b[k]`` for every ``k`` (equal shapes)."""
        for x, y in zip(a.flatten().tolist(), b.flatten().tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def union_all(self, a: Tensor) -> None:
        """Merge every slot of ``a`` into one group."""
        flat = a.flatten()
        if flat.numel() > 1:
            self.union(flat[1:], flat[:1].expand(flat.numel() - 1))

    def roots(self) -> Tensor:
        """The root of every slot, indexed by slot."""
        return torch.tensor([self.find(i) for i in range(len(self.parent))], dtype=torch.long)


def expand_to(space: Space, tail: tuple[int, ...]) -> tuple[Tensor, Tensor] | None:
    """Slots and values broadcast to the full trailing shape ``tail`` (= shape[dim:])."""
    k = space.slots.dim()
    if tuple(space.slots.shape) != tuple(tail[:k]):
        return None
    shape = tuple(space.slots.shape) + (1,) * (len(tail) - k)
    return (
        space.slots.reshape(shape).expand(tail),
        space.value.reshape(shape).expand(tail),
    )


def _same_along(x: Tensor, j: int, nan_equal: bool) -> bool:
    flat = x.flatten(j) if j < x.dim() else x.unsqueeze(-1)
    first = flat[..., :1]
    same = flat == first
    if nan_equal:
        same |= torch.isnan(flat) & torch.isnan(first)
    return bool(same.all())


def compress(slots: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the trailing axes along which both ``slots`` and ``value`` are constant."""
    for j in range(1, slots.dim() + 1):
        if _same_along(slots, j, False) and _same_along(value, j, True):
            if j == slots.dim():
                return slots, value
            return slots.flatten(j)[..., 0], value.flatten(j)[..., 0]
    return slots, value


def merge_sizes(in_tail: tuple[int, ...], size: int) -> bool:
    """Whether ``size`` is the product of the first few sizes of ``in_tail`` (a flatten)."""
    return any(math.prod(in_tail[:r]) == size for r in range(1, len(in_tail) + 1))


def _broadcast_weights(weight: Tensor, groups: int, transposed: bool) -> Tensor:
    """The weight as ``[out, in_per_group, k]`` (a transposed conv only with ``groups=1``)."""
    if transposed:
        weight = weight.transpose(0, 1)
    return weight.reshape(weight.shape[0], weight.shape[1], -1)


def mix_value(
    weight: Tensor,
    bias: Tensor | None,
    groups: int,
    value_in: Tensor,
    *,
    uneven: bool,
    transposed: bool = False,
) -> Tensor:
    """The constant each output channel of a Conv/Linear holds, ``NaN`` where it varies.

    An output is constant when every input it reads (non-zero weights) is constant; it equals
    ``bias + sum(W) * c``. With ``uneven`` (zero padding, transposed conv) a non-zero constant
    input does not give a constant output, only zeros do.
    """
    w = _broadcast_weights(weight.detach(), groups, transposed)
    out_c, in_g = w.shape[0], w.shape[1]
    is_live = torch.isnan(value_in)
    is_const = ~is_live & (value_in != 0)
    out = (
        bias.detach().to("cpu", torch.float64)
        if bias is not None
        else torch.zeros(out_c, dtype=torch.float64)
    )
    if groups == 1 and bool(is_live.all()):  # the common case: one pass, no temporary
        out[w.flatten(1).any(1).cpu()] = NAN
        return finite(out)
    nz = (w != 0).any(2) if w.shape[2] > 1 else (w[:, :, 0] != 0)  # [out, in_g]
    dev = nz.device
    if groups == 1:
        hit_live = nz[:, is_live.to(dev)].any(1)
        hit_const = nz[:, is_const.to(dev)].any(1) if bool(is_const.any()) else hit_live & False
    else:
        group_of = torch.arange(out_c, device=dev) // (out_c // groups)
        live_g = is_live.to(dev).view(groups, in_g)[group_of]
        const_g = is_const.to(dev).view(groups, in_g)[group_of]
        hit_live = (nz & live_g).any(1)
        hit_const = (nz & const_g).any(1)
    if bool(is_const.any()):
        if uneven:
            hit_live = hit_live | hit_const
        else:
            out = out + contribution(w, groups, is_const.nonzero().flatten(), value_in)
    out[hit_live.cpu()] = NAN
    return finite(out)


def contribution(w: Tensor, groups: int, index: Tensor, value: Tensor) -> Tensor:
    """``sum_k W[o, i, k] * value[i]`` over the inputs ``index`` (``w`` as ``[out, in_g, k]``)."""
    out_c, in_g = w.shape[0], w.shape[1]
    out_g = out_c // groups
    total = torch.zeros(out_c, dtype=torch.float64)
    for i in index.tolist():
        g, local = divmod(i, in_g)
        rows = slice(g * out_g, (g + 1) * out_g)
        total[rows] += w[rows, local].detach().to("cpu", torch.float64).sum(1) * float(value[i])
    return total


def norm_value(module: torch.nn.Module, value_in: Tensor) -> Tensor:
    """The constant each channel holds after a BatchNorm/InstanceNorm in eval mode."""
    n = value_in.numel()
    as64 = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    g = as64(weight) if isinstance(weight, Tensor) else torch.ones(n, dtype=torch.float64)
    b = as64(bias) if isinstance(bias, Tensor) else torch.zeros(n, dtype=torch.float64)
    rm, rv = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    if isinstance(rm, Tensor) and isinstance(rv, Tensor):
        eps = float(getattr(module, "eps", 1e-5))
        out = (value_in - as64(rm)) / torch.sqrt(as64(rv) + eps) * g + b
    else:  # batch/instance statistics: a constant channel normalises to 0
        out = torch.where(torch.isnan(value_in), value_in, torch.zeros_like(value_in)) * g + b
    out = torch.where(g == 0, b, out)  # a zero scale emits the shift, whatever comes in
    return finite(out)
