"""Cut filters to a size budget measured by the export's own analysis (no Lightning import).

The size of a set of dead filters is what [`prune_model`][lightning_sparsity.prune_model] would
export (:class:`Sizer`): parameters or MACs per sample, counted after every coupled channel and
Linear input feature is removed, so a filter of ``conv1`` and one of ``conv2`` cost what removing
them really saves. :func:`plan_cut` picks the filters to kill across all layers at once so that
the exported size is at or just below a target.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_sparsity.pruning.masks import FilterGroup, zero_filters
from lightning_sparsity.pruning.report import count_macs, count_params
from lightning_sparsity.validation import fail

#: What a budget counts.
Metric = Literal["params", "macs"]
#: The suffix of a mask over a Linear layer's input features (``"fc1#in"``), not its filters.
FEATURES = "#in"


class Sizer:
    """The exported size of ``model`` with some filters dead, measured on ``example_inputs``.

    Each measurement prunes a copy (the model is never changed). ``groups`` name the layers whose
    filters may die, with the BatchNorm after each (as the thresholding finds them); a mask named
    ``"<linear>#in"`` covers that Linear layer's input features (its weight's columns).
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Mapping[str, FilterGroup],
        example_inputs: tuple[Tensor, ...],
    ) -> None:
        self.model = model
        self.example_inputs = example_inputs
        names = {m: n for n, m in model.named_modules()}
        self._bns = {
            name: names[g.bn] for name, g in groups.items() if g.bn is not None and g.bn in names
        }
        self.calls = 0

    @torch.no_grad()
    def size(self, masks: Mapping[str, Tensor]) -> dict[str, int]:
        """``{"params": ..., "macs": ...}`` of the export with ``~masks`` dead (``True`` = live)."""
        from lightning_sparsity.pruning.export import prune_model

        self.calls += 1
        trainer = getattr(self.model, "_trainer", None)  # a LightningModule's Trainer
        memo = {id(trainer): trainer} if trainer is not None else {}
        clone = copy.deepcopy(self.model, memo).eval()
        modules = dict(clone.named_modules())
        for name, mask in masks.items():
            dead = (~mask).nonzero().flatten()
            if dead.numel():
                if name.endswith(FEATURES):  # a Linear layer's input features (columns)
                    weight = modules[name.removesuffix(FEATURES)].weight
                    weight.index_fill_(1, dead.to(weight.device), 0.0)  # type: ignore[operator]
                    continue
                bn = modules[self._bns[name]] if name in self._bns else None
                zero_filters(FilterGroup(name, modules[name], bn), dead)
        # always: filters a regularizer zeroed by itself count even where no mask is dead yet;
        # "nothing to remove" is an answer here (the size), not news for the user
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*expected at least one dead channel")
            clone = prune_model(clone, self.example_inputs, verify=False, allow_unchanged=True)
        return {
            "params": count_params(clone),
            "macs": count_macs(clone, self.example_inputs)[0],
        }


def budget_count(value: float | int, dense: int, *, metric: str, owner: str) -> int:
    """The target count of a budget: a fraction ``0 < value <= 1`` of ``dense``, or a count.

    Raises:
        ValueError: 0 or negative, or a count above ``dense``.

    Example::

        >>> budget_count(0.25, 1000, metric="params", owner="SparsityBudget")
        250
        >>> budget_count(300, 1000, metric="params", owner="SparsityBudget")
        300
    """
    if isinstance(value, float):
        if not 0 < value <= 1:
            fail(owner, metric, value, f"a fraction in (0, 1] or a count of {metric}",
                 hint=f"`{metric}=0.25` keeps a quarter; `{metric}=5000` keeps 5000.")  # fmt: skip
        return max(math.floor(value * dense), 1)
    if value < 1 or value > dense:
        fail(owner, metric, value, f"a count between 1 and the dense model's {dense:,} {metric}",
             hint=f"a fraction such as `{metric}=0.25`.")  # fmt: skip
    return int(value)


def schedule(dense: int, target: int, progress: float) -> int:
    """The size due at ``progress`` (0 to 1) of the way: cubic from ``dense`` to ``target``.

    Fast first and gentle at the end (Zhu and Gupta's gradual schedule).

    Example::

        >>> [schedule(1000, 100, k / 4) for k in range(5)]
        [1000, 480, 212, 114, 100]
    """
    t = min(max(progress, 0.0), 1.0)
    return round(target + (dense - target) * (1 - t) ** 3)


def cut_steps(start: float, end: float, steps_per_epoch: int, cuts: int) -> list[int]:
    """The optimizer steps after which the ``cuts`` cuts happen, the last one at ``end``.

    Evenly spaced from ``start`` to ``end`` epochs of ``steps_per_epoch`` optimizer steps.

    Example::

        >>> cut_steps(0, 0.5, 100, 4), cut_steps(1, 3, 10, 2)
        ([12, 25, 38, 50], [20, 30])
    """
    first, last = start * steps_per_epoch, end * steps_per_epoch
    return [max(round(first + (last - first) * (i + 1) / cuts), 1) for i in range(cuts)]


@torch.no_grad()
def accumulate_taylor_(
    acc: dict[str, Tensor],
    groups: Mapping[str, FilterGroup],
    feature_layers: Mapping[str, nn.Module] | None = None,
    skip: Tensor | None = None,
) -> dict[str, Tensor]:
    """Add this step's first-order Taylor importance of every filter and input feature to ``acc``.

    Removing a group ``s`` changes the loss by about ``sum_{i in s} w_i g_i`` (Molchanov et al.
    2019): its square, summed over steps, estimates the loss a cut costs, in the same units for
    every layer, so a filter of ``conv1`` and an input feature of ``fc1`` compare directly. A
    filter's group is its weight row, bias and BatchNorm scale and shift; an input feature's is
    its weight column. Read the gradients of the loss alone (before any penalty adds to them).
    Parameters without a gradient are skipped; non-finite terms add nothing, and nothing is
    added where ``skip`` (a 0-dim tensor, GradScaler's ``found_inf``) is non-zero, without a
    host synchronisation.

    Example::

        >>> layer = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        >>> layer.weight.grad = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
        >>> acc = accumulate_taylor_({}, {"l": FilterGroup("l", layer, None)}, {"l": layer})
        >>> acc["l"], acc["l#in"]  # rows: (1+2)^2, (0-4)^2; columns: (1+0)^2, (2-4)^2
        (tensor([ 9., 16.]), tensor([1., 4.]))
    """

    def add(key: str, term: Tensor) -> None:
        term = torch.where(torch.isfinite(term), term, 0.0)
        if skip is not None:
            term = torch.where(skip.to(term.device) != 0, 0.0, term)
        acc[key] = acc[key].to(term.device) + term if key in acc else term

    for name, group in groups.items():
        total = None
        for param in group.params():
            if param.grad is None:
                continue
            term = (param.float() * param.grad.float()).reshape(param.shape[0], -1).sum(1)
            total = term if total is None else total + term
        if total is not None:
            add(name, total.square())
    for name, layer in (feature_layers or {}).items():
        weight = layer.weight
        if not isinstance(weight, Tensor) or weight.grad is None:
            continue
        add(name + FEATURES, (weight.float() * weight.grad.float()).sum(0).square())
    return acc


def _relative(values: Tensor, live: Tensor) -> Tensor:
    """``values`` divided by their mean over ``live`` (scale-free across layers)."""
    mean = values[live].mean() if bool(live.any()) else values.new_ones(())
    return values / mean.clamp_min(torch.finfo(values.dtype).tiny)


def _unit(live: int, floor: int, round_to: int) -> int:
    """How many filters a layer loses in its next step: down to a multiple of ``round_to``."""
    step = live % round_to or round_to
    return step if live - step >= floor else 0


def _weakest(mask: Tensor, score: Tensor, n: int) -> Tensor:
    """The ``n`` live filters of lowest score."""
    live = mask.nonzero().flatten()
    return live[torch.argsort(score[live], stable=True)[:n]]


def _savings(
    sizer: Sizer,
    masks: dict[str, Tensor],
    scores: Mapping[str, Tensor],
    size: int,
    metric: Metric,
    floor: int,
    round_to: int,
) -> dict[str, tuple[int, float]]:
    """Per layer: the filters its next step kills, and the size that step saves (measured)."""
    out = {}
    for name, mask in masks.items():
        unit = _unit(int(mask.sum()), floor, round_to)
        if unit:
            trial = dict(masks)
            trial[name] = mask.clone()
            trial[name][_weakest(mask, scores[name], unit)] = False
            out[name] = (unit, float(max(size - sizer.size(trial)[metric], 1)))
    return out


def _ranked(
    masks: Mapping[str, Tensor],
    scores: Mapping[str, Tensor],
    savings: Mapping[str, tuple[int, float]],
    floor: int,
    round_to: int,
    cost_weight: float,
    comparable: bool = False,
) -> list[tuple[str, Tensor]]:
    """Every killable step, lowest priority first: ``(layer, filters)``.

    A step's priority is its filters' mean score relative to the layer's live mean, divided by the
    layer's live filters (the share of its capacity), or with ``comparable`` scores (the same
    units in every layer, such as a loss estimate) the sum of its filters' scores; divided by its
    measured saving relative to the mean saving raised to ``cost_weight``.
    """
    mean = sum(s / u for u, s in savings.values()) / max(len(savings), 1)  # per filter
    steps = []
    for name, (unit, saving) in savings.items():
        mask = masks[name]
        rel = _relative(scores[name].float(), mask)
        live = mask.nonzero().flatten()
        order = live[torch.argsort(rel[live], stable=True)]
        first = _unit(live.numel(), floor, round_to)
        start, n = 0, live.numel()
        while first and n - first >= floor:
            idx = order[start : start + first]
            if comparable:  # what a filter of the step costs, in the same units for every layer
                share = float(scores[name][idx].float().mean())
            else:  # the share of the layer's capacity it holds
                share = float(rel[idx].mean()) / n
            per_filter = saving / unit / mean  # the first step's saving, per filter
            steps.append((share / per_filter**cost_weight, name, idx))
            start, n, first = start + first, n - first, round_to
    steps.sort(key=lambda s: s[0])
    return [(name, idx) for _, name, idx in steps]


def _apply(masks: Mapping[str, Tensor], steps: list[tuple[str, Tensor]]) -> dict[str, Tensor]:
    new = {n: m.clone() for n, m in masks.items()}
    for name, idx in steps:
        new[name][idx] = False
    return new


def _refine(
    sizer: Sizer,
    masks: dict[str, Tensor],
    scores: Mapping[str, Tensor],
    size: dict[str, int],
    target: int,
    metric: Metric,
    floor: int,
    round_to: int,
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """From just above the target, finish with steps that never overshoot more than one step.

    While some step saves less than the gap, the largest such step is taken (as often as it
    fits); once every step reaches the target, the cheapest is taken, so the size ends below the
    target by less than the smallest step's saving.
    """
    for _ in range(64):
        gap = size[metric] - target
        if gap <= 0:
            break
        savings = _savings(sizer, masks, scores, size[metric], metric, floor, round_to)
        if not savings:
            break
        short = {n: s for n, s in savings.items() if s[1] < gap}
        if short:  # the largest step that stays above the target, as often as it fits
            name = max(short, key=lambda n: short[n][1])
            unit, saving = short[name]
            room = (int(masks[name].sum()) - floor) // unit
            count = unit * max(min(int(gap // saving) - 1, room), 1)
        else:  # every step reaches the target: the cheapest lands closest below it
            name = min(savings, key=lambda n: savings[n][1])
            count = savings[name][0]
        masks = {n: m.clone() for n, m in masks.items()}
        masks[name][_weakest(masks[name], scores[name], count)] = False
        size = sizer.size(masks)
    return masks, size


def plan_cut(
    sizer: Sizer,
    masks: Mapping[str, Tensor],
    scores: Mapping[str, Tensor],
    target: int,
    metric: Metric,
    *,
    min_filters: int = 1,
    round_to: int = 1,
    cost_weight: float = 1.0,
    comparable: bool = False,
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """The live masks whose export is at most ``target`` (in ``metric``) and close below it.

    Across all layers at once: every layer's next step (its weakest live filter, or down to the
    next multiple of ``round_to``) has a saving measured by the export's analysis. A step's
    priority is the share of its layer's capacity it holds (its filters' score relative to the
    layer's mean live score, divided by the layer's live filters) per unit of saving (relative to
    the mean saving, to the power ``cost_weight``); with ``comparable`` scores (the same units in
    every layer, such as the loss estimates of
    [`accumulate_taylor_`][lightning_sparsity.pruning.budget.accumulate_taylor_]) the share is
    the step's summed score instead. The lowest go first, and a bisection finds the fewest steps
    that meet the target. From the last ranking still above it, the finish takes the
    steps whose re-measured saving fits the remaining gap, so the size lands just below the
    target. Never below ``min_filters`` per layer; nothing dead is revived.

    Returns:
        ``(masks, size)``: the new masks (CPU bool) and the measured ``{"params", "macs"}``.

    Raises:
        ValueError: the target cannot be met with every layer at its floor.
    """
    masks = {n: m.clone() for n, m in masks.items()}
    size = sizer.size(masks)
    if size[metric] <= target:
        return masks, size
    savings = _savings(sizer, masks, scores, size[metric], metric, min_filters, round_to)
    steps = _ranked(masks, scores, savings, min_filters, round_to, cost_weight, comparable)
    floor_size = sizer.size(_apply(masks, steps))
    if floor_size[metric] > target:
        fail("SparsityBudget", metric, target,
             f"a budget reachable with `min_filters={min_filters}` and `round_to={round_to}`",
             got=f"{floor_size[metric]:,} {metric} left with every layer at its floor",
             hint="lower `min_filters` or `round_to`, or raise the budget.")  # fmt: skip
    low, high = 0, len(steps)  # size(low) > target >= size(high)
    while high - low > 1:
        mid = (low + high) // 2
        if sizer.size(_apply(masks, steps[:mid]))[metric] <= target:
            high = mid
        else:
            low = mid
    above = _apply(masks, steps[:low])
    return _refine(sizer, above, scores, sizer.size(above), target, metric, min_filters, round_to)
