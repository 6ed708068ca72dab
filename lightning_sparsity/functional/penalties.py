"""Sparsity penalties R(W) of one weight tensor, and their fused multi-tensor gradients.

Every single-tensor function returns a differentiable scalar with a finite value and a finite
gradient at exact zeros (an all-zero group contributes 0 and gets gradient 0). The callbacks do not
call autograd: :func:`penalty_and_grads` evaluates the closed-form gradients of all layers at once
with ``torch._foreach_*`` ops (one reduction per layer for the group norms, fused elementwise ops
for the rest); the tests check it against autograd on the single-tensor functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_sparsity.functional.groups import (
    check_granularity,
    check_weight,
    group_norms,
    group_size,
    reduce_dims,
)

PenaltyFn = Callable[..., Tensor]


def l1(weight: Tensor, granularity: str = "weight") -> Tensor:
    """``sum |w|``. Equal to the sum of the groups' L1 norms at every granularity; ``granularity``
    exists so that all penalties share one signature (and is validated).

    Example::

        >>> l1(torch.tensor([[3.0, -4.0], [0.0, 1.0]])).item()
        8.0
    """
    check_weight(weight, check_granularity(granularity, owner="l1"), owner="l1")
    return weight.abs().sum()


def group_lasso(weight: Tensor, granularity: str = "filter", scale_by_size: bool = False) -> Tensor:
    """Group lasso ``c * sum_g ||w_g||_2``, ``c = sqrt(group size)`` if ``scale_by_size`` else 1.

    Example::

        >>> w = torch.zeros(2, 3)
        >>> w[0, 0], w[1, 1] = 3.0, 4.0
        >>> group_lasso(w).item(), round(group_lasso(w, scale_by_size=True).item() / 3**0.5, 5)
        (7.0, 7.0)
    """
    total = group_norms(weight, granularity).sum()
    return total * math.sqrt(group_size(weight, granularity)) if scale_by_size else total


def l1_l2(weight: Tensor, granularity: str = "filter") -> Tensor:
    """``||n||_1 / ||n||_2`` over the group L2 norms ``n`` (Berthelier et al.); 0 for an all-zero
    weight (with gradient 0). With ``"weight"`` it is the plain ``||w||_1 / ||w||_2``.

    Scale invariant; between 1 (one live group) and sqrt(number of groups).

    Example::

        >>> w = torch.zeros(2, 3)
        >>> w[0, 0], w[1, 1] = 3.0, 4.0
        >>> round(l1_l2(w).item(), 6)
        1.4
    """
    n = group_norms(weight, granularity)
    s2 = torch.linalg.vector_norm(n)
    positive = s2 != 0  # not `> 0`: a NaN must reach the value, not turn it into 0
    return torch.where(positive, n.sum() / torch.where(positive, s2, 1.0), 0.0)


def capped_l1(weight: Tensor, cap: float, granularity: str = "filter") -> Tensor:
    """Capped L1 ``sum_g min(||w_g||_1, cap)`` (Kumar et al.): groups whose L1 norm exceeds ``cap``
    are not penalised; smaller ones are pushed to zero.

    Raises:
        ValueError: ``cap`` negative or not finite.

    Example::

        >>> w = torch.tensor([[0.5, -0.5], [3.0, 4.0]])  # row L1 norms 1 and 7
        >>> capped_l1(w, cap=2.0).item()
        3.0
    """
    check_cap(cap, owner="capped_l1")
    return group_norms(weight, granularity, p=1).clamp(max=cap).sum()


def bn_scale_l1(bn_weight: Tensor) -> Tensor:
    """L1 of BatchNorm scales ``sum |gamma|`` (network slimming, Liu et al. 2017).

    Raises:
        ValueError: ``bn_weight`` is not 1-D.
    """
    if not isinstance(bn_weight, Tensor) or bn_weight.dim() != 1:
        shape = list(bn_weight.shape) if isinstance(bn_weight, Tensor) else type(bn_weight).__name__
        raise ValueError(
            f"`bn_scale_l1(bn_weight=<{shape}>)`: expected the 1-D scale (`weight`) of a "
            "BatchNorm layer."
        )
    return bn_weight.abs().sum()


#: Penalty name -> single-tensor function (weight first; ``granularity``, ``cap``,
#: ``scale_by_size`` as keywords where they apply).
PENALTIES: dict[str, PenaltyFn] = {
    "l1": l1,
    "group_lasso": group_lasso,
    "l1_l2": l1_l2,
    "capped_l1": capped_l1,
    "bn_scale_l1": bn_scale_l1,
}


def check_cap(cap: object, *, owner: str) -> float:
    """Validate a capped-L1 ``cap`` (a finite float >= 0)."""
    if isinstance(cap, bool) or not isinstance(cap, int | float):
        raise TypeError(f"`{owner}(cap={cap!r})`: expected `cap` to be a float >= 0.")
    if not math.isfinite(cap) or cap < 0:
        raise ValueError(f"`{owner}(cap={cap!r})`: expected `cap` finite and >= 0, got {cap}.")
    return float(cap)


def _norms(weights: Sequence[Tensor], granularities: Sequence[str], p: float) -> list[Tensor]:
    """Group norms of every weight in broadcastable (keepdim) shape: one reduction per layer."""
    out = []
    for w, g in zip(weights, granularities):
        dims = reduce_dims(w, g)
        out.append(torch.linalg.vector_norm(w, p, dim=dims, keepdim=True) if dims else w.abs())
    return out


def penalty_and_grads(
    name: str,
    weights: Sequence[Tensor],
    granularity: str | Sequence[str] = "filter",
    *,
    cap: float | None = None,
    scale_by_size: bool = False,
    out: Sequence[Tensor] | None = None,
    alpha: float = 1.0,
    scratch: Sequence[Tensor] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Values and closed-form gradients of the penalty ``name`` for several weights at once.

    The gradients are ``coefficient_per_group * w`` (``sign(w) * ...`` for the L1 penalties): with
    ``out`` they are accumulated into existing tensors in place (``out[i] += alpha * grad_i``, one
    fused ``torch._foreach_addcmul_``, no weight-sized temporary for "group_lasso" and "l1_l2"),
    which is what the callbacks do with the parameters' ``.grad``.

    Args:
        name: a key of :data:`PENALTIES`.
        weights: the (detached) weights, one per layer, all of one dtype and device.
        granularity: one granularity for all, or one per weight (ignored by "l1", "bn_scale_l1").
        cap: the cap of "capped_l1".
        scale_by_size: the sqrt(group size) weighting of "group_lasso".
        out: tensors shaped like ``weights`` to accumulate ``alpha * grad`` into; ``None`` to
            return new gradient tensors.
        alpha: the factor of the accumulated gradients (with ``out`` only).
        scratch: tensors shaped like ``weights`` that "l1", "bn_scale_l1" and "capped_l1" may
            overwrite (their ``sign(w)``), so that no temporary is allocated per call.

    Returns:
        ``(values, grads)``: a ``[len(weights)]`` tensor of per-layer values (not multiplied by
        ``alpha``) and the gradients (``out`` itself when given). The gradient of an all-zero
        group is 0. Subgradient choices: ``sign(0) = 0`` for "l1"; for "capped_l1" a group with
        ``||w_g||_1 <= cap`` gets ``sign(w_g)`` (as ``torch.clamp``'s autograd). Finite for any
        weights with ``||w||_2 >= 1e-18`` or exactly zero.

    Example::

        >>> w = torch.zeros(2, 3)
        >>> w[0, 0], w[1, 1] = 3.0, 4.0
        >>> values, grads = penalty_and_grads("group_lasso", [w, 2 * w])
        >>> values.tolist(), grads[0][1].tolist()
        ([7.0, 14.0], [0.0, 1.0, 0.0])
    """
    weights = list(weights)
    if out is None:
        grads = [torch.zeros_like(w) for w in weights]
        alpha = 1.0
    else:
        grads = list(out)
    if not weights:
        return torch.zeros(0), grads
    grans = [granularity] * len(weights) if isinstance(granularity, str) else list(granularity)

    def signs() -> list[Tensor]:
        if scratch is None:
            return list(torch._foreach_sign(weights))
        return [torch.sign(w, out=b) for w, b in zip(weights, scratch)]  # 1 pass, not copy + sign_

    if name in ("l1", "bn_scale_l1"):
        values = torch.stack(torch._foreach_norm(weights, 1))
        torch._foreach_add_(grads, signs(), alpha=alpha)
        return values, grads
    if name == "capped_l1":
        cap = check_cap(cap, owner="penalty_and_grads")
        norms = _norms(weights, grans, 1)
        values = torch.stack(torch._foreach_norm(torch._foreach_clamp_max(norms, cap), 1))
        masks = [(n <= cap).to(n.dtype).expand_as(w) for n, w in zip(norms, weights)]
        torch._foreach_addcmul_(grads, signs(), masks, value=alpha)
        return values, grads
    if name not in ("group_lasso", "l1_l2"):
        raise ValueError(
            f"`penalty_and_grads(name={name!r})`: expected one of {sorted(PENALTIES)}, "
            f"got {name!r}."
        )
    norms = _norms(weights, grans, 2)
    # 1 / ||w_g||, and 0 for an all-zero group (whose gradient is then 0, never NaN)
    inv = [torch.where(n > 0, n.reciprocal(), 0.0) for n in norms]
    s1 = torch.stack(torch._foreach_norm(norms, 1))
    if name == "group_lasso":
        values = s1
        if scale_by_size:
            scales = [math.sqrt(group_size(w, g)) for w, g in zip(weights, grans)]
            torch._foreach_mul_(inv, scales)
            values = s1 * torch.tensor(scales, dtype=s1.dtype, device=s1.device)
        coefs = inv
    else:
        # l1_l2: R = s1 / s2 with s2 = ||n||_2 = ||w||_F;  dR/dw_g = (1/(n_g s2) - R/s2^2) w_g
        s2 = torch.stack(torch._foreach_norm(weights, 2))
        positive = s2 != 0  # not `> 0`: a NaN weight must give a NaN value, not 0
        s2safe = torch.where(positive, s2, 1.0)
        values = torch.where(positive, s1 / s2safe, 0.0)
        first, second = (1.0 / s2safe).unbind(), (values / s2safe.square()).unbind()
        coefs = [
            torch.where(n > 0, i * a - b, 0.0) for n, i, a, b in zip(norms, inv, first, second)
        ]
    torch._foreach_addcmul_(
        grads, weights, [c.expand_as(w) for c, w in zip(coefs, weights)], value=alpha
    )
    return values, grads
