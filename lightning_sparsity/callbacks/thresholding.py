"""Epoch-end filter thresholding with persistent masks."""

from __future__ import annotations

from typing import Any, ClassVar, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_sparsity.callbacks._order import OrderedCallback
from lightning_sparsity.callbacks._runtime import refuse_sharded_strategy
from lightning_sparsity.functional.scores import (
    Criterion,
    FilterNorm,
    check_round,
    threshold_round,
)
from lightning_sparsity.pruning.masks import FeatureMasks, FilterGroup, FilterMasks, build_groups
from lightning_sparsity.selection import LayerSpec, resolve_network, select_layers
from lightning_sparsity.validation import (
    check_bool,
    check_int,
    check_optional,
    describe,
    fail,
)

_OWNER = "FilterThresholding"


class FilterThresholding(OrderedCallback):
    """Kill filters at the end of training epochs and keep them dead.

    Each round (every ``every_n_epochs`` epochs from ``start_epoch``, at most ``max_rounds``)
    kills, in every selected layer but the output layer, the filters whose ``norm`` is below
    ``threshold``, then ``floor(fraction * live)`` more by ``criterion`` (``"l1"``/``"l2"``: Li et
    al.; ``"l1_capped_l1"``: Kumar et al.'s significance; or a callable), weakest first, never
    below ``min_filters`` and never reviving a filter: the decision is
    [`threshold_round`][lightning_sparsity.functional.scores.threshold_round], computed on rank 0
    and
    broadcast (identical under DDP).

    Killing zeroes the filter's weights and bias and the scale, shift and running mean of the
    BatchNorm after it (`lightning_sparsity.pruning.masks`), so the channel emits exactly 0
    and the export is exact. The masks (``True`` = live) are re-applied after every batch, dead
    gradients are zeroed before every step and dead optimizer state after it, so nothing revives
    them. They are checkpointed under
    [`state_key`][lightning_sparsity.FilterThresholding.state_key]: resume with the same arguments.
    A round
    at the very end of training (no step after it) gets a warning.

    Args:
        threshold: kill filters whose norm is below this (>= 0), and filters that are exactly
            zero (so ``0`` makes the zeros of a proximal map permanent); ``None`` to use only
            ``criterion``.
        norm: the filter norm for ``threshold``: ``"l2"``, ``"l1"`` or ``"mean_abs"``.
        relative: ``threshold`` is a fraction (<= 1) of the layer's largest filter norm.
        every_n_epochs: epochs between rounds (>= 1).
        start_epoch: first epoch (0-based) whose end runs a round.
        criterion: ``"l1"``, ``"l2"``, ``"l1_capped_l1"`` or a callable score; needs ``fraction``.
        fraction: share of the live filters killed per round by ``criterion``, in ``[0, 1)``.
        cap: the cap of the capped-L1 term (> 0); ``None`` for the per-layer default.
        min_filters: never leave a layer with fewer live filters (>= 1): a rule stops killing
            there, sparing its strongest candidates, with a warning.
        max_rounds: stop after this many rounds (``None``: no limit).
        round_to: keep a multiple of this many filters per layer (or all that were live): a
            round spares its strongest candidates up to the next multiple, for hardware that
            wants widths in multiples of N.
        layers: which layers (see [`select_layers`][lightning_sparsity.select_layers]); the output
            layer is always skipped.
        features: also kill the input features (weight columns) of the selected Linear layers,
            the output layer's included, whose ``norm`` is below ``threshold`` (relative to the
            layer's largest column norm when ``relative``): the export removes them one by one,
            as the published LeNet-5 rows count fc1's inputs.

    Raises:
        ValueError: a negative ``threshold``, ``fraction`` outside ``[0, 1)``, an unknown ``norm``
            or ``criterion``, an unknown layer name, ``min_filters`` larger than a layer...
        TypeError: arguments of the wrong type.
        RuntimeError: NaN/inf weights in a layer at a round; restored masks that do not fit the
            model.

    Example::

        >>> from lightning_sparsity import FilterThresholding
        >>> thresholding = FilterThresholding(threshold=1e-3)  # absolute L2 threshold, every epoch
        >>> thresholding.masks  # filled at setup: layer name -> bool per filter (True = live)
        {}
        >>> kumar = FilterThresholding(criterion="l1_capped_l1", fraction=0.1, every_n_epochs=5)

    Hooks used:
        ``setup`` (select layers, find BatchNorms), ``on_train_start`` (re-apply restored
        masks), ``on_before_optimizer_step`` (zero dead gradients), ``on_train_batch_end``
        (re-apply masks, zero optimizer state), ``on_train_epoch_end`` (a round),
        ``on_train_end`` (re-apply the masks before the export), ``state_dict`` /
        ``load_state_dict`` (masks, rounds); in one order whatever the callback list.
    """

    #: after the penalties (before the step and at the end) and before the monitor
    RANKS: ClassVar[dict[str, int]] = {
        "before_step": 40,
        "batch_end": 40,
        "epoch_end": 40,
        "train_end": 40,
    }

    def __init__(
        self,
        threshold: float | None = None,
        norm: FilterNorm = "l2",
        relative: bool = False,
        every_n_epochs: int = 1,
        start_epoch: int = 0,
        criterion: Criterion | None = None,
        fraction: float | None = None,
        cap: float | None = None,
        min_filters: int = 1,
        max_rounds: int | None = None,
        layers: LayerSpec = None,
        features: bool = False,
        round_to: int = 1,
    ) -> None:
        self.threshold = threshold
        self.norm = norm
        self.relative = relative
        self.every_n_epochs = every_n_epochs
        self.start_epoch = start_epoch
        self.criterion = criterion
        self.fraction = fraction
        self.cap = cap
        self.min_filters = min_filters
        self.max_rounds = max_rounds
        self.layers = layers
        self.features = check_bool(features, owner=_OWNER, arg="features")
        self.round_to = check_int(round_to, owner=_OWNER, arg="round_to", low=1)
        self._validate()
        super().__init__()
        self.rounds = 0
        self._filters = FilterMasks({})
        self._features = FeatureMasks({})
        self._last_kill = (-1, 0)  # (global step, filters killed) of the last round

    @property
    def masks(self) -> dict[str, Tensor]:
        """Layer name -> bool tensor ``[out]`` on the CPU, ``True`` for a live filter."""
        return self._filters.masks

    @property
    def feature_masks(self) -> dict[str, Tensor]:
        """Linear layer name -> bool tensor ``[in]``, ``True`` for a live input feature."""
        return self._features.masks

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(threshold={self.threshold!r}, norm={self.norm!r}, "
            f"relative={self.relative!r}, criterion={describe(self.criterion)!r}, "
            f"fraction={self.fraction!r})"
        )

    def _validate(self) -> None:
        check_round(
            threshold=self.threshold,
            norm=self.norm,
            relative=self.relative,
            criterion=self.criterion,
            fraction=self.fraction,
            cap=self.cap,
            owner=_OWNER,
        )
        check_int(self.every_n_epochs, owner=_OWNER, arg="every_n_epochs", low=1)
        check_int(self.start_epoch, owner=_OWNER, arg="start_epoch", low=0)
        check_int(self.min_filters, owner=_OWNER, arg="min_filters", low=1)
        check_optional(check_int, self.max_rounds, owner=_OWNER, arg="max_rounds", low=1)

    @property
    def state_key(self) -> str:
        """Lightning's key for this callback's state: one per configuration."""
        return self._generate_state_key(
            threshold=self.threshold,
            norm=self.norm,
            relative=self.relative,
            criterion=describe(self.criterion),
            fraction=self.fraction,
            layers=describe(self.layers),
        )

    # ------------------------------------------------------------------ setup / state
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded_strategy(trainer, owner=_OWNER)
        self._reset_order()
        network = resolve_network(pl_module)
        selected = select_layers(network, self.layers, owner=_OWNER)
        skipped = [layer.name for layer in selected if layer.is_output]
        if skipped and self.layers is not None:
            rank_zero_warn(
                f"`{_OWNER}`: skipping the output layer(s) {skipped}: their units are "
                "the model's outputs and are never thresholded."
            )
        names = [layer.name for layer in selected if not layer.is_output]
        if not names:
            rank_zero_warn(f"`{_OWNER}`: no layer to threshold (only output layers).")
        groups = build_groups(network, names, owner=_OWNER)
        for name, group in groups.items():
            if self.min_filters > group.out_features:
                fail(
                    _OWNER,
                    "min_filters",
                    self.min_filters,
                    "`min_filters` <= the number of filters of every thresholded layer",
                    got=f"{name!r} with {group.out_features}",
                    hint="lower `min_filters` or pass `layers=`.",
                )
        self._filters = FilterMasks(groups, self.masks)
        linears: dict[str, nn.Module] = {
            layer.name: layer.module for layer in selected if isinstance(layer.module, nn.Linear)
        }
        self._features = FeatureMasks(linears if self.features else {}, self.feature_masks)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {name: mask.tolist() for name, mask in self.masks.items()},
            "feature_masks": {name: mask.tolist() for name, mask in self.feature_masks.items()},
            "rounds": self.rounds,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        masks = state_dict.get("masks", {})
        masks = {name: torch.as_tensor(m, dtype=torch.bool).cpu() for name, m in masks.items()}
        self._filters = FilterMasks(self._filters.groups, masks)
        features = state_dict.get("feature_masks", {})
        features = {n: torch.as_tensor(m, dtype=torch.bool) for n, m in features.items()}
        self._features = FeatureMasks(self._features.layers, features)
        self.rounds = int(state_dict.get("rounds", 0))

    # ------------------------------------------------------------------ hooks
    def _apply(self, trainer: pl.Trainer) -> None:
        self._filters.apply(trainer.optimizers)
        self._features.apply(trainer.optimizers)

    def _train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._filters.check(_OWNER)
        self._features.check(_OWNER)
        self._apply(trainer)

    def _before_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._filters.zero_grads()
        self._features.zero_grads()

    def _batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int
    ) -> None:
        self._apply(trainer)

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch < self.start_epoch or (epoch - self.start_epoch) % self.every_n_epochs:
            return
        if self.max_rounds is not None and self.rounds >= self.max_rounds:
            return
        masks = {name: self._decide(group) for name, group in self._filters.groups.items()}
        masks = trainer.strategy.broadcast(masks, src=0)  # identical decisions on every rank
        killed = self._filters.update(masks, trainer.optimizers)
        if self._features.layers and self.threshold is not None:
            columns = {n: self._decide_features(n) for n in self._features.layers}
            columns = trainer.strategy.broadcast(columns, src=0)
            killed += self._features.update(columns, trainer.optimizers)
        self._last_kill = (trainer.global_step, killed)
        self.rounds += 1
        live = {**self._filters.live(), **{f"{n}/in": k for n, k in self._features.live().items()}}
        rank_zero_info(f"`{_OWNER}` round {self.rounds} (epoch {epoch}): live {live}")

    def _train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer)
        step, killed = self._last_kill
        if killed and step == trainer.global_step:
            rank_zero_warn(
                f"`{_OWNER}`: the last round killed {killed} filters at the end of the "
                "last epoch, and no training step followed: the layers that read them were never "
                "trained without them, so accuracy may drop. HINT: stop the rounds earlier "
                "(`max_rounds`, `every_n_epochs`) or train one more epoch after the last round."
            )

    # ------------------------------------------------------------------ the decision
    def _decide(self, group: FilterGroup) -> Tensor:
        weight = group.weight.detach()
        if not torch.isfinite(weight).all():
            raise RuntimeError(
                f"`{_OWNER}`: layer {group.name!r} has NaN or inf weights at epoch-end "
                "thresholding; refusing to kill filters on them. HINT: lower the learning rate "
                "or the regularisation strength, or clip gradients."
            )
        mask = self.masks[group.name]
        new, wanted = threshold_round(
            weight,
            mask,
            threshold=self.threshold,
            norm=self.norm,
            relative=self.relative,
            criterion=self.criterion,
            fraction=self.fraction,
            cap=self.cap,
            min_filters=self.min_filters,
            round_to=self.round_to,
        )
        if wanted < min(self.min_filters, int(mask.sum())):
            rank_zero_warn(
                f"`{_OWNER}`: the round would leave layer {group.name!r} with "
                f"{max(wanted, 0)} live filters; it keeps {int(new.sum())}, the strongest of the "
                f"candidates (`min_filters={self.min_filters}`)."
            )
        return new

    def _decide_features(self, name: str) -> Tensor:
        """The input features of a Linear layer below the threshold die (never the last one)."""
        weight = cast(Tensor, self._features.layers[name].weight).detach()
        new, _ = threshold_round(
            weight.t(),
            self._features.masks[name],
            threshold=self.threshold,
            norm=self.norm,
            relative=self.relative,
            min_filters=1,
        )
        return new
