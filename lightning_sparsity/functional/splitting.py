"""The l0 + l2,1 relaxed variable splitting of Bui et al. as in-place tensor steps.

The objective over the weights ``W`` and a sparse copy ``U`` (per layer, divided by ``divide_by``):
``lambda ||U||_0 + lambda c sum_g ||W_g||_2 + beta/2 ||W - U||^2``, ``c = sqrt(|g|)`` with
``scale_by_size``. One iteration: a gradient step on ``W``
([`splitting_grads_`][lightning_sparsity.functional.splitting.splitting_grads_] adds the
regularizer's part), then the exact minimiser over ``U``
([`sparse_copy_`][lightning_sparsity.functional.splitting.sparse_copy_]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_sparsity.functional.penalties import GroupLasso
from lightning_sparsity.validation import check_float, check_int

#: Bui et al.'s LeNet-5 / MNIST settings (with Adam, lr 1e-3, batch 100, and the regularizer
#: divided by the training-set size): the group term on conv filters and on the input neurons of
#: Linear layers, the output layer included.
PAPER_RECIPE: dict[str, Any] = {
    "strength": 0.1,
    "beta": 2.5,
    "beta_growth": 1.25,
    "growth_every_n_epochs": 40,
    "linear_granularity": "channel",
}


def check_splitting(
    *,
    beta: float,
    beta_growth: float,
    growth_every_n_epochs: int,
    divide_by: float,
    owner: str = "VariableSplitting",
) -> None:
    """Raise (one message template) unless the coupling schedule and the divisor are valid.

    Example::

        >>> check_splitting(beta=0.0, beta_growth=1.25, growth_every_n_epochs=40, divide_by=1.0)
        Traceback (most recent call last):
        ...
        ValueError: `VariableSplitting(beta=0.0)`: expected `beta` finite and > 0, got 0.0.
    """
    check_float(beta, owner=owner, arg="beta", low=0, strict_low=True)
    check_float(beta_growth, owner=owner, arg="beta_growth", low=1.0)
    check_int(
        growth_every_n_epochs,
        owner=owner,
        arg="growth_every_n_epochs",
        low=1,
        hint="`beta_growth=1.0` keeps beta constant.",
    )
    check_float(divide_by, owner=owner, arg="divide_by", low=0, strict_low=True)


def splitting_grads_(
    weights: Sequence[Tensor],
    copies: Sequence[Tensor],
    granularities: Sequence[str],
    grads: Sequence[Tensor],
    *,
    strength: float,
    beta: float,
    divide_by: float = 1.0,
    scale_by_size: bool = True,
) -> Tensor:
    """``grads += (lambda c grad sum_g ||W_g|| + beta (W - U)) / divide_by`` in place.

    Returns:
        The per-layer group terms ``c sum_g ||W_g||_2`` (not multiplied by ``lambda``).

    Example::

        >>> w, u, g = torch.tensor([[3.0, 4.0]]), torch.tensor([[3.0, 0.0]]), torch.zeros(1, 2)
        >>> splitting_grads_([w], [u], ["filter"], [g], strength=0.0, beta=2.0, scale_by_size=False)
        tensor([5.])
        >>> g.tolist()  # beta * (W - U)
        [[0.0, 8.0]]
    """
    weights, grads = list(weights), list(grads)
    scale = 1.0 / divide_by
    group = GroupLasso(scale_by_size).add_grads_(
        weights, granularities, grads, alpha=strength * scale
    )
    torch._foreach_add_(grads, weights, alpha=beta * scale)
    torch._foreach_add_(grads, list(copies), alpha=-beta * scale)
    return group


def splitting_value(
    weights: Sequence[Tensor],
    copies: Sequence[Tensor],
    group_terms: Tensor,
    *,
    strength: float,
    beta: float,
    divide_by: float = 1.0,
) -> Tensor:
    """The regularizer without the l0 term: ``sum (lambda group + beta/2 ||W - U||^2) / N``."""
    diff = torch._foreach_sub(list(weights), list(copies))
    coupling = torch.stack(torch._foreach_norm(diff, 2))
    return ((strength * group_terms + 0.5 * beta * coupling.square()) / divide_by).sum()


def splitting_threshold(strength: float, beta: float) -> float:
    """``sqrt(2 lambda / beta)``: the hard threshold that minimises over ``U``."""
    return math.sqrt(2 * strength / beta)


def sparse_copy_(
    weight: Tensor,
    copy: Tensor,
    threshold: float,
    *,
    keep_support: bool = False,
    scratch: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """``U = W * 1[|W| > threshold]`` written into ``copy`` (the exact minimiser over ``U``).

    With ``keep_support``, ``U = W * 1[U != 0]`` instead (the support frozen: a fine-tuning phase).

    ``scratch`` (like ``weight``) and ``mask`` (bool, like ``weight``) avoid allocations.

    Example::

        >>> w, u = torch.tensor([0.5, -2.0, 1.5]), torch.zeros(3)
        >>> sparse_copy_(w, u, threshold=1.0).tolist()
        [0.0, -2.0, 1.5]
        >>> sparse_copy_(torch.tensor([0.7, 0.1, 0.2]), u, 0.0, keep_support=True).tolist()
        [0.0, 0.10000000149011612, 0.20000000298023224]
    """
    if keep_support:
        keep = torch.ne(copy, 0) if mask is None else torch.ne(copy, 0, out=mask)
    else:
        magnitude = torch.abs(weight) if scratch is None else torch.abs(weight, out=scratch)
        keep = magnitude > threshold if mask is None else torch.gt(magnitude, threshold, out=mask)
    return torch.mul(weight, keep, out=copy)
