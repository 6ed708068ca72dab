"""Sparsity penalties R(W): single-tensor functions and one small object per penalty.

Every single-tensor function returns a differentiable scalar with a finite value and a finite
gradient at exact zeros (an all-zero group contributes 0 and gets gradient 0).

Each penalty is also a [`Penalty`][lightning_sparsity.functional.penalties.Penalty] object with one
interface: [`Penalty.value`][lightning_sparsity.functional.penalties.Penalty.value] (the
differentiable scalar of one weight) and
[`Penalty.add_grads_`][lightning_sparsity.functional.penalties.Penalty.add_grads_] (the closed-form
gradients of
several layers at once, accumulated in place into existing tensors with ``torch._foreach_*`` ops:
one reduction per layer for the group norms, fused elementwise ops for the rest). The callbacks use
the objects and never call autograd for the built-in penalties; the tests check the closed forms
against autograd on the single-tensor functions.
[`make_penalty`][lightning_sparsity.functional.penalties.make_penalty] builds one by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor
from typing_extensions import override

from lightning_sparsity.functional.groups import (
    check_granularity,
    check_weight,
    group_norms,
    group_size,
    reduce_dims,
)
from lightning_sparsity.validation import check_choice, check_float, fail

PenaltyFn = Callable[..., Tensor]
#: The built-in penalties, by name.
PenaltyName = Literal["l1", "group_lasso", "l1_l2", "capped_l1", "bn_scale_l1"]


def l1(weight: Tensor, granularity: str = "weight") -> Tensor:
    """``sum |w|``, equal to the sum of the groups' L1 norms at every granularity.

    ``granularity`` exists so that all penalties share one signature (and is validated).

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
    """``||n||_1 / ||n||_2`` over the group L2 norms ``n`` (Berthelier et al.).

    0 for an all-zero weight (with gradient 0). With ``"weight"`` it is the plain ``||w||_1 /
    ||w||_2``.

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
    """Capped L1 ``sum_g min(||w_g||_1, cap)`` (Kumar et al.).

    Groups whose L1 norm exceeds ``cap`` are not penalised; smaller ones are pushed to zero.

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
    return check_float(cap, owner=owner, arg="cap", low=0.0)


def _norms(weights: Sequence[Tensor], granularities: Sequence[str], p: float) -> list[Tensor]:
    """Group norms of every weight in broadcastable (keepdim) shape: one reduction per layer."""
    out = []
    for w, g in zip(weights, granularities):
        dims = reduce_dims(w, g)
        out.append(torch.linalg.vector_norm(w, p, dim=dims, keepdim=True) if dims else w.abs())
    return out


def _signs(weights: list[Tensor], scratch: Sequence[Tensor] | None) -> list[Tensor]:
    """``sign(w)`` of every weight, written into ``scratch`` when given (no allocation)."""
    if scratch is None:
        return list(torch._foreach_sign(weights))
    return [torch.sign(w, out=b) for w, b in zip(weights, scratch)]  # 1 pass, not copy + sign_


class Penalty:
    """A sparsity penalty ``R`` with its value and its closed-form, fused gradient.

    Subclasses set `name` and implement
    [`value`][lightning_sparsity.functional.penalties.Penalty.value] (one weight, differentiable)
    and
    [`add_grads_`][lightning_sparsity.functional.penalties.Penalty.add_grads_] (several weights, in
    place).
    """

    #: the name the callbacks accept (``SparsityRegularizer(penalty=name)``)
    name: ClassVar[str] = ""
    #: whether ``add_grads_`` may overwrite ``scratch`` tensors (the L1 family: ``sign(w)``)
    uses_scratch: ClassVar[bool] = False

    def value(self, weight: Tensor, granularity: str = "filter") -> Tensor:
        """``R(weight)``: a differentiable scalar."""
        raise NotImplementedError

    def add_grads_(
        self,
        weights: Sequence[Tensor],
        granularities: Sequence[str],
        grads: Sequence[Tensor],
        alpha: float = 1.0,
        scratch: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """``grads[i] += alpha * dR/dw_i`` in place; returns the ``[len(weights)]`` values of R.

        Args:
            weights: the (detached) weights, one per layer, all of one dtype and device.
            granularities: the groups of each weight.
            grads: tensors shaped like ``weights`` (e.g. the parameters' ``.grad``).
            alpha: the factor of the accumulated gradients (the values are not multiplied).
            scratch: tensors shaped like ``weights`` that may be overwritten (see
                `uses_scratch`), so that no temporary is allocated per call.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class L1(Penalty):
    """``sum |w|``; subgradient ``sign(w)`` with ``sign(0) = 0``."""

    name = "l1"
    uses_scratch = True

    def value(self, weight: Tensor, granularity: str = "weight") -> Tensor:
        """``sum |w|`` (equal at every granularity)."""
        return l1(weight, granularity)

    @override
    def add_grads_(
        self,
        weights: Sequence[Tensor],
        granularities: Sequence[str],
        grads: Sequence[Tensor],
        alpha: float = 1.0,
        scratch: Sequence[Tensor] | None = None,
    ) -> Tensor:
        weights = list(weights)
        values = torch.stack(torch._foreach_norm(weights, 1))
        torch._foreach_add_(list(grads), _signs(weights, scratch), alpha=alpha)
        return values


class BNScaleL1(L1):
    """L1 of the BatchNorm scales after the selected layers (network slimming)."""

    name = "bn_scale_l1"

    def value(self, weight: Tensor, granularity: str = "weight") -> Tensor:
        """``sum |gamma|`` of a 1-D BatchNorm scale."""
        return bn_scale_l1(weight)


class CappedL1(Penalty):
    """``sum_g min(||w_g||_1, cap)`` (Kumar et al.).

    A group at or below the cap gets gradient ``sign(w_g)``, a group above it 0 (as
    ``torch.clamp``'s autograd).
    """

    name = "capped_l1"
    uses_scratch = True

    def __init__(self, cap: float) -> None:
        self.cap = check_cap(cap, owner="CappedL1")

    def value(self, weight: Tensor, granularity: str = "filter") -> Tensor:
        """``sum_g min(||w_g||_1, cap)``."""
        return capped_l1(weight, self.cap, granularity)

    @override
    def add_grads_(
        self,
        weights: Sequence[Tensor],
        granularities: Sequence[str],
        grads: Sequence[Tensor],
        alpha: float = 1.0,
        scratch: Sequence[Tensor] | None = None,
    ) -> Tensor:
        weights = list(weights)
        norms = _norms(weights, granularities, 1)
        values = torch.stack(torch._foreach_norm(torch._foreach_clamp_max(norms, self.cap), 1))
        masks = [(n <= self.cap).to(n.dtype).expand_as(w) for n, w in zip(norms, weights)]
        torch._foreach_addcmul_(list(grads), _signs(weights, scratch), masks, value=alpha)
        return values

    def __repr__(self) -> str:
        return f"CappedL1(cap={self.cap!r})"


def _add_scaled_(
    grads: Sequence[Tensor], weights: list[Tensor], coefs: list[Tensor], alpha: float
) -> None:
    """``grads[i] += alpha * coef_i * w_i`` with per-group ``coef_i`` (one fused op)."""
    expanded = [c.expand_as(w) for c, w in zip(coefs, weights)]
    torch._foreach_addcmul_(list(grads), weights, expanded, value=alpha)


class GroupLasso(Penalty):
    """``c * sum_g ||w_g||_2`` with ``c = sqrt(group size)`` if ``scale_by_size`` else 1."""

    name = "group_lasso"

    def __init__(self, scale_by_size: bool = False) -> None:
        self.scale_by_size = scale_by_size

    def value(self, weight: Tensor, granularity: str = "filter") -> Tensor:
        """``c * sum_g ||w_g||_2``."""
        return group_lasso(weight, granularity, self.scale_by_size)

    @override
    def add_grads_(
        self,
        weights: Sequence[Tensor],
        granularities: Sequence[str],
        grads: Sequence[Tensor],
        alpha: float = 1.0,
        scratch: Sequence[Tensor] | None = None,
    ) -> Tensor:
        weights = list(weights)
        norms = _norms(weights, granularities, 2)
        inv = [torch.where(n > 0, n.reciprocal(), 0.0) for n in norms]
        values = torch.stack(torch._foreach_norm(norms, 1))
        if self.scale_by_size:
            scales = [math.sqrt(group_size(w, g)) for w, g in zip(weights, granularities)]
            torch._foreach_mul_(inv, scales)
            values = values * torch.tensor(scales, dtype=values.dtype, device=values.device)
        _add_scaled_(grads, weights, inv, alpha)
        return values

    def __repr__(self) -> str:
        return f"GroupLasso(scale_by_size={self.scale_by_size!r})"


class L1L2(Penalty):
    """``||n||_1 / ||n||_2`` over the group norms ``n`` (Berthelier et al.)."""

    name = "l1_l2"

    def value(self, weight: Tensor, granularity: str = "filter") -> Tensor:
        """``||n||_1 / ||n||_2``, 0 for an all-zero weight."""
        return l1_l2(weight, granularity)

    @override
    def add_grads_(
        self,
        weights: Sequence[Tensor],
        granularities: Sequence[str],
        grads: Sequence[Tensor],
        alpha: float = 1.0,
        scratch: Sequence[Tensor] | None = None,
    ) -> Tensor:
        # R = s1 / s2, s1 = ||n||_1, s2 = ||n||_2 = ||w||_F; dR/dw_g = (1/(n_g s2) - R/s2^2) w_g
        weights = list(weights)
        norms = _norms(weights, granularities, 2)
        s1 = torch.stack(torch._foreach_norm(norms, 1))
        s2 = torch.stack(torch._foreach_norm(weights, 2))
        positive = s2 != 0  # not `> 0`: a NaN weight must give a NaN value, not 0
        s2safe = torch.where(positive, s2, 1.0)
        values = torch.where(positive, s1 / s2safe, 0.0)
        first, second = (1.0 / s2safe).unbind(), (values / s2safe.square()).unbind()
        inv = [torch.where(n > 0, n.reciprocal(), 0.0) for n in norms]
        coefs = [
            torch.where(n > 0, i * a - b, 0.0) for n, i, a, b in zip(norms, inv, first, second)
        ]
        _add_scaled_(grads, weights, coefs, alpha)
        return values


class FunctionPenalty(Penalty):
    """A user's callable ``weight -> scalar``; gradients by autograd, layer by layer."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn

    @property
    def name(self) -> str:  # type: ignore[override]
        """The callable's ``__name__``."""
        return getattr(self.fn, "__name__", type(self.fn).__name__)

    def value(self, weight: Tensor, granularity: str = "filter") -> Tensor:
        """``fn(weight)``."""
        return self.fn(weight)

    @override
    def add_grads_(
        self,
        weights: Sequence[Tensor],
        granularities: Sequence[str],
        grads: Sequence[Tensor],
        alpha: float = 1.0,
        scratch: Sequence[Tensor] | None = None,
    ) -> Tensor:
        values = []
        for w, g in zip(weights, grads):
            with torch.enable_grad():
                leaf = w.detach().requires_grad_(True)
                value = self.fn(leaf)
                if not isinstance(value, Tensor) or value.numel() != 1:
                    fail(
                        "SparsityRegularizer",
                        "penalty",
                        self.fn,
                        "the callable to return a scalar tensor",
                        got=type(value).__name__,
                        error=TypeError,
                    )
                (grad,) = torch.autograd.grad(value.reshape(()), leaf, allow_unused=True)
            if grad is not None:
                g.add_(grad, alpha=alpha)
            values.append(value.detach().reshape(()))
        if not values:
            return torch.zeros(0)
        return torch.stack(values)

    def __repr__(self) -> str:
        return f"FunctionPenalty({self.name})"


#: Name -> penalty class, for ``make_penalty`` and ``SparsityRegularizer(penalty=name)``.
PENALTY_CLASSES: dict[str, type[Penalty]] = {
    cls.name: cls for cls in (L1, GroupLasso, L1L2, CappedL1, BNScaleL1)
}


def make_penalty(
    penalty: str | Callable[[Tensor], Tensor] | Penalty,
    *,
    cap: float | None = None,
    scale_by_size: bool = False,
    owner: str = "make_penalty",
) -> Penalty:
    """The `Penalty` for a name (with its options), a callable, or a penalty object.

    Raises:
        ValueError: an unknown name; ``"capped_l1"`` without ``cap``; ``cap`` for another penalty.
        TypeError: neither a name, a callable nor a
            [`Penalty`][lightning_sparsity.functional.penalties.Penalty].

    Example::

        >>> make_penalty("capped_l1", cap=0.5)
        CappedL1(cap=0.5)
    """
    if isinstance(penalty, Penalty):
        return penalty
    if not isinstance(penalty, str):
        if not callable(penalty):
            fail(
                owner,
                "penalty",
                penalty,
                f"a name in {sorted(PENALTY_CLASSES)} or a callable `weight -> scalar`",
                got=type(penalty).__name__,
                error=TypeError,
            )
        return FunctionPenalty(penalty)
    hint = "for L0 use `ProximalSparsity(penalty='l0')`." if penalty == "l0" else ""
    check_choice(penalty, sorted(PENALTY_CLASSES), owner=owner, arg="penalty", hint=hint)
    if penalty == "capped_l1":
        if cap is None:
            fail(
                owner,
                "cap",
                cap,
                "a `cap` >= 0 with penalty='capped_l1' (groups whose L1 norm exceeds it are not "
                "penalised)",
                hint="`cap=0.5`.",
            )
        return CappedL1(check_cap(cap, owner=owner))
    if cap is not None:
        fail(owner, "cap", cap, "`cap` only with penalty='capped_l1'", got=f"penalty={penalty!r}")
    if penalty == "group_lasso":
        return GroupLasso(scale_by_size)
    return PENALTY_CLASSES[penalty]()


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

    The functional form of
    [`Penalty.add_grads_`][lightning_sparsity.functional.penalties.Penalty.add_grads_]: with ``out``
    the gradients are accumulated
    into those tensors in place (``out[i] += alpha * grad_i``), else returned as new tensors.

    Args:
        name: a key of `PENALTY_CLASSES`.
        weights: the (detached) weights, one per layer, all of one dtype and device.
        granularity: one granularity for all, or one per weight (ignored by "l1", "bn_scale_l1").
        cap: the cap of "capped_l1".
        scale_by_size: the sqrt(group size) weighting of "group_lasso".
        out: tensors shaped like ``weights`` to accumulate ``alpha * grad`` into; ``None`` to
            return new gradient tensors.
        alpha: the factor of the accumulated gradients (with ``out`` only).
        scratch: tensors shaped like ``weights`` that "l1", "bn_scale_l1" and "capped_l1" may
            overwrite (their ``sign(w)``).

    Returns:
        ``(values, grads)``: a ``[len(weights)]`` tensor of per-layer values (not multiplied by
        ``alpha``) and the gradients (``out`` itself when given). The gradient of an all-zero
        group is 0. Subgradient choices: ``sign(0) = 0`` for "l1"; for "capped_l1" a group with
        ``||w_g||_1 <= cap`` gets ``sign(w_g)``.

    Example::

        >>> w = torch.zeros(2, 3)
        >>> w[0, 0], w[1, 1] = 3.0, 4.0
        >>> values, grads = penalty_and_grads("group_lasso", [w, 2 * w])
        >>> values.tolist(), grads[0][1].tolist()
        ([7.0, 14.0], [0.0, 1.0, 0.0])
    """
    penalty = make_penalty(name, cap=cap, scale_by_size=scale_by_size, owner="penalty_and_grads")
    weights = list(weights)
    if out is None:
        grads, alpha = [torch.zeros_like(w) for w in weights], 1.0
    else:
        grads = list(out)
    if not weights:
        return torch.zeros(0), grads
    grans = [granularity] * len(weights) if isinstance(granularity, str) else list(granularity)
    values = penalty.add_grads_(weights, grans, grads, alpha, scratch)
    return values, grads
