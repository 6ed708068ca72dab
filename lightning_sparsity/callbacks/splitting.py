"""l0 + l2,1 sparse group lasso by relaxed variable splitting (Bui, Park, Zhang, Qi, Xin)."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_sparsity.callbacks._amp import step_skipped, unscaled_found_inf
from lightning_sparsity.callbacks._copies import copies_as_weights, restore_copies
from lightning_sparsity.callbacks._runtime import log_due, raise_if_nonfinite
from lightning_sparsity.callbacks._targeted import TargetedCallback
from lightning_sparsity.functional.groups import Granularity
from lightning_sparsity.functional.splitting import (
    PAPER_RECIPE,
    check_splitting,
    sparse_copy_,
    splitting_grads_,
    splitting_threshold,
    splitting_value,
)
from lightning_sparsity.selection import LayerSpec
from lightning_sparsity.validation import (
    Strength,
    check_bool,
    describe,
)


class VariableSplitting(TargetedCallback):
    """Variable splitting: train the weights ``W`` together with a sparse copy ``U``.

    It minimises ``L(W) + sum_l [lambda ||U_l||_0 + lambda sqrt(|g|) sum_g ||W_lg||_2
    + beta/2 ||W_l - U_l||^2] / divide_by`` over ``W`` and ``U``.

    Per optimizer step (Bui et al.; maths in `lightning_sparsity.functional.splitting`):
    the gradient of the group and coupling terms is added to ``W``'s gradient before the step
    (unscaled, before clipping); after it ``U = W * 1[|W| > sqrt(2 lambda / beta)]``, the exact
    minimiser over ``U``. ``beta`` grows by ``beta_growth`` every ``growth_every_n_epochs``
    epochs. At the end of fit (``final_projection``) ``W = U``, before the masks are re-applied
    and before the export, in any order of the callback list.

    What is observed is what will be exported: the monitor counts ``U``'s filters and checkpoints
    hold ``U`` as the model's weights, with ``W``, ``U``, ``beta`` and the schedule in this
    callback's state (resuming restores ``W`` exactly). A strength schedule that reaches 0 after
    being positive freezes ``U``'s support (``U = W * 1[U != 0]``), so the final ``W = U`` keeps
    the l0 sparsity. Steps that GradScaler skips are skipped here too. ``divide_by=N`` (the
    training-set size) makes ``lambda`` and ``beta`` per-sample as in the authors' code;
    [`paper_recipe`][lightning_sparsity.VariableSplitting.paper_recipe] builds their LeNet-5
    settings.

    Args:
        strength: ``lambda`` (>= 0) or a schedule ``epoch -> float``.
        beta: the initial coupling ``beta`` (> 0).
        beta_growth: factor applied to ``beta`` on schedule (>= 1).
        growth_every_n_epochs: epochs between growths (>= 1).
        granularity: the groups of the l2,1 term (the l0 term is on single weights); at
            ``"filter"`` the output layer is skipped.
        layers: which layers (see [`select_layers`][lightning_sparsity.select_layers]).
        linear_granularity: the groups of Linear layers, if different (the paper's
            ``"channel"``: input neurons, which keeps the output layer in).
        divide_by: divide the regularizer's gradient by this (> 0), e.g. the training-set size.
        scale_by_size: the ``sqrt(|g|)`` weighting of the group term (the paper's form).
        final_projection: at the end of fit, set ``W = U``.
        check_finite: raise naming the layer when the penalty or the gradient is NaN or inf.
        log_every_n_steps: ``None`` logs on the steps the Trainer logs, ``n`` every n optimizer
            steps, 0 never.

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
        ``setup``, ``on_train_start`` (restore or initialise ``U``), ``on_train_epoch_start``
        (grow ``beta``), ``on_before_optimizer_step`` (add the gradient), ``on_train_batch_end``
        (update ``U``), ``on_train_end`` (``W = U``), ``state_dict``/``load_state_dict``,
        ``on_save_checkpoint`` (``U`` as the weights), ``teardown`` (free scratch tensors).
    """

    OWNER = "VariableSplitting"

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
        granularity: Granularity = "filter",
        layers: LayerSpec = None,
        *,
        linear_granularity: Granularity | None = None,
        divide_by: float = 1.0,
        scale_by_size: bool = True,
        final_projection: bool = True,
        check_finite: bool = True,
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__(
            strength, granularity, layers, log_every_n_steps, check_finite, linear_granularity
        )
        check_splitting(
            beta=beta,
            beta_growth=beta_growth,
            growth_every_n_epochs=growth_every_n_epochs,
            divide_by=divide_by,
            owner=self.OWNER,
        )
        self.initial_beta = beta
        self.beta_growth = beta_growth
        self.growth_every_n_epochs = growth_every_n_epochs
        self.divide_by = divide_by
        self.scale_by_size = check_bool(scale_by_size, owner=self.OWNER, arg="scale_by_size")
        self.final_projection = check_bool(
            final_projection, owner=self.OWNER, arg="final_projection"
        )
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
        self._stepped = False
        self._found_inf: Tensor | None = None
        self._state_keys: dict[str, str] = {}

    @classmethod
    def paper_recipe(cls, num_samples: int, **overrides: Any) -> VariableSplitting:
        """Bui et al.'s LeNet-5 / MNIST settings, the regularizer divided by ``num_samples``.

        The settings are `PAPER_RECIPE`; train with
        Adam, lr 1e-3, batch 100. ``overrides`` replace any setting.

        Example::

            >>> split = VariableSplitting.paper_recipe(60_000)
            >>> split.divide_by, split.linear_granularity
            (60000, 'channel')
        """
        return cls(**{**PAPER_RECIPE, "divide_by": num_samples, **overrides})

    def __repr__(self) -> str:
        return (
            f"{self.OWNER}(strength={describe(self.strength)!r}, beta={self.initial_beta!r}, "
            f"granularity={self.granularity!r})"
        )

    @property
    def state_key(self) -> str:
        """Distinguishes splitting callbacks of different strengths, groups or layers."""
        return self._generate_state_key(
            strength=describe(self.strength),
            linear_granularity=self.linear_granularity,
            **self._describe_layers(),
        )

    @property
    def threshold(self) -> float:
        """The current hard threshold ``sqrt(2 * lambda / beta)`` that defines ``U``."""
        return splitting_threshold(self._current, self.beta)

    # ------------------------------------------------------------------ state
    @override
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

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)
        self.beta = float(state_dict.get("beta", self.initial_beta))
        self.growth_epoch = int(state_dict.get("growth_epoch", 0))
        self.support_threshold = float(state_dict.get("support_threshold", 0.0))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Store ``U`` as the model's weights (``W`` is in this callback's state)."""
        if self.final_projection:
            copies_as_weights(checkpoint, self.U, self._state_keys)

    def _exported_weights(self) -> list[tuple[Tensor, Tensor]]:
        """``(weight, what the export will hold instead)``: ``(W, U)`` per layer, during fit."""
        if not self.final_projection:
            return []
        return [(t.param, self.U[t.name]) for t in self._targets if t.name in self.U]

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self._state_keys = {
            t.name: names[id(t.param)] for t in self._targets if id(t.param) in names
        }

    def _train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super()._train_start(trainer, pl_module)
        self._stepped = False
        self._found_inf = None
        initial = lambda w: sparse_copy_(w, torch.empty_like(w), self.threshold)  # noqa: E731
        self.U = restore_copies(self._restored, self._targets, initial, self.OWNER)
        self._restored = None

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        while trainer.current_epoch >= self.growth_epoch + self.growth_every_n_epochs:
            self.growth_epoch += self.growth_every_n_epochs
            self.beta *= self.beta_growth
        super().on_train_epoch_start(trainer, pl_module)

    def _before_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        active = self._active(optimizer)
        if not active:
            return
        self._stepped = True
        self._found_inf = found_inf = unscaled_found_inf(trainer, optimizer)
        log = log_due(trainer, self.log_every_n_steps, after_step=False)
        options = {"strength": self._current, "beta": self.beta, "divide_by": self.divide_by}
        with torch.no_grad(), torch.autocast(pl_module.device.type, enabled=False):
            weights = [t.param.detach() for t in active]
            grads: list[Tensor] = [t.param.grad for t in active]  # type: ignore[misc]
            copies = [self.U[t.name] for t in active]
            group = splitting_grads_(
                weights,
                copies,
                [t.granularity for t in active],
                grads,
                scale_by_size=self.scale_by_size,
                **options,
            )
            skipped = (self.check_finite or log) and step_skipped(found_inf)
            if self.check_finite:  # raises before the optimizer step: the weights stay intact
                checks = {"the group term": group}  # NaN weights give a NaN group term
                if not skipped:  # a skipped step has inf gradients on purpose
                    checks["the gradient"] = torch.stack(torch._foreach_norm(grads))
                raise_if_nonfinite(checks, [t.name for t in active], owner=self.OWNER)
            if not log or skipped:
                return
            value = splitting_value(weights, copies, group, **options)
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

    @torch.no_grad()
    def _update_u(self) -> None:
        threshold = self.threshold
        if threshold > 0:
            self.support_threshold = threshold
        keep_support = threshold == 0 and self.support_threshold > 0  # fine-tuning
        for t in self._targets:
            w = t.param.detach()
            sparse_copy_(
                w,
                self.U[t.name],
                threshold,
                keep_support=keep_support,
                scratch=self._workspace.get(t.name, w),
                mask=self._workspace.get(t.name + "/keep", w, torch.bool),
            )

    def _train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.final_projection or not self.U:
            return
        with torch.no_grad():
            for t in self._targets:
                t.param.copy_(self.U[t.name])
