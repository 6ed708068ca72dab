"""Add a sparsity penalty's gradient to the weights' gradients before every optimizer step."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_sparsity.callbacks._amp import step_skipped, unscaled_found_inf
from lightning_sparsity.callbacks._runtime import log_due, raise_if_nonfinite
from lightning_sparsity.callbacks._targeted import TargetedCallback
from lightning_sparsity.functional.groups import Granularity
from lightning_sparsity.functional.penalties import Penalty, PenaltyName, make_penalty
from lightning_sparsity.pruning.analysis.graph import TraceError, batchnorm_after
from lightning_sparsity.selection import LayerSpec, Target, resolve_network
from lightning_sparsity.validation import Strength, check_bool, describe, fail, strength_at


class SparsityRegularizer(TargetedCallback):
    """Train with ``loss + strength * sum_layers R(W_layer)`` for a sparsity penalty ``R``.

    A callback cannot change the loss, so ``strength * dR/dW`` is added to the weights' gradients
    in ``on_before_optimizer_step``: once per optimizer step (also with gradient accumulation),
    before clipping, outside autocast, on unscaled gradients under ``"16-mixed"`` (fused
    optimizers included; a step GradScaler skips logs nothing). The built-in penalties
    (`lightning_sparsity.functional.penalties`, one
    [`Penalty`][lightning_sparsity.functional.penalties.Penalty] object each) use closed-form
    gradients of all layers at once; a callable goes through autograd. Weights without a gradient
    at that step are left alone; biases are not penalised. A penalty shrinks groups but does not
    zero them: pair it with [`FilterThresholding`][lightning_sparsity.FilterThresholding].

    Penalties: ``"l1"``; ``"group_lasso"`` (SSL; ``scale_by_size`` weights by sqrt(group size));
    ``"l1_l2"`` (Berthelier et al., ``||n||_1 / ||n||_2`` over the group norms); ``"capped_l1"``
    (Kumar et al., ``sum_g min(||w_g||_1, cap)``); ``"bn_scale_l1"`` (network slimming: the scale
    of the BatchNorm after each selected layer); or a callable ``weight -> scalar``.

    Args:
        penalty: a name above, a callable ``weight -> scalar tensor`` or a ``Penalty`` object.
        strength: ``lambda`` (>= 0), or a schedule ``epoch -> float`` read at every epoch start.
        granularity: ``"filter"``, ``"channel"``, ``"kernel"`` or ``"weight"``; at ``"filter"``
            the output layer is skipped (its units are the classes).
        layers: which layers ([`select_layers`][lightning_sparsity.select_layers]), names relative
            to
            ``pl_module.model`` when the LightningModule has one; default every Conv/Linear.
        cap: the cap of ``"capped_l1"`` (required there, >= 0).
        scale_by_size: ``"group_lasso"`` weighted by sqrt(group size).
        log_key: the logged metric (``sum_layers R``, without the strength); default
            ``"sparsity/penalty/<name>"``.
        check_finite: raise naming the layer when the penalty or the gradient is NaN or inf,
            before the optimizer step.
        log_every_n_steps: ``None`` logs on the steps the Trainer logs, ``n`` every n optimizer
            steps, 0 never.

    Raises:
        ValueError: an unknown penalty, granularity or layer; a negative or NaN strength (also
            from a schedule); a missing or negative ``cap``; ``"kernel"`` on a Linear layer.
        TypeError: arguments of the wrong type.
        RuntimeError: a NaN/inf penalty or gradient (naming the layer); ``penalty(module)`` used
            in the loss while this callback also adds the gradient.

    Example::

        >>> from lightning_sparsity import SparsityRegularizer
        >>> reg = SparsityRegularizer("l1_l2", strength=1e-3)  # Berthelier et al., on filters
        >>> reg.name
        'l1_l2'

    Hooks used:
        ``setup`` (select layers), ``on_train_start`` / ``on_train_epoch_start`` (the strength),
        ``on_before_optimizer_step`` (add the gradient, log), ``teardown`` (free scratch tensors).
    """

    OWNER = "SparsityRegularizer"
    #: before the step: penalties are added before thresholding zeroes the dead gradients
    RANKS: ClassVar[dict[str, int]] = {"before_step": 10}

    def __init__(
        self,
        penalty: PenaltyName | Callable[[Tensor], Tensor] | Penalty,
        strength: Strength,
        granularity: Granularity = "filter",
        layers: LayerSpec = None,
        *,
        cap: float | None = None,
        scale_by_size: bool = False,
        log_key: str | None = None,
        check_finite: bool = True,
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__(strength, granularity, layers, log_every_n_steps, check_finite)
        self.penalty_fn = penalty
        self.cap = cap
        self.scale_by_size = check_bool(scale_by_size, owner=self.OWNER, arg="scale_by_size")
        self._penalty = make_penalty(
            penalty, cap=cap, scale_by_size=scale_by_size, owner=self.OWNER
        )
        if log_key is not None and not isinstance(log_key, str):
            fail(self.OWNER, "log_key", log_key, "a str or None", got=type(log_key).__name__)
        self.log_key = log_key
        self._attached = False
        self._cache: dict[int, list[Target]] = {}

    @property
    def name(self) -> str:
        """The penalty's name (a callable's ``__name__``)."""
        return self._penalty.name

    @property
    def state_key(self) -> str:
        """Distinguishes regularizers of different penalties, granularities or layers."""
        return self._generate_state_key(
            penalty=describe(self.penalty_fn), **self._describe_layers()
        )

    def __repr__(self) -> str:
        return (
            f"{self.OWNER}(penalty={describe(self.penalty_fn)!r}, "
            f"strength={describe(self.strength)!r}, granularity={self.granularity!r})"
        )

    def _select(self, pl_module: pl.LightningModule) -> list[Target]:
        targets = super()._select(pl_module)
        if self._penalty.name != "bn_scale_l1":
            return targets
        network = resolve_network(pl_module)
        try:
            after = batchnorm_after(network)
        except TraceError as err:
            raise ValueError(
                f"`{self.OWNER}(penalty='bn_scale_l1')`: cannot find which BatchNorm follows "
                f"which layer. {err}"
            ) from err
        modules = dict(network.named_modules())
        bns = []
        for t in targets:
            bn_weight = getattr(modules[after[t.name]], "weight", None) if t.name in after else None
            if isinstance(bn_weight, nn.Parameter):
                bns.append(Target(after[t.name], bn_weight, "weight"))
        if targets and not bns:
            fail(
                self.OWNER,
                "penalty",
                "bn_scale_l1",
                "an affine BatchNorm after at least one selected layer",
                got=f"none after {[t.name for t in targets]}",
            )
        return bns

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._attached = stage == "fit" or self._attached

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._attached = False
            super().teardown(trainer, pl_module, stage)

    def penalty(self, module: nn.Module) -> Tensor:
        """``strength * sum_layers R(W_layer)``: a differentiable scalar for a hand-written loss.

        For ``loss = data_loss + reg.penalty(self)``; then do *not* pass this callback to the
        Trainer, or the gradient is added twice. The strength is the current epoch's.
        """
        if self._attached and module.training and torch.is_grad_enabled():
            raise RuntimeError(
                f"`{self.OWNER}.penalty(module)` was called with gradients enabled while this "
                "callback is in the Trainer, which already adds the penalty's gradient: it would "
                "count twice. HINT: either keep the callback (and drop `penalty` from the loss) "
                "or remove it from `Trainer(callbacks=...)`."
            )
        if id(module) not in self._cache:
            self._cache[id(module)] = self._select(module)  # type: ignore[arg-type]
        trainer = getattr(module, "_trainer", None)
        epoch = trainer.current_epoch if trainer is not None else 0
        strength = strength_at(self.strength, epoch, owner=self.OWNER)
        terms = [self._penalty.value(t.param, t.granularity) for t in self._cache[id(module)]]
        if not terms:
            return torch.zeros(())
        return strength * torch.stack([term.reshape(()) for term in terms]).sum()

    def _before_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        active = self._active(optimizer) if self._targets else []
        if not active:
            return
        found_inf = unscaled_found_inf(trainer, optimizer)  # None without loss scaling
        log = log_due(trainer, self.log_every_n_steps, after_step=False)
        # a NaN raises here, before the optimizer step: the weights are never updated with it
        with torch.no_grad(), torch.autocast(pl_module.device.type, enabled=False):
            weights = [t.param.detach() for t in active]
            grads: list[Tensor] = [t.param.grad for t in active]  # type: ignore[misc]
            scratch = None
            if self._penalty.uses_scratch:
                scratch = [self._workspace.get(t.name, w) for t, w in zip(active, weights)]
            values = self._penalty.add_grads_(
                weights, [t.granularity for t in active], grads, self._current, scratch
            )
            skipped = (self.check_finite or log) and step_skipped(found_inf)
            if self.check_finite:  # a skipped step has inf gradients on purpose
                checks = {f"the penalty {self.name!r}": values}
                if not skipped:
                    checks["the gradient"] = torch.stack(torch._foreach_norm(grads))
                raise_if_nonfinite(checks, [t.name for t in active], owner=self.OWNER)
        if log and not skipped:
            key = self.log_key or f"sparsity/penalty/{self.name}"
            pl_module.log(key, values.sum(), on_step=True, on_epoch=False)
