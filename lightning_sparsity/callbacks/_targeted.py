"""The shared shape of the callbacks that act on selected weights every step (private).

[`TargetedCallback`][lightning_sparsity.callbacks._targeted.TargetedCallback] holds what the
regularizer, the proximal map and the splitting method
have in common: a strength (a float or an epoch schedule), the selected layers with their groups,
the logging cadence, the scratch tensors, and which selected weights an optimizer steps.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_sparsity.callbacks._order import OrderedCallback
from lightning_sparsity.callbacks._runtime import optimizer_param_ids, refuse_sharded_strategy
from lightning_sparsity.functional.groups import Granularity, check_granularity
from lightning_sparsity.functional.workspace import Workspace
from lightning_sparsity.selection import (
    LayerSpec,
    Target,
    no_targets_message,
    select_targets,
)
from lightning_sparsity.validation import (
    Strength,
    check_bool,
    check_log_every,
    check_strength,
    describe,
    strength_at,
)


class TargetedCallback(OrderedCallback):
    """A sparsity callback acting on the weights of selected layers, with a strength."""

    #: the public name used in messages
    OWNER: ClassVar[str] = ""

    def __init__(
        self,
        strength: Strength,
        granularity: Granularity,
        layers: LayerSpec,
        log_every_n_steps: int | None,
        check_finite: bool = True,
        linear_granularity: Granularity | None = None,
    ) -> None:
        super().__init__()
        self.strength = check_strength(strength, owner=self.OWNER)
        self.granularity = check_granularity(granularity, owner=self.OWNER)
        self.linear_granularity = linear_granularity
        if linear_granularity is not None:
            check_granularity(linear_granularity, owner=self.OWNER)
        self.layers = layers
        self.log_every_n_steps = check_log_every(log_every_n_steps, owner=self.OWNER)
        self.check_finite = check_bool(check_finite, owner=self.OWNER, arg="check_finite")
        #: a factor on the strength, set by [`SparsityBudget`][lightning_sparsity.SparsityBudget]
        #: when it steers this callback (1.0 otherwise)
        self.strength_scale = 1.0
        self._targets: list[Target] = []
        self._current = 0.0
        self._param_ids: dict[int, set[int]] = {}
        self._workspace = Workspace()

    def _select(self, pl_module: pl.LightningModule) -> list[Target]:
        return select_targets(
            pl_module,
            self.layers,
            self.granularity,
            owner=self.OWNER,
            linear_granularity=self.linear_granularity,
        )

    def _strength_now(self, trainer: pl.Trainer) -> float:
        base = strength_at(self.strength, trainer.current_epoch, owner=self.OWNER)
        return base * self.strength_scale

    def rescale(self, factor: float, trainer: pl.Trainer) -> None:
        """Multiply the strength by ``factor`` from now on (a budget steering this callback)."""
        self.strength_scale = factor
        self._current = self._strength_now(trainer)

    def _active(self, optimizer: torch.optim.Optimizer) -> list[Target]:
        """The selected weights that ``optimizer`` is about to step (they have a gradient)."""
        ids = self._param_ids.get(id(optimizer))
        if ids is None:
            ids = self._param_ids[id(optimizer)] = optimizer_param_ids(optimizer)
        return [t for t in self._targets if t.param.grad is not None and id(t.param) in ids]

    def _describe_layers(self) -> dict[str, Any]:
        return {"granularity": self.granularity, "layers": describe(self.layers)}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded_strategy(trainer, owner=self.OWNER)
        self._reset_order()
        self._targets = self._select(pl_module)
        if not self._targets:
            rank_zero_warn(no_targets_message(self.OWNER, self.granularity))

    def _train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._current = self._strength_now(trainer)
        self._param_ids = {}

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._current = self._strength_now(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._workspace.clear()
