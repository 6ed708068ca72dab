"""Reach an exported size by a given epoch, instead of guessing a strength and a threshold."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_sparsity.callbacks._amp import unscaled_found_inf
from lightning_sparsity.callbacks._order import OrderedCallback
from lightning_sparsity.callbacks._runtime import refuse_sharded_strategy
from lightning_sparsity.callbacks._targeted import TargetedCallback
from lightning_sparsity.functional.scores import FILTER_NORMS, FilterNorm, filter_norms
from lightning_sparsity.pruning.budget import (
    FEATURES,
    Sizer,
    accumulate_taylor_,
    budget_count,
    cut_steps,
    plan_cut,
    schedule,
)
from lightning_sparsity.pruning.masks import FeatureMasks, FilterMasks, build_groups
from lightning_sparsity.selection import (
    LayerSpec,
    batch_input,
    network_name,
    resolve_network,
    select_layers,
)
from lightning_sparsity.validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    describe,
    fail,
)

_OWNER = "SparsityBudget"


class SparsityBudget(OrderedCallback):
    """Make the exported model a given size by a given epoch, then keep training the survivors.

    Give the size as a fraction (``0 < x <= 1``) or a count of the dense model's ``params`` or
    ``macs`` (per sample), as the export counts them. At ``cuts`` evenly spaced optimizer steps
    from ``start_epoch`` to ``by_epoch`` (fractions of an epoch allowed, so one epoch can hold
    the whole schedule) the callback cuts to a gradual (cubic) schedule: across all
    selected layers at once it kills the filters of least significance (``criterion``)
    per unit of size saved, each saving measured by the export's
    own analysis ([`plan_cut`][lightning_sparsity.pruning.budget.plan_cut]), so the cut at
    ``by_epoch`` lands at or just below the budget (never above it). Killed filters stay dead
    (weights, BatchNorm, gradients and optimizer state, as
    [`FilterThresholding`][lightning_sparsity.FilterThresholding]), and the epochs after
    ``by_epoch`` train the survivors.

    With a regularizer in the Trainer
    ([`SparsityRegularizer`][lightning_sparsity.SparsityRegularizer],
    [`ProximalSparsity`][lightning_sparsity.ProximalSparsity] or
    [`VariableSplitting`][lightning_sparsity.VariableSplitting]) the callback steers its strength:
    doubled after a cut whose filters still mattered (relative score above 0.5), reduced after a
    cut of filters the regularizer had already emptied (below 0.1), and halved while the
    regularizer alone has shrunk the network below the size due since the last cut, leaving
    nothing to cut (a proximal map zeroes filters by itself), so no strength needs tuning.

    Args:
        params: the budget in parameters (all of the exported model's), a fraction or a count.
        macs: the budget in multiply-accumulates per sample, a fraction or a count.
        by_epoch: the epochs (a float: ``0.5`` is half of the first) after which the budget is
            met, <= ``max_epochs``.
        start_epoch: epochs of dense training before the schedule starts.
        cuts: the number of cuts; default one per epoch of the schedule, at least 4.
        min_filters: never leave a layer with fewer live filters.
        round_to: keep a multiple of this many filters per layer (or its full width).
        criterion: what ranks the filters: a filter norm (``"l2"``, ``"l1"``, ``"mean_abs"``),
            relative to its layer's mean and weighted by the layer's width; or ``"taylor"``, the
            loss a cut would cost by first-order Taylor estimates summed over the steps since the
            last cut (Molchanov et al. 2019), the same units in every layer and for single
            input features, at the cost of one pass over the selected weights per step.
        layers: which layers (see [`select_layers`][lightning_sparsity.select_layers]); the output
            layer is always skipped.
        example_inputs: a batch the network takes, for the size; default two samples of the
            first training batch.
        steer: adjust the strength of the regularizers in the Trainer.
        features: also cut single input features of the selected (non-output) Linear layers, as
            the published LeNet-5 rows count fc1's inputs; the export removes them one by one.

    Raises:
        ValueError: neither or both of ``params`` and ``macs``; a budget of 0, above 1 as a
            fraction or above the dense model as a count; one the floors make unreachable;
            ``by_epoch`` beyond ``max_epochs`` or not after ``start_epoch``.

    Example::

        >>> from lightning_sparsity import SparsityBudget
        >>> budget = SparsityBudget(macs=0.25, by_epoch=8)
        >>> budget.metric, budget.budget
        ('macs', 0.25)

    Hooks used:
        ``setup`` (layers, epochs), ``on_train_batch_start`` (the example, the dense size),
        ``on_train_start`` (re-apply restored masks and strength), ``on_before_optimizer_step``
        (keep the dead filters dead), ``on_train_batch_end`` (a cut when due, logged as
        ``sparsity/budget/*``; re-apply the masks), ``state_dict`` / ``load_state_dict``.
    """

    #: with the thresholding: after the penalties, before the monitor
    RANKS: ClassVar[dict[str, int]] = {
        "before_step": 41,
        "batch_end": 41,
        "epoch_end": 41,
        "train_end": 41,
    }

    def __init__(
        self,
        params: float | int | None = None,
        macs: float | int | None = None,
        by_epoch: float = 1,
        start_epoch: float = 0,
        cuts: int | None = None,
        min_filters: int = 1,
        round_to: int = 1,
        criterion: FilterNorm | Literal["taylor"] = "l2",
        layers: LayerSpec = None,
        example_inputs: Tensor | tuple[Tensor, ...] | None = None,
        steer: bool = True,
        features: bool = False,
    ) -> None:
        super().__init__()
        if (params is None) == (macs is None):
            fail(
                _OWNER,
                "params",
                params,
                "exactly one of `params` and `macs`",
                got=f"params={params!r}, macs={macs!r}",
                hint="`SparsityBudget(macs=0.25, by_epoch=8)`.",
            )
        self.metric = "params" if params is not None else "macs"
        self.budget: float | int = params if params is not None else macs  # type: ignore[assignment]
        if isinstance(self.budget, bool) or not isinstance(self.budget, int | float):
            fail(
                _OWNER,
                self.metric,
                self.budget,
                "a fraction or a count",
                got=type(self.budget).__name__,
                error=TypeError,
            )
        budget_count(self.budget, max(int(self.budget), 1), metric=self.metric, owner=_OWNER)
        self.start_epoch = check_float(start_epoch, owner=_OWNER, arg="start_epoch", low=0.0)
        self.by_epoch = check_float(
            by_epoch, owner=_OWNER, arg="by_epoch", low=self.start_epoch, strict_low=True
        )
        span = self.by_epoch - self.start_epoch
        self.cuts = check_int(
            cuts if cuts is not None else max(math.ceil(span), 4), owner=_OWNER, arg="cuts", low=1
        )
        self.min_filters = check_int(min_filters, owner=_OWNER, arg="min_filters", low=1)
        self.round_to = check_int(round_to, owner=_OWNER, arg="round_to", low=1)
        check_choice(criterion, (*FILTER_NORMS, "taylor"), owner=_OWNER, arg="criterion")
        self.criterion = criterion
        self.layers = layers
        self.example_inputs = example_inputs
        self.steer = steer
        #: the dense and target sizes (set at the first batch), the size after the last cut
        self.dense: int | None = None
        self.target: int | None = None
        self.size: dict[str, int] = {}
        #: the factor applied to the regularizers' strength
        self.strength_scale = 1.0
        self.features = check_bool(features, owner=_OWNER, arg="features")
        self._filters = FilterMasks({})
        self._features = FeatureMasks({})
        self._sizer: Sizer | None = None
        self._example: tuple[Tensor, ...] | None = None
        self._cut_steps: list[int] = []
        self._cut_at = -1
        self._taylor_from = 0
        #: with ``criterion="taylor"``: the importance summed since the last cut, per group
        self._taylor: dict[str, Tensor] = {}

    @property
    def masks(self) -> dict[str, Tensor]:
        """Layer name -> bool tensor ``[out]`` on the CPU, ``True`` for a live filter.

        With ``features``, also ``"<linear>#in"`` -> ``[in]``, ``True`` for a live input feature.
        """
        features = {n + FEATURES: m for n, m in self._features.masks.items()}
        return {**self._filters.masks, **features}

    def _set_masks(
        self, masks: dict[str, Tensor], optimizers: list[torch.optim.Optimizer] | None = None
    ) -> None:
        filters = {n: m for n, m in masks.items() if not n.endswith(FEATURES)}
        features = {n.removesuffix(FEATURES): m for n, m in masks.items() if n.endswith(FEATURES)}
        if optimizers is None:
            self._filters = FilterMasks(self._filters.groups, filters)
            self._features = FeatureMasks(self._features.layers, features)
        else:
            self._filters.update(filters, optimizers)
            self._features.update(features, optimizers)

    def _apply(self, trainer: pl.Trainer) -> None:
        self._filters.apply(trainer.optimizers)
        self._features.apply(trainer.optimizers)

    @property
    def state_key(self) -> str:
        """One state per metric, budget, schedule and layers."""
        return self._generate_state_key(
            metric=self.metric,
            budget=self.budget,
            by_epoch=self.by_epoch,
            layers=describe(self.layers),
        )

    # ------------------------------------------------------------------ setup and state
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded_strategy(trainer, owner=_OWNER)
        self._reset_order()
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.by_epoch > max_epochs:
            fail(
                _OWNER,
                "by_epoch",
                self.by_epoch,
                f"`by_epoch` <= `max_epochs` ({max_epochs})",
                hint="meet the budget a few epochs before the end, so the survivors train.",
            )
        if max_epochs is not None and max_epochs <= self.by_epoch:
            rank_zero_warn(
                f"`{_OWNER}`: the budget is met at the last epoch, so the survivors "
                "get no training after the last cut. HINT: `by_epoch < max_epochs`."
            )
        network = resolve_network(pl_module)
        names = [
            layer.name
            for layer in select_layers(network, self.layers, owner=_OWNER)
            if not layer.is_output
        ]
        restored = self.masks
        self._filters = FilterMasks(build_groups(network, names, _OWNER))
        if self.features:
            linears = [n for n in names if isinstance(network.get_submodule(n), nn.Linear)]
            self._features = FeatureMasks({n: network.get_submodule(n) for n in linears})
        self._set_masks(restored)
        if self.example_inputs is not None:
            inputs = self.example_inputs
            self._example = inputs if isinstance(inputs, tuple) else (inputs,)
            self._start(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {n: m.tolist() for n, m in self.masks.items()},
            "dense": self.dense,
            "target": self.target,
            "size": dict(self.size),
            "strength_scale": self.strength_scale,
            "example": None if self._example is None else list(self._example),
            "taylor": {n: t.cpu() for n, t in self._taylor.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        masks = {n: torch.as_tensor(m, dtype=torch.bool) for n, m in state_dict["masks"].items()}
        self._set_masks(masks)
        self.dense, self.target = state_dict.get("dense"), state_dict.get("target")
        self.size = dict(state_dict.get("size") or {})
        self.strength_scale = float(state_dict.get("strength_scale", 1.0))
        example = state_dict.get("example")
        self._example = tuple(example) if example is not None else self._example
        self._taylor = dict(state_dict.get("taylor") or {})

    def _start(self, pl_module: pl.LightningModule) -> None:
        """Measure the dense size and check that the budget is reachable (before any step)."""
        network = pl_module.get_submodule(network_name(pl_module, owner=_OWNER))
        example = tuple(t.to(next(network.parameters()).device) for t in self._example or ())
        self._sizer = Sizer(network, self._filters.groups, example)
        if self.dense is None:
            full = {n: torch.ones_like(m) for n, m in self.masks.items()}
            self.dense = self._sizer.size(full)[self.metric]
            self.target = budget_count(self.budget, self.dense, metric=self.metric, owner=_OWNER)
        floors = {n: torch.zeros_like(m) for n, m in self.masks.items()}
        for mask in floors.values():
            mask[: min(self.min_filters, mask.numel())] = True
        least = self._sizer.size(floors)[self.metric]
        if self.target is not None and least > self.target:
            fail(
                _OWNER,
                self.metric,
                self.budget,
                f"a budget above the {least:,} {self.metric} left with every layer at "
                f"`min_filters={self.min_filters}`",
                got=f"{self.target:,}",
                hint="lower `min_filters`, or raise the budget.",
            )

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._sizer is not None:
            return
        if self._example is None:
            x = batch_input(batch, 2)
            if x is None:
                fail(
                    _OWNER,
                    "example_inputs",
                    None,
                    "example inputs for the size",
                    got=f"a batch of type {type(batch).__name__} without a tensor input",
                    hint="pass `example_inputs=` (a couple of samples).",
                )
            self._example = (torch.cat([x, x]) if len(x) == 1 else x,)
        self._start(pl_module)

    def _train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches = trainer.num_training_batches
        steps = (
            math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else 0
        )
        if steps < 1:
            fail(
                _OWNER,
                "by_epoch",
                self.by_epoch,
                "an epoch of known, positive length",
                got=f"{batches} training batches",
                hint="give the train dataloader a length.",
            )
        self._cut_steps = cut_steps(self.start_epoch, self.by_epoch, steps, self.cuts)
        self._taylor_from = round(self.start_epoch * steps)
        self._filters.check(_OWNER)
        self._features.check(_OWNER)
        self._apply(trainer)
        self._steer(trainer, self.strength_scale)

    def _observe_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """With ``criterion="taylor"``: gather the loss's gradients before any penalty's."""
        if self.criterion != "taylor" or not trainer.is_global_zero or not self._cut_steps:
            return
        if self._taylor_from <= trainer.global_step < self._cut_steps[-1]:
            found_inf = unscaled_found_inf(trainer, optimizer)  # a skipped step adds nothing
            groups, features = self._filters.groups, self._features.layers
            accumulate_taylor_(self._taylor, groups, features, skip=found_inf)

    def _before_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._filters.zero_grads()
        self._features.zero_grads()

    def _batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step in self._cut_steps and step != self._cut_at:
            self._cut_at = step
            self._cut(trainer, (self._cut_steps.index(step) + 1) / len(self._cut_steps))
        self._apply(trainer)

    def _cut(self, trainer: pl.Trainer, progress: float) -> None:
        """Cut to the size the schedule gives at ``progress`` (0 to 1) of the way."""
        assert self._sizer is not None
        assert self.dense is not None
        assert self.target is not None
        due = schedule(self.dense, self.target, progress)
        norm = "l2" if self.criterion == "taylor" else self.criterion
        scores = {n: filter_norms(g.weight, norm).cpu() for n, g in self._filters.groups.items()}
        for n, layer in self._features.layers.items():  # input features: the weight's columns
            weight = cast(Tensor, layer.weight).detach()
            scores[n + FEATURES] = filter_norms(weight.t(), norm).cpu()
        taylor = {n: t.cpu() for n, t in self._taylor.items()}
        comparable = self.criterion == "taylor" and taylor.keys() >= scores.keys()
        masks, size = self.masks, self.size
        if trainer.is_global_zero:
            masks, size = plan_cut(
                self._sizer,
                self.masks,
                taylor if comparable else scores,
                due,
                self.metric,  # type: ignore[arg-type]
                min_filters=self.min_filters,
                round_to=self.round_to,
                comparable=comparable,
            )
        self._taylor = {}
        masks, size = trainer.strategy.broadcast((masks, size), src=0)
        before = self.masks
        killed = {n: before[n] & ~m for n, m in masks.items()}
        self._set_masks(masks, trainer.optimizers)
        previous = self.size.get(self.metric, self.dense) or 0
        self.size = size
        nothing_cut = not any(bool(k.any()) for k in killed.values())
        ahead = nothing_cut and size[self.metric] < min(due, previous)
        if ahead and self.steer:
            # nothing to cut, and smaller than at the last cut: the regularizer alone zeroes
            # filters faster than due (a proximal map does)
            self._steer(trainer, max(self.strength_scale * 0.5, 1e-3))
        else:
            self._adapt(trainer, scores, killed)
        metrics = {
            "sparsity/budget/due": float(due),
            "sparsity/budget/strength_scale": self.strength_scale,
            **{f"sparsity/budget/{k}": float(v) for k, v in size.items()},
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=max(trainer.global_step - 1, 0))
        rank_zero_info(
            f"`{_OWNER}` step {trainer.global_step}: {self.metric} {size[self.metric]:,} "
            f"(due {due:,}, budget {self.target:,}); live {self._filters.live()}"
            + (f", inputs {self._features.live()}" if self._features.layers else "")
        )

    def _adapt(
        self, trainer: pl.Trainer, scores: dict[str, Tensor], killed: dict[str, Tensor]
    ) -> None:
        """Steer the regularizers by how much the filters just cut still mattered."""
        rel = [
            scores[n][k] / scores[n][self.masks[n] | k].mean().clamp_min(1e-12)
            for n, k in killed.items()
            if bool(k.any())
        ]
        if not self.steer or not rel:
            return
        mattered = float(torch.cat(rel).mean())
        if mattered > 0.5:
            self._steer(trainer, min(self.strength_scale * 2.0, 1e3))
        elif mattered < 0.1:
            self._steer(trainer, max(self.strength_scale * 0.7, 1e-3))

    def _steer(self, trainer: pl.Trainer, scale: float) -> None:
        self.strength_scale = scale
        if self.steer:
            for cb in trainer.callbacks:  # type: ignore[attr-defined]
                if isinstance(cb, TargetedCallback):
                    cb.rescale(scale, trainer)

    def _train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer)
