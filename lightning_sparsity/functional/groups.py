"""Views of a Conv/Linear weight as groups: filters, channels, kernels or single weights.

Layouts (PyTorch): a Conv1d/2d/3d weight is ``[out, in, *kernel]``, a Linear weight ``[out, in]``.

- ``"filter"``: an output channel / output neuron, ``W[o]`` (Linear: row ``o``);
- ``"channel"``: an input channel / input neuron, ``W[:, i]`` (Linear: column ``i``);
- ``"kernel"``: one kernel slice ``W[o, i]`` (``kh x kw`` numbers for Conv2d; a Linear has none:
  an error);
- ``"weight"``: one number.

Groups are numbered in row-major order of the kept axes (``kernel``: ``o * I + i``). Grouped and
depthwise convolutions keep PyTorch's layout ``[out, in / groups, *kernel]``: "channel" then means
an input channel *within* a convolution group. Transposed convolutions (``[in, out, *kernel]``) are
not supported.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

#: A granularity: what one group of a weight is.
Granularity = Literal["filter", "channel", "kernel", "weight"]
#: The valid granularities, in order from coarse to fine.
GRANULARITIES: tuple[str, ...] = ("filter", "channel", "kernel", "weight")


def check_granularity(granularity: object, *, owner: str = "group_norms") -> str:
    """Return ``granularity`` if it is one of `GRANULARITIES`, else raise.

    Raises:
        TypeError: not a string.
        ValueError: an unknown name (the valid ones are listed).
    """
    if not isinstance(granularity, str):
        raise TypeError(
            f"`{owner}(granularity={granularity!r})`: expected `granularity` to be a str, one of "
            f"{list(GRANULARITIES)}, got {type(granularity).__name__}."
        )
    if granularity not in GRANULARITIES:
        hint = ""
        if granularity.rstrip("s") in GRANULARITIES:
            hint = f" HINT: use the singular {granularity.rstrip('s')!r}."
        raise ValueError(
            f"`{owner}(granularity={granularity!r})`: expected `granularity` to be one of "
            f"{list(GRANULARITIES)}, got {granularity!r}.{hint}"
        )
    return granularity


def check_weight(weight: Tensor, granularity: str, *, owner: str = "group_norms") -> None:
    """Check that ``weight`` is a Conv/Linear weight and that ``granularity`` makes sense for it.

    Raises:
        TypeError: ``weight`` is not a tensor.
        ValueError: a tensor of fewer than 2 or more than 5 dimensions, or ``"kernel"`` for a Linear
            weight (a 2-D tensor has no kernel slices).
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"`{owner}(weight=...)`: expected a Tensor, got {type(weight).__name__}.")
    if not 2 <= weight.dim() <= 5:
        raise ValueError(
            f"`{owner}(weight=<shape {list(weight.shape)}>)`: expected a Conv1d/2d/3d weight "
            f"[out, in, *kernel] or a Linear weight [out, in], got {weight.dim()} dimensions. "
            "HINT: biases and BatchNorm scales are 1-D; use `bn_scale_l1` for BatchNorm scales."
        )
    if granularity == "kernel" and weight.dim() == 2:
        raise ValueError(
            f"`{owner}(granularity='kernel')`: a kernel group is one kh x kw slice W[o, i] of a "
            f"convolution weight; a Linear weight {list(weight.shape)} has none. HINT: use "
            "'weight' for single weights, or select only convolutions with `layers=`."
        )


def reduce_dims(weight: Tensor, granularity: str) -> tuple[int, ...]:
    """The dimensions of ``weight`` that lie *inside* one group (summed over by a group norm)."""
    nd = weight.dim()
    return {
        "filter": tuple(range(1, nd)),
        "channel": (0, *range(2, nd)),
        "kernel": tuple(range(2, nd)),
        "weight": (),
    }[granularity]


def group_shape(weight: Tensor, granularity: str) -> tuple[int, ...]:
    """Shape of a per-group tensor that broadcasts against ``weight`` (size 1 on inner dims)."""
    dims = set(reduce_dims(weight, granularity))
    return tuple(1 if d in dims else s for d, s in enumerate(weight.shape))


def group_size(weight: Tensor, granularity: str) -> int:
    """Number of weights in one group."""
    return math.prod(weight.shape[d] for d in reduce_dims(weight, granularity))


def num_groups(weight: Tensor, granularity: str) -> int:
    """Number of groups of ``weight`` at ``granularity``."""
    return weight.numel() // max(group_size(weight, granularity), 1)


def group_view(weight: Tensor, granularity: str = "filter") -> Tensor:
    """``weight`` as a ``[num_groups, group_size]`` matrix, one group per row.

    A view for "filter", "kernel" and "weight"; a copy for "channel" (the groups are strided).

    Example::

        >>> w = torch.arange(12.0).reshape(2, 3, 2)  # Conv1d: out 2, in 3, kernel 2
        >>> group_view(w, "channel").shape
        torch.Size([3, 4])
        >>> group_view(w, "channel")[1].tolist()  # W[:, 1]
        [2.0, 3.0, 8.0, 9.0]
    """
    check_weight(weight, check_granularity(granularity, owner="group_view"), owner="group_view")
    if granularity == "channel":
        return weight.transpose(0, 1).reshape(weight.shape[1], -1)
    return weight.reshape(num_groups(weight, granularity), -1)


def group_norms(
    weight: Tensor, granularity: str = "filter", p: float = 2, *, keepdim: bool = False
) -> Tensor:
    """The ``p``-norm of every group of ``weight``.

    Differentiable; the gradient of an all-zero group's norm is 0 (not NaN).

    Args:
        weight: a Conv1d/2d/3d weight ``[out, in, *kernel]`` or a Linear weight ``[out, in]``.
        granularity: one of `GRANULARITIES`.
        p: the norm's order (``1``, ``2``, ``float("inf")``...); for "weight" every norm is ``|w|``.
        keepdim: return the [`group_shape`][lightning_sparsity.functional.groups.group_shape] tensor
            (broadcasts against ``weight``) instead of a
            flat ``[num_groups]`` vector.

    Example::

        >>> w = torch.zeros(2, 1, 2, 2)
        >>> w[0] = 1.5  # 4 entries: norm 3
        >>> w[1, 0, 0, 0] = 4.0
        >>> group_norms(w).tolist()
        [3.0, 4.0]
    """
    check_weight(weight, check_granularity(granularity, owner="group_norms"), owner="group_norms")
    dims = reduce_dims(weight, granularity)
    norms = (
        weight.abs() if not dims else torch.linalg.vector_norm(weight, p, dim=dims, keepdim=True)
    )
    return norms if keepdim else norms.reshape(-1)
