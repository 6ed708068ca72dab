"""Proximal L0 / L1 steps after every optimizer step, in the optimizer's metric (ICCAIRO 2019)."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_sparsity.callbacks._amp import unscaled_found_inf
from lightning_sparsity.callbacks._runtime import log_due, raise_if_nonfinite
from lightning_sparsity.callbacks._targeted import TargetedCallback
from lightning_sparsity.functional.groups import Granularity, num_groups
from lightning_sparsity.functional.optim import SUPPORTED_OPTIMIZERS, step_denominator
from lightning_sparsity.functional.proximal import (
    PROXIMAL_PENALTIES,
    ProximalPenalty,
    proximal_step_,
)
from lightning_sparsity.selection import LayerSpec, Target
from lightning_sparsity.validation import Strength, check_choice, describe, fail

#: ``"auto"``: the optimizer's per-coordinate step; ``"lr"``: the plain learning rate.
Metric = Literal["auto", "lr"]
METRICS: tuple[str, ...] = ("auto", "lr")
#: Deprecated alias of ``functional.proximal.PROXIMAL_PENALTIES``.
NORMS = PROXIMAL_PENALTIES
_UNSET: Any = object()


class ProximalSparsity(TargetedCallback):
    """After every optimizer step, apply the proximal map of ``strength * R``.

    The map is taken in the metric of the step just taken (the ICCAIRO 2019 proximal RMSProp; L0
    there beats L1).

    With ``z`` the weights after the step and ``eta = lr / d`` the per-coordinate step size
    ([`step_denominator`][lightning_sparsity.functional.optim.step_denominator]: RMSprop's
    ``square_avg``,
    Adam's bias-corrected moments, Adagrad's sum; the plain ``lr`` for SGD or ``metric="lr"``),
    [`proximal_step_`][lightning_sparsity.functional.proximal.proximal_step_] zeroes, for ``"l0"``,
    each group
    with ``sum_i z_i^2 / (2 eta_i) <= lambda`` (hard threshold) and, for ``"l1"``, applies the
    exact group soft threshold in that metric. The groups it zeroes are *exactly* zero after every
    step. It runs only after batches where the optimizer stepped (gradient accumulation), with the
    learning rate that step used, and not after steps GradScaler skipped (``"16-mixed"``). Weights
    whose gradient was ``None`` are left alone; biases are not touched.

    Args:
        strength: ``lambda`` (>= 0) or a schedule ``epoch -> float``.
        penalty: ``"l0"`` (hard thresholds) or ``"l1"`` (soft thresholds).
        granularity: ``"filter"``, ``"channel"``, ``"kernel"`` or ``"weight"``; at ``"filter"`` the
            output layer is skipped.
        layers: which layers (see [`select_layers`][lightning_sparsity.select_layers]).
        metric: ``"auto"`` reads the optimizer's step (SGD, RMSprop, Adam, AdamW, Adagrad);
            ``"lr"`` uses the plain learning rate with any optimizer.
        log_key: the fraction of the selected groups that are non-zero, logged after the map.
        check_finite: raise naming the layer when the stepped weights hold NaN or inf.
        log_every_n_steps: ``None`` logs on the steps the Trainer logs, ``n`` every n optimizer
            steps, 0 never.
        norm: deprecated name of ``penalty``.

    Raises:
        ValueError: unknown ``penalty``, ``granularity``, ``metric`` or layer; negative or NaN
            strength; ``"kernel"`` on a Linear layer.
        TypeError: an optimizer whose step ``metric="auto"`` cannot read; wrong argument types.
        RuntimeError: missing optimizer state after a step; NaN/inf weights.

    Example::

        >>> from lightning_sparsity import ProximalSparsity
        >>> prox = ProximalSparsity(strength=1e-4, penalty="l0", granularity="filter")
        >>> prox.penalty, prox.metric
        ('l0', 'auto')

    Hooks used:
        ``setup`` (select layers), ``on_train_start`` (check the optimizers),
        ``on_train_epoch_start`` (the strength), ``on_before_optimizer_step`` (note which weights
        step and their learning rate), ``on_train_batch_end`` (apply the map, log).
    """

    OWNER = "ProximalSparsity"
    #: after the penalties are added and before the masks; the map before the masks re-apply
    RANKS: ClassVar[dict[str, int]] = {"before_step": 30, "batch_end": 30}

    def __init__(
        self,
        strength: Strength,
        penalty: ProximalPenalty = "l0",
        granularity: Granularity = "filter",
        layers: LayerSpec = None,
        *,
        metric: Metric = "auto",
        log_key: str = "sparsity/proximal/nonzero_fraction",
        check_finite: bool = True,
        log_every_n_steps: int | None = None,
        norm: ProximalPenalty = _UNSET,
    ) -> None:
        super().__init__(strength, granularity, layers, log_every_n_steps, check_finite)
        if norm is not _UNSET:
            warnings.warn(
                "`ProximalSparsity(norm=...)` is deprecated: the argument is now `penalty=` "
                "(`norm` names a filter norm elsewhere in the library).",
                DeprecationWarning,
                stacklevel=2,
            )
            penalty = norm
        hint = "the L1 of groups is `penalty='l1'`." if penalty == "group_lasso" else ""
        self.penalty = check_choice(
            penalty, PROXIMAL_PENALTIES, owner=self.OWNER, arg="penalty", hint=hint
        )
        self.metric = check_choice(metric, METRICS, owner=self.OWNER, arg="metric")
        self.log_key = log_key
        # (target, optimizer, param group, lr used by the step, GradScaler's found_inf or None)
        self._pending: list[tuple[Target, torch.optim.Optimizer, dict, float, Tensor | None]] = []
        self._groups: dict[int, tuple[torch.optim.Optimizer, dict[str, Any]]] = {}

    @property
    def norm(self) -> str:
        """Deprecated name of `penalty`."""
        return self.penalty

    def __repr__(self) -> str:
        return (
            f"{self.OWNER}(strength={describe(self.strength)!r}, penalty={self.penalty!r}, "
            f"granularity={self.granularity!r})"
        )

    @property
    def state_key(self) -> str:
        """Distinguishes maps of different penalties, granularities or layers."""
        return self._generate_state_key(norm=self.penalty, **self._describe_layers())

    def _train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super()._train_start(trainer, pl_module)
        self._pending = []
        self._groups = {
            id(p): (optimizer, group)
            for optimizer in trainer.optimizers
            for group in optimizer.param_groups
            for p in group["params"]
        }
        for t in self._targets:
            found = self._groups.get(id(t.param))
            if found is None:
                rank_zero_warn(
                    f"`{self.OWNER}`: the weight of layer {t.name!r} is in no optimizer; skipped."
                )
            elif self.metric == "auto" and not isinstance(found[0], SUPPORTED_OPTIMIZERS):
                names = [c.__name__ for c in SUPPORTED_OPTIMIZERS] + ["AdamW"]
                fail(
                    self.OWNER,
                    "metric",
                    "auto",
                    f"an optimizer whose per-coordinate step size is known: {names}",
                    got=f"`{type(found[0]).__name__}` for layer {t.name!r}",
                    hint="`ProximalSparsity(metric='lr')` uses the plain learning rate.",
                    error=TypeError,
                )

    def _before_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        noted = [
            (t, found[1])
            for t in self._targets
            if (found := self._groups.get(id(t.param))) is not None
            and found[0] is optimizer
            and t.param.grad is not None
        ]
        if noted:
            found_inf = unscaled_found_inf(trainer, optimizer)
            for t, group in noted:
                self._pending.append((t, optimizer, group, float(group["lr"]), found_inf))

    def _stepped(self) -> list[tuple[Target, torch.optim.Optimizer, dict, float, Tensor | None]]:
        """The noted weights whose step happened (GradScaler's skips dropped; one host sync)."""
        pending, self._pending = self._pending, []
        if pending and self.check_finite:  # skipped steps too: NaN weights make every step skip
            with torch.no_grad():
                values = torch.stack(torch._foreach_norm([p[0].param.detach() for p in pending]))
            names = [p[0].name for p in pending]
            raise_if_nonfinite(values, names, owner=self.OWNER, what="a stepped weight")
        scaled = [(i, p[4]) for i, p in enumerate(pending) if p[4] is not None]
        if scaled:
            flags = torch.stack([f.reshape(()).cpu() for _, f in scaled]).tolist()  # type: ignore[union-attr]
            dropped = {i for (i, _), skipped in zip(scaled, flags) if skipped}
            pending = [p for i, p in enumerate(pending) if i not in dropped]
        return pending

    def _batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int
    ) -> None:
        pending = self._stepped()
        if not pending or self._current == 0:
            return
        log = log_due(trainer, self.log_every_n_steps, after_step=True)
        alive, total = [], 0
        with torch.no_grad(), torch.autocast(pl_module.device.type, enabled=False):
            for t, optimizer, group, lr, _ in pending:
                z = t.param.detach()
                buf = self._workspace.get(t.name, z)
                d = None
                if self.metric == "auto":
                    d = step_denominator(optimizer, group, optimizer.state[t.param], out=buf)
                live = proximal_step_(
                    z,
                    self._current,
                    lr,
                    penalty=self.penalty,  # type: ignore[arg-type]
                    granularity=t.granularity,
                    denominator=d,
                    scratch=buf,
                    mask=self._workspace.get(t.name + "/mask", z, torch.bool),
                    count=log,
                )
                if live is not None:
                    alive.append(live)
                    total += num_groups(z, t.granularity)
        if log:
            fraction = torch.stack(alive).sum() / total
            pl_module.log(self.log_key, fraction, on_step=True, on_epoch=False)
