"""l0 + l2,1 sparse group lasso by relaxed variable splitting (Bui, Park, Zhang, Qi, Xin)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_sparsity.callbacks._amp import step_skipped, unscaled_found_inf
from lightning_sparsity.callbacks._common import (
    Strength,
    Target,
    Workspace,
    check_log_every,
    check_number,
    check_strength,
    describe,
    log_due,
    no_targets_message,
    optimizer_param_ids,
    raise_if_nonfinite,
    refuse_sharded_strategy,
    select_targets,
    strength_at,
)
from lightning_sparsity.callbacks._order import OrderedCallback
from lightning_sparsity.functional.groups import check_granularity
from lightning_sparsity.functional.penalties import penalty_and_grads
from lightning_sparsity.functional.proximal import hard_threshold
from lightning_sparsity.selection import LayerSpec

_OWNER = "VariableSplitting"


class VariableSplitting(OrderedCallback):
    """Minimise ``L(W) + sum_l [lambda ||U_l||_0 + lambda sqrt(|g|) sum_g ||W_lg||_2
    + beta/2 ||W_l - U_l||^2] / divide_by`` over the weights ``W`` and a sparse copy ``U``.

    Per optimizer step (Bui et al.): the gradient of ``beta/2 ||W - U||^2 + lambda sqrt(|g|)
    sum_g ||W_g||_2`` (divided by ``divide_by``) is added to ``W``'s gradient in
    ``on_before_optimizer_step`` (after AMP unscaling, before clipping, fused over the layers);
    after the step ``U = hard_threshold(W, sqrt(2 * lambda / beta))`` element-wise (the exact
    minimiser over ``U``; ``divide_by`` cancels there). ``beta`` grows by ``beta_growth`` every
    ``growth_every_n_epochs`` epochs, so ``W`` is pulled ever closer to its sparse copy. ``U`` is
    initialised from the weights when training starts. At the end of fit (``final_projection``)
    the weights are replaced by ``U``: the sparse network the method produces, whose small weights
    are exactly zero. This happens before :class:`~lightning_sparsity.PrunedExport` exports and
    before the masks of :class:`~lightning_sparsity.FilterThresholding` are re-applied, in any
    order of the callback list.

    What is observed is what will be exported: :class:`~lightning_sparsity.SparsityMonitor`
    counts the filters of ``U``, and checkpoints hold ``U`` as the model's weights (so a
    checkpoint loaded for inference is the sparse network) with ``W``, ``U``, ``beta`` and the
    schedule position in this callback's state; resuming restores ``W`` exactly.

    A strength schedule that reaches 0 after being positive (a fine-tuning phase) freezes the
    support of ``U``: while ``lambda = 0``, ``U = W * 1[U != 0]``, so the weights keep training on
    the support found so far and the final ``W = U`` keeps the l0 sparsity (a threshold of
    ``sqrt(2 * 0 / beta) = 0`` would otherwise keep every weight). Under ``"16-mixed"``, steps
    that GradScaler skips are skipped here too (no ``U`` update, nothing logged).

    ``divide_by``: the authors' code divides the regularizer by the training-set size ``N``
    (60000 for MNIST), i.e. ``lambda`` and ``beta`` are per-sample. ``divide_by=N`` reproduces that:
    both gradient terms are divided by ``N``; the threshold ``sqrt(2 lambda / beta)`` is unchanged.
    Their LeNet-5 recipe: Adam lr 1e-3, batch 100, ``strength=0.1``, ``beta=2.5``,
    ``beta_growth=1.25``, ``growth_every_n_epochs=40``, ``divide_by=60000``, all four layers
    (``linear_granularity="channel"`` keeps the output layer in, grouped by input neuron):
    :meth:`paper_recipe` builds it.

    Args:
        strength: ``lambda`` (>= 0) or a schedule ``epoch -> float``.
        beta: the initial coupling ``beta`` (> 0).
        beta_growth: factor applied to ``beta`` on schedule (>= 1).
        growth_every_n_epochs: epochs between growths (>= 1).
        granularity: the groups ``g`` of the l2,1 term (``"filter"`` by default; the output
            layer is skipped at ``"filter"``). The l0 term is always on single weights.
        layers: which layers (see :func:`~lightning_sparsity.select_layers`).
        linear_granularity: the groups of Linear layers, if different (the paper groups a
            Linear's *input* neurons: ``"channel"``, which also keeps the output layer in).
        divide_by: divide the regularizer's gradient by this (> 0), e.g. the training-set size.
        scale_by_size: the ``sqrt(|g|)`` weighting of the group term (the paper's form).
        final_projection: at the end of fit, set ``W = U``.
        check_finite: raise naming the layer when the penalty or the resulting gradient is NaN or
            inf, before the optimizer step.
        log_every_n_steps: log on the optimizer steps the Trainer writes (``None``: its
            ``log_every_n_steps``), 0 never.

    Raises:
        ValueError: negative/NaN strength, ``beta <= 0``, ``beta_growth < 1``, bad granularity,
            unknown layers, ``"kernel"`` on a Linear layer.
        TypeError: arguments of the wrong type.
        RuntimeError: a NaN/inf penalty or gradient (naming the layer); a restored ``U`` that
            does not fit.

    Example::

        >>> from lightning_sparsity import VariableSplitting
        >>> split = VariableSplitting(strength=0.1, beta=2.5, growth_every_n_epochs=40,
        ...                           linear_granularity="channel", divide_by=60_000)
        >>> split.beta
        2.5

    Hooks used:
        ``setup`` (select layers), ``on_train_start`` (restore or initialise ``U``),
        ``on_train_epoch_start`` (grow ``beta``, evaluate the strength),
        ``on_before_optimizer_step`` (add the gradient, log), ``on_train_batch_end`` (update
        ``U`` after each optimizer step), ``on_train_end`` (``W = U``),
        ``state_dict``/``load_state_dict`` (``U``, ``beta``, schedule position), ``teardown``
        (free the scratch tensors: one weight-sized tensor per layer is kept during fit).
    """

    #: penalties first, masks last before the step; ``U`` follows the masks after it; ``W = U``
    #: before the masks are re-applied and the network exported at the end
    RANKS: ClassVar[dict[str, int]] = {
        "before_step": 20,
        "batch_end": 45,
        "epoch_end": 45,
        "train_end": 20,
    }

    def __init__(
        self,
        strength: Strength,
        beta: float,
        beta_growth: float = 1.25,
        growth_every_n_epochs: int = 40,
        granularity: str = "filter",
        layers: LayerSpec = None,
        *,
        linear_granularity: str | None = None,
        divide_by: float = 1.0,
        scale_by_size: bool = True,
        final_projection: bool = True,
        check_finite: bool = True,
        log_every_n_steps: int | None = None,
    ) -> None:
        self.strength = strength
        self.initial_beta = beta
        self.beta_growth = beta_growth
        self.growth_every_n_epochs = growth_every_n_epochs
        self.granularity = granularity
        self.layers = layers
        self.linear_granularity = linear_granularity
        self.divide_by = divide_by
        self.scale_by_size = scale_by_size
        self.final_projection = final_projection
        self.check_finite = check_finite
        self.log_every_n_steps = log_every_n_steps
        self._validate()
        super().__init__()
        #: the current coupling strength
        self.beta = float(beta)
        #: the epoch at which ``beta`` last grew (the schedule position)
        self.growth_epoch = 0
        #: layer name -> the sparse copy ``U`` of its weight
        self.U: dict[str, Tensor] = {}
        #: the last positive threshold that defined ``U`` (0 before any): while the strength is
        #: 0 after it, the support of ``U`` is kept
        self.support_threshold = 0.0
        self._restored: dict[str, Any] | None = None
        self._targets: list[Target] = []
        self._current = 0.0
        self._param_ids: dict[int, set[int]] = {}
        self._stepped = False
        self._found_inf: Tensor | None = None
        self._state_keys: dict[str, str] = {}
        self._workspace = Workspace()

    @classmethod
    def paper_recipe(cls, num_samples: int, **overrides: Any) -> VariableSplitting:
        """Bui et al.'s LeNet-5 / MNIST settings, the regularizer divided by ``num_samples``.

        ``strength=0.1``, ``beta=2.5``, ``beta_growth=1.25`` every 40 epochs, the group term on
        the filters of convolutions and the input neurons of Linear layers (the output layer
        included), ``divide_by=num_samples`` (60000 for MNIST); train with Adam, lr 1e-3, batch
        100. ``overrides`` replace any of these.

        Example::

            >>> split = VariableSplitting.paper_recipe(60_000)
            >>> split.divide_by, split.linear_granularity
            (60000, 'channel')
        """
        kwargs: dict[str, Any] = {
            "strength": 0.1,
            "beta": 2.5,
            "beta_growth": 1.25,
            "growth_every_n_epochs": 40,
            "linear_granularity": "channel",
            "divide_by": num_samples,
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    def _validate(self) -> None:
        check_log_every(self.log_every_n_steps, owner=_OWNER)
        self.strength = check_strength(self.strength, owner=_OWNER)
        if check_number(self.initial_beta, owner=_OWNER, arg="beta") <= 0:
            raise ValueError(f"`{_OWNER}(beta={self.initial_beta!r})`: expected `beta` > 0.")
        check_number(self.beta_growth, owner=_OWNER, arg="beta_growth", low=1.0)
        if check_number(self.divide_by, owner=_OWNER, arg="divide_by") <= 0:
            raise ValueError(
                f"`{_OWNER}(divide_by={self.divide_by!r})`: expected `divide_by` > 0 (e.g. the "
                "training-set size)."
            )
        n = self.growth_every_n_epochs
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"`{_OWNER}(growth_every_n_epochs={n!r})`: expected an int >= 1.")
        if n < 1:
            raise ValueError(
                f"`{_OWNER}(growth_every_n_epochs={n!r})`: expected `growth_every_n_epochs` >= 1, "
                f"got {n}. HINT: `beta_growth=1.0` keeps beta constant."
            )
        check_granularity(self.granularity, owner=_OWNER)
        if self.linear_granularity is not None:
            check_granularity(self.linear_granularity, owner=_OWNER)

    def __repr__(self) -> str:
        return (
            f"{_OWNER}(strength={describe(self.strength)!r}, beta={self.initial_beta!r}, "
            f"granularity={self.granularity!r})"
        )

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            strength=describe(self.strength),
            granularity=self.granularity,
            linear_granularity=self.linear_granularity,
            layers=describe(self.layers),
        )

    @property
    def threshold(self) -> float:
        """The current hard threshold ``sqrt(2 * lambda / beta)`` that defines ``U``."""
        return math.sqrt(2 * self._current / self.beta)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "growth_epoch": self.growth_epoch,
            "support_threshold": self.support_threshold,
            "U": {name: u.detach().cpu().clone() for name, u in self.U.items()},
            # the trained weights: the checkpoint's state_dict holds U (what will be exported)
            "W": {
                t.name: t.param.detach().cpu().clone()
                for t in self._targets
                if self.U and self.final_projection
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)
        self.beta = float(state_dict.get("beta", self.initial_beta))
        self.growth_epoch = int(state_dict.get("growth_epoch", 0))
        self.support_threshold = float(state_dict.get("support_threshold", 0.0))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Store ``U`` as the model's weights (``W`` is in this callback's state)."""
        weights = checkpoint.get("state_dict")
        if not self.final_projection or not isinstance(weights, dict):
            return
        for name, u in self.U.items():
            key = self._state_keys.get(name)
            if key in weights and weights[key].shape == u.shape:
                weights[key] = u.detach().to(weights[key].device, weights[key].dtype).clone()

    def _exported_weights(self) -> list[tuple[Tensor, Tensor]]:
        """``(weight, what the export will hold instead)``: ``(W, U)`` per layer, during fit."""
        if not self.final_projection:
            return []
        return [(t.param, self.U[t.name]) for t in self._targets if t.name in self.U]

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded_strategy(trainer, owner=_OWNER)
        self._reset_order()
        self._targets = select_targets(
            pl_module,
            self.layers,
            self.granularity,
            owner=_OWNER,
            linear_granularity=self.linear_granularity,
        )
        if not self._targets:
            rank_zero_warn(no_targets_message(_OWNER, self.granularity))
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self._state_keys = {
            t.name: names[id(t.param)] for t in self._targets if id(t.param) in names
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._current = strength_at(self.strength, trainer.current_epoch, owner=_OWNER)
        self._param_ids = {}
        self._stepped = False
        self._found_inf = None
        restored = (self._restored or {}).get("U") or {}
        trained = (self._restored or {}).get("W") or {}
        self._restored = None
        if restored:
            self._check_restored(restored)
        if trained:
            self._check_restored(trained)
        with torch.no_grad():
            for t in self._targets:  # the checkpoint's state_dict held U: put W back
                if t.name in trained:
                    t.param.copy_(trained[t.name])
            self.U = {}
            for t in self._targets:
                w = t.param.detach()
                u = restored.get(t.name)
                self.U[t.name] = (
                    u.to(w.device, w.dtype).clone() if u is not None else self._projection(w, None)
                )

    def _check_restored(self, restored: dict[str, Tensor]) -> None:
        shapes = {t.name: tuple(t.param.shape) for t in self._targets}
        bad = {n: tuple(u.shape) for n, u in restored.items() if shapes.get(n) != tuple(u.shape)}
        if bad or set(restored) != set(shapes):
            raise RuntimeError(
                f"`{_OWNER}`: the checkpoint's U holds layers {bad or sorted(restored)}, which do "
                f"not match the selected layers {shapes}. HINT: resume with the same model, "
                "`layers=` and granularities."
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        while epoch >= self.growth_epoch + self.growth_every_n_epochs:
            self.growth_epoch += self.growth_every_n_epochs
            self.beta *= self.beta_growth
        self._current = strength_at(self.strength, epoch, owner=_OWNER)

    def _before_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        ids = self._param_ids.get(id(optimizer))
        if ids is None:
            ids = self._param_ids[id(optimizer)] = optimizer_param_ids(optimizer)
        active = [t for t in self._targets if t.param.grad is not None and id(t.param) in ids]
        if not active:
            return
        found_inf = unscaled_found_inf(trainer, optimizer)  # None without loss scaling
        self._stepped = True
        self._found_inf = found_inf
        with torch.no_grad(), torch.autocast(pl_module.device.type, enabled=False):
            weights = [t.param.detach() for t in active]
            param_grads: list[Tensor] = [t.param.grad for t in active]  # type: ignore[misc]
            scale = 1.0 / self.divide_by
            group, _ = penalty_and_grads(
                "group_lasso",
                weights,
                [t.granularity for t in active],
                scale_by_size=self.scale_by_size,
                out=param_grads,
                alpha=self._current * scale,
            )
            us = [self.U[t.name] for t in active]
            torch._foreach_add_(param_grads, weights, alpha=self.beta * scale)  # + beta (W - U)
            torch._foreach_add_(param_grads, us, alpha=-self.beta * scale)
            log = log_due(trainer, self.log_every_n_steps, after_step=False)
            skipped = False
            if self.check_finite or (log and found_inf is not None):
                skipped = step_skipped(found_inf)
            if self.check_finite:  # raises before the optimizer step: the weights stay intact
                checks = {"the group term": group}  # NaN weights give a NaN group term
                if not skipped:  # a skipped step has inf gradients on purpose
                    checks["the gradient"] = torch.stack(torch._foreach_norm(param_grads))
                raise_if_nonfinite(checks, [t.name for t in active], owner=_OWNER)
            if not log or skipped:
                return
            coupling = torch.stack(torch._foreach_norm(torch._foreach_sub(weights, us), 2))
            value = ((self._current * group + 0.5 * self.beta * coupling.square()) * scale).sum()
        pl_module.log_dict(
            {"sparsity/splitting/penalty": value, "sparsity/splitting/beta": self.beta},
            on_step=True,
            on_epoch=False,
        )

    def _batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int
    ) -> None:
        if not self._stepped:
            return
        self._stepped = False
        found_inf, self._found_inf = self._found_inf, None
        if step_skipped(found_inf):
            return  # GradScaler skipped the step: W did not move
        self._update_u()

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the thresholding round: a killed filter leaves U too
        if self.U:
            self._update_u()

    def _projection(self, w: Tensor, u: Tensor | None) -> Tensor:
        """The minimiser over ``U`` at ``W = w``: ``U = H(w, sqrt(2 lambda / beta))``, or, while
        the strength is 0 after a positive one, ``w`` on the support of ``u``."""
        threshold = self.threshold
        if threshold > 0 or self.support_threshold == 0 or u is None:
            return hard_threshold(w, threshold)
        return w * (u != 0)

    @torch.no_grad()
    def _update_u(self) -> None:
        threshold = self.threshold
        if threshold > 0:
            self.support_threshold = threshold
        for t in self._targets:
            w = t.param.detach()
            u = self.U[t.name]
            if threshold == 0 and self.support_threshold > 0:  # fine-tuning: keep the support
                keep = torch.ne(u, 0, out=self._workspace.get(t.name + "/keep", w, torch.bool))
            else:
                magnitude = torch.abs(w, out=self._workspace.get(t.name, w))
                keep = torch.gt(
                    magnitude, threshold, out=self._workspace.get(t.name + "/keep", w, torch.bool)
                )
            torch.mul(w, keep, out=u)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._workspace.clear()

    def _train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.final_projection or not self.U:
            return
        with torch.no_grad():
            for t in self._targets:
                t.param.copy_(self.U[t.name])
