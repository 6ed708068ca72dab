"""Add a sparsity penalty's gradient to the weights' gradients before every optimizer step."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_sparsity.callbacks._amp import step_skipped, unscaled_found_inf
from lightning_sparsity.callbacks._common import (
    Strength,
    Target,
    Workspace,
    check_log_every,
    check_strength,
    describe,
    log_due,
    no_targets_message,
    optimizer_param_ids,
    raise_if_nonfinite,
    refuse_sharded_strategy,
    resolve_network,
    select_targets,
    strength_at,
)
from lightning_sparsity.callbacks._order import OrderedCallback
from lightning_sparsity.functional.groups import check_granularity
from lightning_sparsity.functional.penalties import PENALTIES, check_cap, penalty_and_grads
from lightning_sparsity.pruning.analysis.graph import TraceError, batchnorm_after
from lightning_sparsity.selection import LayerSpec

_OWNER = "SparsityRegularizer"


class SparsityRegularizer(OrderedCallback):
    """Train with ``loss + strength * sum_layers R(W_layer)`` for a sparsity penalty ``R``.

    A callback cannot change the loss, so the penalty's gradient ``strength * dR/dW`` is added to
    the weights' gradients in ``on_before_optimizer_step``: once per optimizer step (also with
    ``accumulate_grad_batches``), before gradient clipping, outside autocast (float32 master
    weights under ``"bf16-mixed"``). Under ``"16-mixed"`` it is added to the *unscaled* gradients
    (a fused optimizer's gradients, which Lightning leaves scaled, are unscaled first with
    ``GradScaler.unscale_``), so the effect on the weights is the same with and without
    ``fused=True``; on a step that GradScaler skips (an overflow of dynamic loss scaling) nothing
    is logged and no error is raised, unless the penalty itself is NaN or inf. The built-in
    penalties use closed-form gradients of all layers at once (``torch._foreach_*``); a callable
    penalty goes through autograd layer by layer. Weights whose gradient is ``None`` at that step
    (frozen, unused) are left alone.

    Penalties (see :mod:`lightning_sparsity.functional.penalties`): ``"l1"``; ``"group_lasso"``
    (sum of group L2 norms, ``scale_by_size`` for the sqrt(group size) weighting); ``"l1_l2"``
    (Berthelier et al.: ``||n||_1 / ||n||_2`` over the group norms ``n``); ``"capped_l1"`` (Kumar
    et al.: ``sum_g min(||w_g||_1, cap)``); ``"bn_scale_l1"`` (network slimming: L1 of the scale of
    the BatchNorm right after each selected layer); or a callable ``weight -> scalar``.

    A (sub)gradient penalty shrinks groups towards zero but does not make them exactly zero: pair
    it with :class:`~lightning_sparsity.FilterThresholding` to kill the groups it has made small,
    or use :class:`~lightning_sparsity.ProximalSparsity` for the proximal form. A group that is
    exactly zero gets a zero penalty gradient (never NaN). Biases are not penalised.

    Args:
        penalty: a name listed above or a callable ``weight -> scalar tensor``.
        strength: the factor ``lambda`` (>= 0), or a schedule ``epoch -> float`` evaluated at the
            start of every training epoch.
        granularity: ``"filter"``, ``"channel"``, ``"kernel"`` or ``"weight"``. At ``"filter"``
            the layer producing the model's output is skipped (its units are the classes).
        layers: which layers (see :func:`~lightning_sparsity.select_layers`), names relative to
            ``pl_module.model`` when the LightningModule has one; default every Conv/Linear.
        cap: the cap of ``"capped_l1"`` (required there, >= 0).
        scale_by_size: ``"group_lasso"`` weighted by sqrt(group size) (as in SSL / sparse group
            lasso).
        log_key: the logged metric; default ``"sparsity/penalty/<penalty name>"``. The logged value
            is ``sum_layers R`` (not multiplied by the strength).
        check_finite: raise as soon as the penalty or the resulting gradient of a layer is NaN
            or inf, before the optimizer step (one fused norm and one host sync per step).
        log_every_n_steps: log on the optimizer steps the Trainer writes (``None``: its
            ``log_every_n_steps``), 0 never; ``self.log`` costs milliseconds, so not every step.

    Raises:
        ValueError: an unknown penalty or granularity, a negative or NaN strength (also from a
            schedule), a missing or negative ``cap``, a ``"kernel"`` granularity on a Linear layer,
            an unknown layer name.
        TypeError: arguments of the wrong type.
        RuntimeError: a NaN/inf penalty or gradient during training (naming the layer);
            ``penalty(module)`` called in a training step while this callback also adds the
            gradient (double count).

    Example::

        >>> from lightning_sparsity import SparsityRegularizer
        >>> reg = SparsityRegularizer("l1_l2", strength=1e-3)  # Berthelier et al., on filters
        >>> kumar = SparsityRegularizer("capped_l1", strength=1e-4, cap=0.5)
        >>> # trainer = pl.Trainer(callbacks=[reg, FilterThresholding(threshold=1e-3)])

    Hooks used:
        ``setup`` (select layers, check granularities), ``on_train_start`` /
        ``on_train_epoch_start`` (evaluate the strength), ``on_before_optimizer_step`` (add the
        penalty gradient, log the penalty), ``teardown`` (free the scratch tensors of the L1
        penalties, one weight-sized tensor per layer during fit).
    """

    #: before the step: penalties are added before thresholding zeroes the dead gradients
    RANKS: ClassVar[dict[str, int]] = {"before_step": 10}

    def __init__(
        self,
        penalty: str | Callable[[Tensor], Tensor],
        strength: Strength,
        granularity: str = "filter",
        layers: LayerSpec = None,
        *,
        cap: float | None = None,
        scale_by_size: bool = False,
        log_key: str | None = None,
        check_finite: bool = True,
        log_every_n_steps: int | None = None,
    ) -> None:
        self.penalty_fn = penalty
        self.strength = strength
        self.granularity = granularity
        self.layers = layers
        self.cap = cap
        self.scale_by_size = scale_by_size
        self.log_key = log_key
        self.check_finite = check_finite
        self.log_every_n_steps = log_every_n_steps
        self._validate()
        super().__init__()
        self._targets: list[Target] = []
        self._current = 0.0
        self._param_ids: dict[int, set[int]] = {}
        self._attached = False
        self._cache: dict[int, list[Target]] = {}
        self._workspace = Workspace()

    def _validate(self) -> None:
        check_log_every(self.log_every_n_steps, owner=_OWNER)
        p = self.penalty_fn
        if isinstance(p, str):
            if p not in PENALTIES:
                raise ValueError(
                    f"`{_OWNER}(penalty={p!r})`: expected `penalty` in {sorted(PENALTIES)} or a "
                    f"callable `weight -> scalar`, got {p!r}."
                    + (" HINT: for L0 use `ProximalSparsity(norm='l0')`." if p == "l0" else "")
                )
        elif not callable(p):
            raise TypeError(
                f"`{_OWNER}(penalty={p!r})`: expected a name in {sorted(PENALTIES)} or a callable, "
                f"got {type(p).__name__}."
            )
        self.strength = check_strength(self.strength, owner=_OWNER)
        check_granularity(self.granularity, owner=_OWNER)
        if p == "capped_l1":
            if self.cap is None:
                raise ValueError(
                    f"`{_OWNER}(penalty='capped_l1', cap=None)`: expected a `cap` >= 0 (groups "
                    "whose L1 norm exceeds it are not penalised). HINT: `cap=0.5`."
                )
            check_cap(self.cap, owner=_OWNER)
        elif self.cap is not None:
            raise ValueError(
                f"`{_OWNER}(cap={self.cap!r})`: `cap` applies only to penalty='capped_l1', got "
                f"penalty={describe(p)!r}."
            )
        if self.log_key is not None and not isinstance(self.log_key, str):
            raise TypeError(f"`{_OWNER}(log_key={self.log_key!r})`: expected a str or None.")

    @property
    def name(self) -> str:
        """The penalty's name (a callable's ``__name__``)."""
        p = self.penalty_fn
        return p if isinstance(p, str) else getattr(p, "__name__", type(p).__name__)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            penalty=describe(self.penalty_fn),
            granularity=self.granularity,
            layers=describe(self.layers),
        )

    def __repr__(self) -> str:
        return (
            f"{_OWNER}(penalty={describe(self.penalty_fn)!r}, strength={describe(self.strength)!r}"
            f", granularity={self.granularity!r})"
        )

    # ------------------------------------------------------------------ layers
    def _resolve(self, module: nn.Module) -> list[Target]:
        targets = select_targets(module, self.layers, self.granularity, owner=_OWNER)
        if self.penalty_fn != "bn_scale_l1":
            return targets
        network = resolve_network(module)
        try:
            after = batchnorm_after(network)
        except TraceError as err:
            raise ValueError(
                f"`{_OWNER}(penalty='bn_scale_l1')`: cannot find which BatchNorm follows which "
                f"layer. {err}"
            ) from err
        modules = dict(network.named_modules())
        bns = []
        for t in targets:
            bn_weight = getattr(modules[after[t.name]], "weight", None) if t.name in after else None
            if isinstance(bn_weight, nn.Parameter):
                bns.append(Target(after[t.name], bn_weight, "weight"))
        if targets and not bns:
            raise ValueError(
                f"`{_OWNER}(penalty='bn_scale_l1')`: none of the selected layers "
                f"{[t.name for t in targets]} is followed by an affine BatchNorm."
            )
        return bns

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded_strategy(trainer, owner=_OWNER)
        self._reset_order()
        self._targets = self._resolve(pl_module)
        self._attached = True
        if not self._targets:
            rank_zero_warn(no_targets_message(_OWNER, self.granularity))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._attached = False
            self._workspace.clear()

    # ------------------------------------------------------------------ maths
    def _accumulate(self, active: list[Target], weights: list[Tensor], out: list[Tensor]) -> Tensor:
        """``out += strength * grad R`` in place; returns the per-layer values of ``R``."""
        grans = [t.granularity for t in active]
        p = self.penalty_fn
        if isinstance(p, str):
            scratch = None
            if p in ("l1", "capped_l1", "bn_scale_l1"):  # they need sign(w): reuse scratch tensors
                scratch = [self._workspace.get(t.name, w) for t, w in zip(active, weights)]
            result, _ = penalty_and_grads(
                p,
                weights,
                grans,
                cap=self.cap,
                scale_by_size=self.scale_by_size,
                out=out,
                alpha=self._current,
                scratch=scratch,
            )
            return result
        values: list[Tensor] = []
        grads: list[Tensor] = []
        with torch.enable_grad():
            for w in weights:
                leaf = w.detach().requires_grad_(True)
                value = p(leaf)
                if not isinstance(value, Tensor) or value.numel() != 1:
                    raise TypeError(
                        f"`{_OWNER}(penalty={describe(p)})`: expected the callable to return a "
                        f"scalar tensor, got {type(value).__name__}."
                    )
                (grad,) = torch.autograd.grad(value.reshape(()), leaf, allow_unused=True)
                values.append(value.detach().reshape(()))
                grads.append(torch.zeros_like(leaf) if grad is None else grad)
        torch._foreach_add_(out, grads, alpha=self._current)
        return torch.stack(values)

    def penalty(self, module: nn.Module) -> Tensor:
        """``strength * sum_layers R(W_layer)`` as a differentiable scalar, for users who prefer
        ``loss = data_loss + reg.penalty(self)`` (then do *not* pass this callback to the Trainer,
        or the gradient is added twice). The strength is the current epoch's."""
        if self._attached and module.training and torch.is_grad_enabled():
            raise RuntimeError(
                f"`{_OWNER}.penalty(module)` was called with gradients enabled while this "
                "callback is in the Trainer, which already adds the penalty's gradient: it would "
                "count twice. HINT: either keep the callback (and drop `penalty` from the loss) "
                "or remove it from `Trainer(callbacks=...)`."
            )
        key = id(module)
        if key not in self._cache:
            self._cache[key] = self._resolve(module)
        trainer = getattr(module, "_trainer", None)
        epoch = trainer.current_epoch if trainer is not None else 0
        strength = strength_at(self.strength, epoch, owner=_OWNER)
        p = self.penalty_fn
        terms = []
        for t in self._cache[key]:
            if not isinstance(p, str):
                terms.append(p(t.param))
            elif p in ("l1", "bn_scale_l1"):
                terms.append(t.param.abs().sum())
            elif p == "capped_l1":
                terms.append(PENALTIES[p](t.param, self.cap, t.granularity))
            elif p == "group_lasso":
                terms.append(PENALTIES[p](t.param, t.granularity, self.scale_by_size))
            else:
                terms.append(PENALTIES[p](t.param, t.granularity))
        if not terms:
            return torch.zeros(())
        return strength * torch.stack([term.reshape(()) for term in terms]).sum()

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._current = strength_at(self.strength, trainer.current_epoch, owner=_OWNER)
        self._param_ids = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._current = strength_at(self.strength, trainer.current_epoch, owner=_OWNER)

    def _before_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._targets:
            return
        ids = self._param_ids.get(id(optimizer))
        if ids is None:
            ids = self._param_ids[id(optimizer)] = optimizer_param_ids(optimizer)
        active = [t for t in self._targets if t.param.grad is not None and id(t.param) in ids]
        if not active:
            return
        found_inf = unscaled_found_inf(trainer, optimizer)  # None without loss scaling
        log = log_due(trainer, self.log_every_n_steps, after_step=False)
        # a NaN found after the accumulation still raises before the optimizer step: the
        # exception leaves the closure, so the weights are never updated with it
        with torch.no_grad(), torch.autocast(pl_module.device.type, enabled=False):
            weights = [t.param.detach() for t in active]
            param_grads: list[Tensor] = [t.param.grad for t in active]  # type: ignore[misc]
            values = self._accumulate(active, weights, param_grads)
            skipped = False
            if self.check_finite or (log and found_inf is not None):
                skipped = step_skipped(found_inf)
            if self.check_finite:
                # a skipped step has inf gradients on purpose: then only the penalty (a function
                # of the weights: NaN weights give a NaN penalty) must be finite
                checks = {f"the penalty {self.name!r}": values}
                if not skipped:
                    checks["the gradient"] = torch.stack(torch._foreach_norm(param_grads))
                raise_if_nonfinite(checks, [t.name for t in active], owner=_OWNER)
        if log and not skipped:
            key = self.log_key or f"sparsity/penalty/{self.name}"
            pl_module.log(key, values.sum(), on_step=True, on_epoch=False)
