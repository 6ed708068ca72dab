"""Proximal L0 / L1 steps after every optimizer step, in the optimizer's metric (ICCAIRO 2019)."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_sparsity.callbacks._amp import unscaled_found_inf
from lightning_sparsity.callbacks._common import (
    Strength,
    Target,
    Workspace,
    check_log_every,
    check_strength,
    describe,
    log_due,
    no_targets_message,
    raise_if_nonfinite,
    refuse_sharded_strategy,
    select_targets,
    strength_at,
)
from lightning_sparsity.callbacks._order import OrderedCallback
from lightning_sparsity.functional.groups import check_granularity, group_norms, reduce_dims
from lightning_sparsity.functional.proximal import group_soft_threshold
from lightning_sparsity.selection import LayerSpec

_OWNER = "ProximalSparsity"
NORMS: tuple[str, ...] = ("l0", "l1")
METRICS: tuple[str, ...] = ("auto", "lr")
#: Optimizers whose per-coordinate step ``metric="auto"`` reads (subclasses included).
SUPPORTED_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.RMSprop,
    torch.optim.Adam,  # and AdamW, a subclass
    torch.optim.Adagrad,
)


def step_denominator(
    optimizer: torch.optim.Optimizer,
    group: dict[str, Any],
    state: dict[str, Any],
    out: Tensor | None = None,
) -> Tensor | None:
    """``d`` with per-coordinate step ``eta = lr / d`` of the step the optimizer just took
    (``None``: the plain ``lr``), read from its state after the step:

    * SGD (any momentum): ``None``.
    * RMSprop: ``sqrt(square_avg) + eps``; centered: ``sqrt(square_avg - grad_avg^2) + eps``.
    * Adam / AdamW: ``(1 - beta1^t) * (sqrt(v / (1 - beta2^t)) + eps)`` with ``v = exp_avg_sq``
      (``max_exp_avg_sq`` with amsgrad) and ``t`` the step count: Adam moved the weights by
      ``-lr * m / d`` with ``m = exp_avg``, i.e. the bias-corrected update
      ``lr * m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m / (1 - beta1^t)``; both corrections
      are in ``d``, so ``lr / d`` is exactly the step Adam took per unit of its gradient estimate
      (10x larger than without the first correction at ``t = 1``, 1.5x at ``t = 10``).
    * Adagrad: ``(sqrt(sum) + eps) * (1 + (t - 1) * lr_decay)``.

    ``out``: a tensor shaped like the parameter to write ``d`` into (else a new one).

    Raises:
        RuntimeError: the state the optimizer should hold after a step is missing.
    """

    def need(key: str) -> Tensor:
        if key not in state:
            raise RuntimeError(
                f"`{_OWNER}`: `{type(optimizer).__name__}` holds no {key!r} state for a parameter "
                "it has just stepped, so its per-coordinate step size is unknown. HINT: use "
                "`ProximalSparsity(metric='lr')` to take the plain learning rate as the step."
            )
        return state[key]

    if isinstance(optimizer, torch.optim.RMSprop):
        if group.get("centered", False):
            ga = need("grad_avg")
            d = torch.addcmul(need("square_avg"), ga, ga, value=-1, out=out)
            return d.sqrt_().add_(group["eps"])
        return torch.sqrt(need("square_avg"), out=out).add_(group["eps"])
    if isinstance(optimizer, torch.optim.Adam):
        v = need("max_exp_avg_sq") if group.get("amsgrad", False) else need("exp_avg_sq")
        beta1, beta2 = group["betas"]
        t = float(need("step"))
        d = torch.div(v, 1 - beta2**t, out=out).sqrt_().add_(group["eps"])
        return d.mul_(1 - beta1**t)
    if isinstance(optimizer, torch.optim.Adagrad):
        decay = 1 + (float(need("step")) - 1) * group["lr_decay"]
        return torch.sqrt(need("sum"), out=out).add_(group["eps"]).mul_(decay)
    return None


class ProximalSparsity(OrderedCallback):
    """After every optimizer step, apply the proximal map of ``strength * R`` in the metric of the
    step just taken (the ICCAIRO 2019 proximal RMSProp; L0 there beats L1).

    With ``z`` the weights after the step and ``eta`` the per-coordinate step size
    (:func:`step_denominator`: ``lr / (sqrt(v) + eps)`` from RMSprop's ``square_avg`` or Adam's
    bias-corrected ``exp_avg_sq``, the plain ``lr`` for SGD), the maps are

    ============ ================ =====================================================
    ``norm``     ``granularity``  map
    ============ ================ =====================================================
    ``"l1"``     ``"weight"``     soft: ``sign(z) * max(|z| - eta * lambda, 0)``
    ``"l0"``     ``"weight"``     hard: ``z * 1[z^2 / (2 eta) > lambda]``
    ``"l1"``     a group          group soft, exact in the metric (see
                                  :func:`~lightning_sparsity.functional.proximal.group_soft_threshold`)
    ``"l0"``     a group          group hard: ``z_g * 1[sum_i z_i^2 / (2 eta_i) > lambda]``
    ============ ================ =====================================================

    (the hard maps are evaluated as ``sum_i z_i^2 d_i > 2 lr lambda`` with ``eta_i = lr / d_i``: the
    same rule as :func:`~lightning_sparsity.functional.proximal.group_hard_threshold` with
    ``t = sqrt(2 eta lambda)``, in fewer passes over the weights)

    so the groups it zeroes are *exactly* zero after every step. Under ``"16-mixed"`` a step that
    GradScaler skips (dynamic loss scaling overflows on purpose now and then) gets no map either,
    also before the optimizer holds any state. With gradient accumulation the map
    runs only after batches where the optimizer stepped, with the learning rate that step used
    (read in ``on_before_optimizer_step``, before a per-step LR scheduler moves it). Weights whose
    gradient was ``None`` (not stepped) are left alone. Biases are not touched. One weight-sized
    scratch tensor per layer is kept during fit (no temporaries are allocated per step).

    Args:
        strength: ``lambda`` (>= 0) or a schedule ``epoch -> float``.
        norm: ``"l0"`` (hard thresholds) or ``"l1"`` (soft thresholds).
        granularity: ``"filter"``, ``"channel"``, ``"kernel"`` or ``"weight"``; at ``"filter"`` the
            output layer is skipped.
        layers: which layers (see :func:`~lightning_sparsity.select_layers`).
        metric: ``"auto"`` reads the optimizer's per-coordinate step (SGD, RMSprop, Adam, AdamW,
            Adagrad); ``"lr"`` uses the plain learning rate with any optimizer.
        log_key: metric logged after each map: the fraction of the selected groups that are
            non-zero.
        check_finite: raise naming the layer when the stepped weights hold NaN or inf.
        log_every_n_steps: log on the optimizer steps the Trainer writes (``None``: its
            ``log_every_n_steps``), 0 never.

    Raises:
        ValueError: unknown ``norm``, ``granularity`` or ``metric``; negative or NaN strength;
            ``"kernel"`` on a Linear layer; unknown layer names.
        TypeError: an optimizer whose step size ``metric="auto"`` cannot read (the supported ones
            are listed); arguments of the wrong type.
        RuntimeError: missing optimizer state after a step; NaN/inf weights.

    Example::

        >>> from lightning_sparsity import ProximalSparsity
        >>> prox = ProximalSparsity(strength=1e-4, norm="l0", granularity="filter")
        >>> # with configure_optimizers returning torch.optim.RMSprop(...)

    Hooks used:
        ``setup`` (select layers), ``on_train_start`` (check the optimizers),
        ``on_train_epoch_start`` (evaluate the strength), ``on_before_optimizer_step`` (note which
        weights step and their learning rate), ``on_train_batch_end`` (apply the map, log).
    """

    #: after the penalties are added and before the masks; the map before the masks re-apply
    RANKS: ClassVar[dict[str, int]] = {"before_step": 30, "batch_end": 30}

    def __init__(
        self,
        strength: Strength,
        norm: str = "l0",
        granularity: str = "filter",
        layers: LayerSpec = None,
        *,
        metric: str = "auto",
        log_key: str = "sparsity/proximal/nonzero_fraction",
        check_finite: bool = True,
        log_every_n_steps: int | None = None,
    ) -> None:
        self.strength = strength
        self.norm = norm
        self.granularity = granularity
        self.layers = layers
        self.metric = metric
        self.log_key = log_key
        self.check_finite = check_finite
        self.log_every_n_steps = log_every_n_steps
        self._validate()
        super().__init__()
        self._targets: list[Target] = []
        self._current = 0.0
        # (target, optimizer, param group, lr used by the step) noted before each step
        self._pending: list[tuple[Target, torch.optim.Optimizer, dict[str, Any], float]] = []
        # GradScaler's found_inf of each noted step (None: no loss scaling)
        self._found_inf: list[Tensor | None] = []
        self._groups: dict[int, tuple[torch.optim.Optimizer, dict[str, Any]]] = {}
        self._workspace = Workspace()

    def _validate(self) -> None:
        check_log_every(self.log_every_n_steps, owner=_OWNER)
        self.strength = check_strength(self.strength, owner=_OWNER)
        for arg, choices in (("norm", NORMS), ("metric", METRICS)):
            value = getattr(self, arg)
            if value not in choices:
                hint = " HINT: the L1 of groups is `norm='l1'`." if value == "group_lasso" else ""
                raise ValueError(
                    f"`{_OWNER}({arg}={value!r})`: expected `{arg}` in {list(choices)}, "
                    f"got {value!r}.{hint}"
                )
        check_granularity(self.granularity, owner=_OWNER)

    def __repr__(self) -> str:
        return (
            f"{_OWNER}(strength={describe(self.strength)!r}, norm={self.norm!r}, "
            f"granularity={self.granularity!r})"
        )

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            norm=self.norm, granularity=self.granularity, layers=describe(self.layers)
        )

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded_strategy(trainer, owner=_OWNER)
        self._reset_order()
        self._targets = select_targets(pl_module, self.layers, self.granularity, owner=_OWNER)
        if not self._targets:
            rank_zero_warn(no_targets_message(_OWNER, self.granularity))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._current = strength_at(self.strength, trainer.current_epoch, owner=_OWNER)
        self._groups = {}
        self._pending = []
        self._found_inf = []
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    self._groups[id(p)] = (optimizer, group)
        for t in self._targets:
            found = self._groups.get(id(t.param))
            if found is None:
                rank_zero_warn(
                    f"`{_OWNER}`: the weight of layer {t.name!r} is in no optimizer; it is skipped."
                )
            elif self.metric == "auto" and not isinstance(found[0], SUPPORTED_OPTIMIZERS):
                names = [c.__name__ for c in SUPPORTED_OPTIMIZERS] + ["AdamW"]
                raise TypeError(
                    f"`{_OWNER}(metric='auto')`: cannot read the per-coordinate step size of "
                    f"`{type(found[0]).__name__}` (layer {t.name!r}); supported: {names}. HINT: "
                    "`ProximalSparsity(metric='lr')` uses the plain learning rate as the step."
                )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._current = strength_at(self.strength, trainer.current_epoch, owner=_OWNER)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._workspace.clear()

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
        if not noted:
            return
        found_inf = unscaled_found_inf(trainer, optimizer)
        for t, group in noted:
            self._pending.append((t, optimizer, group, float(group["lr"])))
            self._found_inf.append(found_inf)

    def _batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int
    ) -> None:
        pending, self._pending = self._pending, []
        found_inf, self._found_inf = self._found_inf, []
        if pending and self.check_finite:  # skipped steps too: NaN weights make every step skip
            with torch.no_grad():
                values = torch.stack(torch._foreach_norm([t.param.detach() for t, *_ in pending]))
            names = [t.name for t, *_ in pending]
            raise_if_nonfinite(values, names, owner=_OWNER, what="a stepped weight")
        scaled = [(i, f) for i, f in enumerate(found_inf) if f is not None]
        if scaled:  # under loss scaling: drop the steps GradScaler skipped (one host sync)
            flags = torch.stack([f.reshape(()).cpu() for _, f in scaled]).tolist()
            dropped = {i for (i, _), skipped in zip(scaled, flags) if skipped}
            pending = [p for i, p in enumerate(pending) if i not in dropped]
        if not pending or self._current == 0:
            return
        lam = self._current
        log = log_due(trainer, self.log_every_n_steps, after_step=True)
        with torch.no_grad(), torch.autocast(pl_module.device.type, enabled=False):
            weights = [t.param.detach() for t, *_ in pending]
            alive, total = [], 0
            for (t, optimizer, group, lr), z in zip(pending, weights):
                buf = self._workspace.get(t.name, z)
                d = None
                if self.metric == "auto":
                    d = step_denominator(optimizer, group, optimizer.state[t.param], out=buf)
                if self.norm == "l0":
                    # keep iff sum_i z_i^2 / (2 eta_i) > lambda with eta_i = lr / d_i, i.e.
                    # sum_i z_i^2 d_i > 2 lr lambda (the scratch d becomes the score in place)
                    score = torch.square(z, out=buf) if d is None else d.mul_(z).mul_(z)
                    dims = reduce_dims(z, t.granularity)
                    limit = 2 * lr * lam
                    if dims:
                        keep = score.sum(dims, keepdim=True) > limit
                    else:
                        keep = torch.gt(
                            score, limit, out=self._workspace.get(t.name + "/mask", z, torch.bool)
                        )
                    z.mul_(keep)
                    if log:
                        alive.append(keep.sum())
                        total += keep.numel()
                else:
                    eta: float | Tensor = lr if d is None else d.reciprocal_().mul_(lr)
                    z.copy_(group_soft_threshold(z, eta * lam, t.granularity))
                    if log:
                        norms = group_norms(z, t.granularity)
                        alive.append((norms > 0).sum())
                        total += norms.numel()
        if log:
            fraction = torch.stack(alive).sum() / total
            pl_module.log(self.log_key, fraction, on_step=True, on_epoch=False)
