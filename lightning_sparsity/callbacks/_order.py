"""One order for the sparsity callbacks, whatever their order in ``Trainer(callbacks=[...])``.

Lightning calls a hook on the callbacks in list order, and users append callbacks from the command
line, so the order of the list is not something to rely on. Yet several hooks must run in a fixed
order: penalties are added to the gradients before the dead filters' gradients are zeroed, the
splitting method's ``W = U`` happens before the masks are re-applied and before the export, the
epoch-end thresholding round happens before the monitor counts the live filters.

Every sparsity callback derives from
[`OrderedCallback`][lightning_sparsity.callbacks._order.OrderedCallback], which owns the five
Lightning hooks
concerned and turns each into a phase (``_train_start``, ``_observe_step`` (read-only, before
any callback changes the gradients), ``_before_step``, ``_batch_end``, ``_epoch_end``,
``_train_end``, which subclasses implement). At train start, before any phase, the
optimizers restored from a checkpoint are checked
([`check_restored_optimizers`][lightning_sparsity.callbacks._order.check_restored_optimizers]). The
first
sparsity callback that Lightning reaches runs the phase of *all* the sparsity callbacks of the
Trainer in their canonical order
([`OrderedCallback.rank`][lightning_sparsity.callbacks._order.OrderedCallback.rank]); the others see
that their phase
already ran for this event and do nothing. The result is the same for every permutation of the
list, bit for bit.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from torch import Tensor
from typing_extensions import override

#: The phases, with the method each runs (``_<phase>``) and the hook that triggers it.
PHASES: tuple[str, ...] = (
    "train_start",
    "observe_step",
    "before_step",
    "batch_end",
    "epoch_end",
    "train_end",
)


class OrderedCallback(Callback):
    """A callback whose order-sensitive work runs in the canonical order of `RANKS`."""

    #: Position of this class in each phase (lower first). Subclasses set their own.
    RANKS: ClassVar[dict[str, int]] = {}

    def __init__(self) -> None:
        self._done: dict[str, Hashable] = {}

    def _exported_weights(self) -> list[tuple[Tensor, Tensor]]:
        """The ``(parameter, exported value)`` pairs that differ from the parameter during fit.

        Each pair is ``(parameter, value it will have when exported)`` (the splitting method's
        ``U``); observers look through them.
        """
        return []

    def rank(self, phase: str) -> int:
        """This callback's position in ``phase``."""
        return self.RANKS.get(phase, 50)

    def _reset_order(self) -> None:
        """Forget which events ran (called at ``setup``: a callback may serve several fits)."""
        self._done = {}

    # ------------------------------------------------------------------ the hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, "train_start", "train_start", pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        key = step_key(trainer, optimizer)
        self._run(trainer, "observe_step", key, pl_module, optimizer)
        self._run(trainer, "before_step", key, pl_module, optimizer)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._run(trainer, "batch_end", batch_key(trainer, batch_idx), pl_module, batch_idx)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, "epoch_end", trainer.current_epoch, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, "train_end", "train_end", pl_module)

    # ------------------------------------------------------------------ the phases
    def _train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """When training starts (restored state and optimizers are in place)."""

    def _observe_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Before each optimizer step, before any callback changes the gradients: read only."""

    def _before_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Before each optimizer step (gradients unscaled, before clipping)."""

    def _batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int
    ) -> None:
        """After each training batch (after the optimizer step, if one happened)."""

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At the end of each training epoch."""

    def _train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At the end of fit, before the Trainer's teardown."""

    def _run(self, trainer: Any, phase: str, key: Hashable, *args: Any) -> None:
        """Run ``phase`` for event ``key`` on every sparsity callback of ``trainer``, in order.

        Each callback runs a given ``(phase, key)`` once, whichever of them Lightning calls first.
        """
        if getattr(self, "_done", {}).get(phase) == key:
            return  # a peer already ran this event for every sparsity callback
        if phase == "train_start":
            check_restored_optimizers(trainer)
        callbacks = getattr(trainer, "callbacks", None) or []
        peers = [cb for cb in callbacks if isinstance(cb, OrderedCallback)]
        if not any(cb is self for cb in peers):
            peers.append(self)
        # ties: by class name; two callbacks of one class keep their list order (stable sort)
        for cb in sorted(peers, key=lambda c: (c.rank(phase), type(c).__qualname__)):
            done = getattr(cb, "_done", None)
            if done is None:
                done = cb._done = {}
            if done.get(phase) == key:
                continue
            done[phase] = key
            getattr(cb, f"_{phase}")(trainer, *args)


def check_restored_optimizers(trainer: Any) -> None:
    """Raise when a resumed optimizer lacks settings its ``step`` reads.

    ``Optimizer.load_state_dict`` replaces the param groups by the checkpoint's, so resuming an
    ``Adam`` checkpoint with ``SGD(momentum=0.9)`` (or different optimizer arguments that add a
    key) would fail at the first step with ``KeyError: 'momentum'``.
    """
    for optimizer in getattr(trainer, "optimizers", None) or []:
        for group in optimizer.param_groups:
            missing = sorted(set(optimizer.defaults) - set(group))
            if missing:
                raise RuntimeError(
                    f"`{type(optimizer).__name__}` was restored from a checkpoint whose optimizer "
                    f"state lacks its settings {missing}: the checkpoint was saved with a "
                    "different optimizer or different optimizer arguments. HINT: resume with the "
                    "`configure_optimizers` of the run that saved it, or start a new fit from its "
                    "weights: `Model.load_from_checkpoint(path)` then `trainer.fit(model)` "
                    "without `ckpt_path`."
                )


def step_key(trainer: Any, optimizer: Any) -> Hashable:
    """The event of one optimizer step (``global_step`` counts steps, skipped ones included)."""
    return (getattr(trainer, "global_step", 0), id(optimizer))


def batch_key(trainer: Any, batch_idx: int) -> Hashable:
    """The event of the end of one training batch."""
    return (getattr(trainer, "current_epoch", 0), batch_idx, getattr(trainer, "global_step", 0))


@contextmanager
def exported_view(trainer: Any) -> Iterator[None]:
    """Within the block, the parameters hold the values they will have when exported.

    That is the splitting method's ``U`` instead of ``W``; restored bit for bit on exit.
    """
    swaps = [
        pair
        for cb in getattr(trainer, "callbacks", None) or []
        if isinstance(cb, OrderedCallback)
        for pair in cb._exported_weights()
    ]
    if not swaps:
        yield
        return
    with torch.no_grad():
        saved = [param.detach().clone() for param, _ in swaps]
        for param, value in swaps:
            param.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for (param, _), value in zip(swaps, saved):
                param.copy_(value)
