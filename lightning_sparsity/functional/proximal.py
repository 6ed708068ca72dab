"""Proximal maps of the L1 / L0 penalties, element-wise and on groups.

One convention for the threshold ``t``: a float, or a tensor broadcastable to the input holding a
threshold *per coordinate*. For the proximal map of ``lambda * R`` in the metric of a (diagonal)
step size ``eta`` (``argmin_w sum_i (w_i - z_i)^2 / (2 eta_i) + lambda R(w)``, what a proximal
gradient step after an optimizer step with per-coordinate step ``eta`` needs), pass

- ``lambda * sum |w|``: [`soft_threshold`][lightning_sparsity.functional.proximal.soft_threshold]
with ``t = eta * lambda``;
- ``lambda * #{w != 0}``: [`hard_threshold`][lightning_sparsity.functional.proximal.hard_threshold]
with ``t = sqrt(2 * eta * lambda)``;
- ``lambda * sum_g ||w_g||_2``:
[`group_soft_threshold`][lightning_sparsity.functional.proximal.group_soft_threshold] with ``t = eta
* lambda``;
- ``lambda * #{g: w_g != 0}``:
[`group_hard_threshold`][lightning_sparsity.functional.proximal.group_hard_threshold] with ``t =
sqrt(2 * eta * lambda)``.

With a constant ``t`` the group maps are the textbook ones: group soft
``z_g * max(0, 1 - t / ||z_g||)``, group hard ``z_g * 1[||z_g|| > t]``. With per-coordinate ``t``
they are the exact maps in that metric: group hard keeps ``z_g`` iff
``sum_i z_i^2 / (2 eta_i) > lambda``, i.e. ``||z_g / t_g||_2 > 1``; group soft zeroes ``z_g`` iff
``||z_g / t_g||_2 <= 1`` and otherwise returns ``w_i = z_i * r / (r + t_i)``, where ``r = ||w_g||``
is the root of ``sum_i z_i^2 / (r + t_i)^2 = 1`` (found by a fixed number of vectorised Newton
steps on a nearly linear reformulation, see
[`group_soft_threshold`][lightning_sparsity.functional.proximal.group_soft_threshold]). A coordinate
with
``t_i = 0`` is never shrunk.
Thresholds are not validated (a tensor check would synchronise the device): they must be >= 0.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_sparsity.functional.groups import check_granularity, check_weight, reduce_dims

#: The penalties of ``proximal_step_``: ``lambda * #{g: w_g != 0}`` or ``lambda sum_g ||w_g||``.
ProximalPenalty = Literal["l0", "l1"]
#: Their names.
PROXIMAL_PENALTIES: tuple[str, ...] = ("l0", "l1")

#: Newton steps of the per-coordinate group soft threshold (float32 precision is reached in fewer
#: even for thresholds spanning many orders of magnitude; the tests check against bisection).
NEWTON_STEPS = 8


def soft_threshold(x: Tensor, t: float | Tensor) -> Tensor:
    """``sign(x) * max(|x| - t, 0)``: the proximal map of ``t * |x|`` (per coordinate).

    Example::

        >>> soft_threshold(torch.tensor([-3.0, 0.5, 2.0]), 1.0).tolist()
        [-2.0, 0.0, 1.0]
    """
    return x.sign() * (x.abs() - t).clamp_min(0)


def hard_threshold(x: Tensor, t: float | Tensor) -> Tensor:
    """``x * 1[|x| > t]``: keeps the entries strictly above the threshold, zeroes the rest.

    Example::

        >>> hard_threshold(torch.tensor([-3.0, 0.5, 1.0]), 1.0).tolist()
        [-3.0, 0.0, 0.0]
    """
    return torch.where(x.abs() > t, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _scaled_norms(z: Tensor, t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``||z_g / t_g||_2`` per group (keepdim).

    A coordinate with ``t_i = 0`` and ``z_i != 0`` gives ``inf``.
    """
    tiny = torch.finfo(z.dtype).tiny
    scaled = z / t.clamp_min(tiny)
    return torch.linalg.vector_norm(scaled, dim=dims, keepdim=True)


def group_hard_threshold(weight: Tensor, t: float | Tensor, granularity: str = "filter") -> Tensor:
    """Zero every group with ``||z_g / t_g||_2 <= 1`` (for a float ``t``: ``||z_g||_2 <= t``).

    Args:
        weight: a Conv/Linear weight (see `lightning_sparsity.functional.groups`).
        t: a float, or per-coordinate thresholds broadcastable to ``weight``
            (``sqrt(2 * eta * lambda)`` for the L0 group penalty ``lambda * #{g: w_g != 0}``).
        granularity: the groups.

    Example::

        >>> w = torch.tensor([[0.01, 0.0], [3.0, 4.0]])  # row norms 0.01 and 5
        >>> group_hard_threshold(w, 0.1).tolist()
        [[0.0, 0.0], [3.0, 4.0]]
    """
    check_weight(weight, check_granularity(granularity, owner="group_hard_threshold"))
    dims = reduce_dims(weight, granularity)
    if not dims:
        return hard_threshold(weight, t)
    if isinstance(t, Tensor) and t.numel() > 1:
        keep = _scaled_norms(weight, t.to(weight.dtype), dims) > 1
    else:
        keep = torch.linalg.vector_norm(weight, dim=dims, keepdim=True) > t
    return weight * keep


def group_soft_threshold(weight: Tensor, t: float | Tensor, granularity: str = "filter") -> Tensor:
    """Proximal map of the group lasso: shrink every group's norm, zero the small groups.

    For a float ``t``: ``z_g * max(0, 1 - t / ||z_g||_2)``. For per-coordinate ``t`` the exact map
    in the metric ``diag(t)`` (see the module docstring).

    Args:
        weight: a Conv/Linear weight.
        t: a float, or per-coordinate thresholds broadcastable to ``weight`` (``eta * lambda`` for
            the penalty ``lambda * sum_g ||w_g||_2`` after a step with per-coordinate step ``eta``).
        granularity: the groups.

    Example::

        >>> w = torch.tensor([[0.01, 0.0], [3.0, 4.0]])
        >>> group_soft_threshold(w, 1.0).tolist()  # row 1: norm 5 -> 4
        [[0.0, 0.0], [2.4000000953674316, 3.200000047683716]]
    """
    check_weight(weight, check_granularity(granularity, owner="group_soft_threshold"))
    dims = reduce_dims(weight, granularity)
    if not dims:
        return soft_threshold(weight, t)
    tiny = torch.finfo(weight.dtype).tiny
    norms = torch.linalg.vector_norm(weight, dim=dims, keepdim=True)
    if not (isinstance(t, Tensor) and t.numel() > 1):
        return weight * (1 - t / norms.clamp_min(tiny)).clamp_min(0)
    t = t.to(weight.dtype).expand_as(weight)
    keep = _scaled_norms(weight, t, dims) > 1
    # r solves psi(r) = (sum_i z_i^2 / (r + t_i)^2)^(-1/2) = 1; psi is nearly linear in r (exactly
    # (r + t) / ||z|| for a constant t), so Newton on psi converges in a few steps from a start
    # r0 <= root. At the root every term is <= 1, so r >= |z_i| - t_i for all i; also
    # r >= ||z|| - max t. r0 is the larger bound, where every term z_i^2 / (r + t_i)^2 <= 1.
    t_max = t.amax(dim=dims, keepdim=True)
    r = torch.maximum(norms - t_max, (weight.abs() - t).amax(dim=dims, keepdim=True)).clamp_min(0)
    for _ in range(NEWTON_STEPS):
        inv = 1 / (r + t).clamp_min(tiny)
        q = (weight * inv).square()  # z_i^2 / (r + t_i)^2, 0 (not NaN) where z_i = 0
        s = q.sum(dim=dims, keepdim=True)
        s1 = (q * inv).sum(dim=dims, keepdim=True)
        step = s * (s.sqrt() - 1) / s1.clamp_min(tiny)
        r = torch.where(keep, (r + step).clamp_min(0), r)
    shrunk = weight * r / (r + t).clamp_min(tiny)
    return torch.where(keep, shrunk, torch.zeros((), dtype=weight.dtype, device=weight.device))


def proximal_step_(
    weight: Tensor,
    strength: float,
    lr: float,
    *,
    penalty: ProximalPenalty = "l0",
    granularity: str = "filter",
    denominator: Tensor | None = None,
    scratch: Tensor | None = None,
    mask: Tensor | None = None,
    count: bool = True,
) -> Tensor | None:
    """In place, the proximal map of ``strength * R`` after a step.

    The step has the per-coordinate step size ``eta = lr / denominator`` (``lr`` when
    ``denominator`` is ``None``).

    ``"l0"``: keep group ``g`` iff ``sum_i z_i^2 / (2 eta_i) > strength``, evaluated as
    ``sum_i z_i^2 d_i > 2 lr strength``
    ([`group_hard_threshold`][lightning_sparsity.functional.proximal.group_hard_threshold] in fewer
    passes; element-wise
    for ``"weight"``). ``"l1"``:
    [`group_soft_threshold`][lightning_sparsity.functional.proximal.group_soft_threshold] with ``t =
    eta * strength`` (exact in
    the metric). ``denominator`` is overwritten (it becomes the score or ``eta``); ``scratch`` (a
    float tensor like ``weight``) holds the score when there is no denominator, ``mask`` (a bool
    tensor like ``weight``) the element-wise mask, so that nothing is allocated.

    Returns:
        With ``count``, the number of non-zero groups after the map (a 0-d tensor, not
        synchronised), else ``None`` (one pass less for ``"l1"``).

    Example::

        >>> w = torch.tensor([[0.1, 0.0], [3.0, 4.0]])
        >>> proximal_step_(w, strength=1.0, lr=0.1)  # keep iff ||w_g||^2 > 2 * 0.1 * 1
        tensor(1)
        >>> w.tolist()
        [[0.0, 0.0], [3.0, 4.0]]
    """
    dims = reduce_dims(weight, granularity)
    if penalty == "l0":
        d = denominator
        score = torch.square(weight) if d is None else d.mul_(weight).mul_(weight)
        limit = 2 * lr * strength
        if dims:
            keep = score.sum(dims, keepdim=True) > limit
        else:
            keep = (
                torch.gt(score, limit) if scratch is None else torch.gt(score, limit, out=scratch)
            )
        weight.mul_(keep)
        return keep.sum() if count else None
    eta: float | Tensor = lr if denominator is None else denominator.reciprocal_().mul_(lr)
    weight.copy_(group_soft_threshold(weight, eta * strength, granularity))
    if not count:
        return None
    norms = torch.linalg.vector_norm(weight, dim=dims) if dims else weight.abs()
    return (norms > 0).sum()
