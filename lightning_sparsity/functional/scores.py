"""Per-filter scores: how much each output unit ("filter") of a layer matters.

A filter is ``W[o]``, one output channel of a conv (``[out, in, kh, kw]``) or one row of a Linear
(``[out, in]``); every score here maps a weight of shape ``[out, ...]`` to a ``[out]`` vector.
Pure tensor maths, no Lightning import.

The L1 + capped-L1 significance of Kumar et al. (Applied Intelligence 51(2), 2021): the paper's
exact combination could not be read, so this library uses, for filter ``F_j`` with entries ``w_ji``,

    s_j = ||F_j||_1 + alpha * sum_i min(|w_ji|, theta)

the L1 norm (total magnitude) plus the capped L1 norm ``C_theta(F_j)`` (each weight counts at most
``theta``, so a filter whose mass sits in a few large weights scores lower than one with many
non-negligible weights). ``theta`` defaults to the mean ``|w|`` over the layer's live filters (those
with a non-zero L1 norm), which makes the score scale-equivariant; ``alpha`` defaults to 1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from lightning_sparsity.validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_optional,
    describe,
    fail,
)

#: A filter norm: Euclidean, sum of magnitudes or mean magnitude.
FilterNorm = Literal["l2", "l1", "mean_abs"]
#: Norms accepted by [`filter_norms`][lightning_sparsity.functional.scores.filter_norms].
FILTER_NORMS: tuple[str, ...] = ("l2", "l1", "mean_abs")
#: Deprecated alias of [`FILTER_NORMS`][lightning_sparsity.functional.scores.FILTER_NORMS].
NORMS = FILTER_NORMS
#: A filter-ranking criterion by name.
CriterionName = Literal["l1", "l2", "l1_capped_l1"]
#: The named criteria of [`filter_scores`][lightning_sparsity.functional.scores.filter_scores].
CRITERIA: tuple[str, ...] = ("l1", "l2", "l1_capped_l1")
#: A criterion: a name, or a callable ``weight [out, ...] -> scores [out]``.
Criterion = CriterionName | Callable[[Tensor], Tensor]


def _check_weight(weight: Tensor, owner: str) -> Tensor:
    if not isinstance(weight, Tensor):
        raise TypeError(f"`{owner}(weight=...)`: expected a Tensor, got {type(weight).__name__}.")
    if weight.dim() < 1:
        raise ValueError(
            f"`{owner}(weight=...)`: expected a weight of shape [out, ...], got a scalar. "
            "HINT: pass a layer's `.weight`."
        )
    return weight.detach().reshape(weight.shape[0], -1)


def filter_norms(weight: Tensor, norm: FilterNorm = "l2") -> Tensor:
    """The norm of every filter ``weight[o]``: a ``[out]`` tensor, detached.

    The filter-ranking view of [`group_norms`][lightning_sparsity.functional.groups.group_norms] at
    ``"filter"`` granularity (that function, differentiable, serves the penalties): this one names
    the norm, adds ``"mean_abs"`` and takes any ``[out, ...]`` tensor.

    Args:
        weight: ``[out, ...]`` (a conv or linear weight).
        norm: ``"l2"`` (Euclidean), ``"l1"`` (sum of magnitudes) or ``"mean_abs"`` (mean magnitude,
            the "alive if mean |w| > 1e-5" measure of Bui et al.'s code).

    Raises:
        ValueError: an unknown ``norm``.

    Example::

        >>> filter_norms(torch.tensor([[3.0, -4.0], [0.0, 0.0]]))
        tensor([5., 0.])
        >>> filter_norms(torch.tensor([[3.0, -4.0], [0.0, 1.0]]), "mean_abs")
        tensor([3.5000, 0.5000])
    """
    check_choice(norm, FILTER_NORMS, owner="filter_norms", arg="norm")
    flat = _check_weight(weight, "filter_norms")
    norms = torch.linalg.vector_norm(flat, ord=2 if norm == "l2" else 1, dim=1)
    return norms / flat.shape[1] if norm == "mean_abs" else norms


def capped_l1_norms(weight: Tensor, cap: float) -> Tensor:
    """The capped L1 norm ``sum_i min(|w_i|, cap)`` of every filter: a ``[out]`` tensor.

    (Not the penalty
    [`lightning_sparsity.functional.penalties.capped_l1`][lightning_sparsity.functional.penalties.capped_l1],
    which caps each
    group's L1 norm, not each weight.)

    Raises:
        ValueError: ``cap`` not > 0.

    Example::

        >>> capped_l1_norms(torch.tensor([[1.0, 0.1, 0.0], [-0.3, 0.3, 0.3]]), cap=0.2)
        tensor([0.3000, 0.6000])
    """
    if not cap > 0:
        fail("capped_l1_norms", "cap", cap, "`cap` > 0")
    flat = _check_weight(weight, "capped_l1_norms")
    return flat.abs().clamp(max=cap).sum(dim=1)


def capped_l1(weight: Tensor, cap: float) -> Tensor:
    """Deprecated name of `capped_l1_norms` (it collided with the penalty ``capped_l1``)."""
    warnings.warn(
        "`lightning_sparsity.functional.scores.capped_l1` is deprecated: it is now "
        "`capped_l1_norms` (the penalty of the same name is a different quantity).",
        DeprecationWarning,
        stacklevel=2,
    )
    return capped_l1_norms(weight, cap)


def default_cap(weight: Tensor) -> float:
    """Mean ``|w|`` over the live filters (non-zero L1 norm); 0.0 when every filter is zero."""
    flat = _check_weight(weight, "default_cap").abs()
    live = flat[flat.sum(dim=1) > 0]
    return float(live.mean()) if live.numel() else 0.0


def l1_capped_l1_significance(
    weight: Tensor, cap: float | None = None, alpha: float = 1.0
) -> Tensor:
    """Kumar et al.'s filter significance, ``||F_j||_1 + alpha * C_cap(F_j)``: a ``[out]`` tensor.

    Args:
        weight: ``[out, ...]``.
        cap: the cap ``theta`` of the capped L1 term; ``None`` for the mean ``|w|`` over the live
            filters ([`default_cap`][lightning_sparsity.functional.scores.default_cap]).
        alpha: weight of the capped-L1 term (>= 0).

    Raises:
        ValueError: ``cap`` not > 0 or ``alpha`` < 0.

    Example::

        >>> w = torch.tensor([[1.0, 0.1, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3]])
        >>> l1_capped_l1_significance(w, cap=0.2)  # L1 1.1 / 1.2 plus capped 0.3 / 0.8
        tensor([1.4000, 2.0000])
    """
    if alpha < 0:
        raise ValueError(
            f"`l1_capped_l1_significance(alpha={alpha!r})`: expected `alpha` >= 0, got {alpha!r}."
        )
    if cap is not None and not cap > 0:
        raise ValueError(
            f"`l1_capped_l1_significance(cap={cap!r})`: expected `cap` > 0 or None, got {cap!r}."
        )
    l1 = filter_norms(weight, "l1")
    theta = default_cap(weight) if cap is None else cap
    if theta == 0.0:  # every filter is zero
        return l1
    return l1 + alpha * capped_l1_norms(weight, theta)


def kill_weakest(live: Tensor, candidates: Tensor, strength: Tensor, floor: int) -> Tensor:
    """Kill ``candidates`` weakest first, never leaving fewer than ``floor`` live filters.

    ``live`` and ``candidates`` are bool ``[out]`` masks, ``strength`` a ``[out]`` score (ties:
    the lower index is weaker). Returns the new live mask; the candidates spared by the floor are
    the strongest ones. A filter already dead stays dead: nothing is revived.

    Example::

        >>> live = torch.tensor([True, True, True, True])
        >>> kill_weakest(live, torch.tensor([True, False, False, True]),
        ...              torch.tensor([0.02, 1.0, 0.9, 0.8]), floor=3)
        tensor([False,  True,  True,  True])
    """
    new = live.clone()
    ids = (candidates & live).nonzero().flatten()
    budget = max(int(live.sum()) - floor, 0)
    order = torch.argsort(strength[ids], stable=True)
    new[ids[order[:budget]]] = False
    return new


def filter_scores(
    weight: Tensor, criterion: Criterion = "l2", *, cap: float | None = None
) -> Tensor:
    """Every filter's score under ``criterion`` (higher = stronger): a ``[out]`` float tensor.

    ``"l1"``/``"l2"``: the filter's norm (Li et al.); ``"l1_capped_l1"``: Kumar et al.'s
    [`l1_capped_l1_significance`][lightning_sparsity.functional.scores.l1_capped_l1_significance]
    with ``cap``; a callable gets the detached weight.

    Raises:
        ValueError: a callable that does not return one score per filter.

    Example::

        >>> filter_scores(torch.tensor([[3.0, -4.0], [0.0, 1.0]]), "l1")
        tensor([7., 1.])
    """
    if criterion == "l1_capped_l1":
        return l1_capped_l1_significance(weight, cap=cap)
    if isinstance(criterion, str):
        return filter_norms(weight, criterion)  # type: ignore[arg-type]
    scores = torch.as_tensor(criterion(weight.detach())).float().flatten()
    if scores.shape != (weight.shape[0],):
        fail(
            "FilterThresholding",
            "criterion",
            criterion,
            f"the criterion to return {weight.shape[0]} scores (one per filter)",
            got=f"shape {tuple(scores.shape)}",
        )
    return scores


def check_round(
    *,
    threshold: float | None,
    norm: str,
    relative: bool,
    criterion: Criterion | None,
    fraction: float | None,
    cap: float | None,
    owner: str = "threshold_round",
) -> None:
    """Raise (one message template) unless the arguments describe a valid `threshold_round`.

    Example::

        >>> check_round(threshold=None, norm="l2", relative=False, criterion="l1", fraction=None,
        ...             cap=None, owner="FilterThresholding")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `FilterThresholding(fraction=None)`: expected `criterion` and `fraction` ...
    """
    t = check_optional(check_float, threshold, owner=owner, arg="threshold", low=0.0)
    check_choice(norm, FILTER_NORMS, owner=owner, arg="norm")
    if check_bool(relative, owner=owner, arg="relative") and t is not None and t > 1:
        fail(
            owner,
            "threshold",
            t,
            "`threshold` <= 1 with `relative=True` (a fraction of the layer's largest filter norm)",
        )
    c = criterion
    if isinstance(c, str):
        check_choice(
            c,
            CRITERIA,
            owner=owner,
            arg="criterion",
            hint="or pass a callable `weight -> scores[out]`.",
        )
    elif not (c is None or callable(c)):
        fail(
            owner,
            "criterion",
            c,
            f"a name in {list(CRITERIA)}, a callable or None",
            got=type(c).__name__,
            error=TypeError,
        )
    f = check_optional(
        check_float,
        fraction,
        owner=owner,
        arg="fraction",
        low=0.0,
        high=1.0,
        strict_high=True,
    )
    if (c is None) != (f is None):
        fail(
            owner,
            "fraction",
            f,
            "`criterion` and `fraction` together",
            got=f"criterion={describe(c)!r}",
            hint="`criterion='l1', fraction=0.1` kills the 10% lowest-L1 live filters.",
        )
    if t is None and c is None:
        fail(
            owner,
            "threshold",
            None,
            "a `threshold` or a `criterion` with a `fraction`",
            got="neither",
            hint="`FilterThresholding(threshold=1e-3)`.",
        )
    check_optional(check_float, cap, owner=owner, arg="cap", low=0.0, strict_low=True)


def threshold_round(
    weight: Tensor,
    live: Tensor,
    *,
    threshold: float | None = None,
    norm: FilterNorm = "l2",
    relative: bool = False,
    criterion: Criterion | None = None,
    fraction: float | None = None,
    cap: float | None = None,
    min_filters: int = 1,
    round_to: int = 1,
) -> tuple[Tensor, int]:
    """One thresholding round on a layer: the new live mask, and how many filters it wanted alive.

    The rules apply in order, each killing its candidates weakest first and stopping at the floor
    ``min(min_filters, live filters)``
    ([`kill_weakest`][lightning_sparsity.functional.scores.kill_weakest]), so nothing is revived:

    1. with ``threshold``: filters whose ``norm`` is below it (below ``threshold *`` the largest
       norm when ``relative``), and all-zero filters at any threshold (0 included);
    2. with ``criterion`` and ``fraction``: ``floor(fraction * live)`` more of the live filters,
       the lowest [`filter_scores`][lightning_sparsity.functional.scores.filter_scores] first (ties:
       lowest index);
    3. with ``round_to > 1``: the strongest non-zero (by ``norm``) of this round's candidates
       are spared until the live count is a multiple of ``round_to`` (or every filter that was
       live), for hardware that wants widths in multiples of N. All-zero filters are never spared
       (the export drops them anyway), so with too few non-zero candidates the count stays below
       the next multiple.

    Returns:
        ``(mask, wanted)``: the bool ``[out]`` live mask (CPU) and the live count the rules asked
        for before the floor (``wanted < min_filters``: the floor spared some candidates).

    Example::

        >>> w = torch.tensor([[1e-4, 0.0], [2.0, 0.0], [0.5, 0.0], [0.0, 0.0]])
        >>> live = torch.tensor([True, True, True, False])
        >>> threshold_round(w, live, threshold=1e-3)
        (tensor([False,  True,  True, False]), 2)
        >>> threshold_round(w, live, threshold=1e-3, criterion="l2", fraction=0.5)
        (tensor([False,  True, False, False]), 1)
        >>> threshold_round(w, live, threshold=1e-3, criterion="l2", fraction=0.5, round_to=2)
        (tensor([False,  True,  True, False]), 1)
    """
    weight = weight.detach().float()
    norms = filter_norms(weight, norm).cpu()
    floor = min(min_filters, int(live.sum()))
    new, wanted = live, int(live.sum())
    if threshold is not None:
        limit = threshold * float(norms.max()) if relative else threshold
        below = (norms < limit) | (norms == 0)  # a zero filter is dead at any threshold
        wanted -= int((live & below).sum())
        new = kill_weakest(new, below, norms, floor)
    if criterion is not None and fraction is not None:
        scores = filter_scores(weight, criterion, cap=cap).cpu()
        alive = new.nonzero().flatten()
        n_kill = math.floor(fraction * alive.numel())
        order = torch.argsort(scores[alive], stable=True)
        lowest = torch.zeros_like(live)
        lowest[alive[order[:n_kill]]] = True
        wanted -= n_kill
        new = kill_weakest(new, lowest, scores, floor)
    if round_to > 1:
        new = spare_to_multiple(new, live, norms, round_to)
    return new, wanted


def spare_to_multiple(new: Tensor, live: Tensor, norms: Tensor, round_to: int) -> Tensor:
    """Spare the strongest candidates until a multiple of ``round_to`` filters is kept.

    The candidates are ``live`` but not ``new``, with a non-zero ``norms``; ``new`` never keeps
    more than all of ``live``.

    Example::

        >>> live = torch.ones(5, dtype=torch.bool)
        >>> new = torch.tensor([True, False, False, False, True])
        >>> spare_to_multiple(new, live, torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0]), 4)
        tensor([ True, False,  True,  True,  True])
        >>> spare_to_multiple(new, live, torch.tensor([5.0, 0.0, 0.0, 2.0, 4.0]), 4)  # zeros stay
        tensor([ True, False, False,  True,  True])
    """
    check_int(round_to, owner="spare_to_multiple", arg="round_to", low=1)
    kept, limit = int(new.sum()), int(live.sum())
    target = min(limit, -(-kept // round_to) * round_to)
    if target <= kept:
        return new
    spare = (live & ~new & (norms > 0)).nonzero().flatten()  # a zero filter is dead anyway
    order = torch.argsort(norms[spare], descending=True, stable=True)
    new = new.clone()
    new[spare[order[: target - kept]]] = True
    return new
