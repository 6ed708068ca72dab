"""Epoch-end filter thresholding with persistent masks."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_sparsity.callbacks._common import (
    describe,
    refuse_sharded_strategy,
    resolve_network,
)
from lightning_sparsity.callbacks._masks import (
    FilterGroup,
    build_groups,
    zero_filters,
    zero_grads,
    zero_optimizer_state,
)
from lightning_sparsity.callbacks._order import OrderedCallback
from lightning_sparsity.functional.scores import (
    NORMS,
    filter_norms,
    kill_weakest,
    l1_capped_l1_significance,
)
from lightning_sparsity.selection import LayerSpec, select_layers

Criterion = Callable[[Tensor], Tensor]
CRITERIA: tuple[str, ...] = ("l1", "l2", "l1_capped_l1")


class FilterThresholding(OrderedCallback):
    """Kill filters at the end of training epochs and keep them dead.

    Each round (every ``every_n_epochs`` training epochs from ``start_epoch``, at most
    ``max_rounds``) kills, in every selected layer except the output layer:

    * with ``threshold``: the filters whose ``norm`` is below ``threshold`` (or below
      ``threshold * `` the layer's largest filter norm when ``relative``);
    * with ``criterion`` and ``fraction``: then ``floor(fraction * live)`` more of the live filters,
      the lowest-scoring first (ties: lowest index first). ``"l1"``/``"l2"`` rank by the filter's
      norm (Li et al.); ``"l1_capped_l1"`` by Kumar et al.'s significance
      ``||F||_1 + sum_i min(|w_i|, cap)``
      (:func:`~lightning_sparsity.functional.scores.l1_capped_l1_significance`; ``cap=None`` is
      the mean ``|w|`` of the layer's live filters); a callable maps a weight ``[out, ...]`` to
      ``[out]`` scores. Iterating rounds while training is Kumar et al.'s procedure.

    The rules apply in that order, and each kills its candidates weakest first (by ``norm`` for
    the threshold, by the criterion's score for the fraction) and stops where the layer would be
    left with fewer than ``min_filters`` live filters (a warning names the layer): the candidates
    spared are the strongest, and no filter that a rule killed is ever revived.

    Killing zeroes the filter's weights and bias and the scale, shift and running mean of the
    BatchNorm that normalises its output (found by a ``torch.fx`` trace), so the channel emits
    exactly 0 and the export is exact. Masks (``True`` = live) are re-applied after every training
    batch (so after every optimizer step, also with gradient accumulation), the gradients of dead
    units are zeroed before every optimizer step, and their optimizer state (momentum, Adam moments,
    RMSprop averages: every state tensor shaped like the parameter) is zeroed, so nothing revives
    them. Decisions are computed from the weights and broadcast from rank 0 (identical under DDP).
    The masks are saved in checkpoints under :attr:`state_key` (built from ``threshold``, ``norm``,
    ``relative``, ``criterion``, ``fraction`` and ``layers``): resume with the same arguments.

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
        layers: which layers (see :func:`~lightning_sparsity.select_layers`), names relative to
            ``pl_module.model`` when the LightningModule has one; the output layer is always
            skipped.

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
        ``setup`` (select layers, find BatchNorms, check ``min_filters``), ``on_train_start``
        (re-apply restored masks), ``on_before_optimizer_step`` (zero dead gradients, after the
        regularizers have added theirs), ``on_train_batch_end`` (re-apply masks, zero optimizer
        state), ``on_train_epoch_end`` (a thresholding round, before the monitor counts),
        ``on_train_end`` (re-apply the masks after the splitting method's ``W = U``, before the
        export), ``state_dict``/``load_state_dict`` (masks and round count). The order of these
        against the other sparsity callbacks does not depend on the callback list.
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
        norm: str = "l2",
        relative: bool = False,
        every_n_epochs: int = 1,
        start_epoch: int = 0,
        criterion: str | Criterion | None = None,
        fraction: float | None = None,
        cap: float | None = None,
        min_filters: int = 1,
        max_rounds: int | None = None,
        layers: LayerSpec = None,
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
        self._validate()
        super().__init__()
        #: layer name -> bool tensor ``[out]`` on the CPU, ``True`` for a live filter.
        self.masks: dict[str, Tensor] = {}
        self.rounds = 0
        self._groups: dict[str, FilterGroup] = {}
        self._last_kill: tuple[int, int] = (
            -1,
            0,
        )  # (global step, filters killed) of the last round
        self._dead: dict[str, Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(threshold={self.threshold!r}, norm={self.norm!r}, "
            f"relative={self.relative!r}, criterion={describe(self.criterion)!r}, "
            f"fraction={self.fraction!r})"
        )

    def _err(self, arg: str, value: Any) -> str:
        return f"`FilterThresholding({arg}={value!r})`:"

    def _validate(self) -> None:
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))):
            raise TypeError(f"{self._err('threshold', t)} expected a float or None.")
        if t is not None and not t >= 0:
            raise ValueError(f"{self._err('threshold', t)} expected `threshold` >= 0, got {t!r}.")
        if self.relative and t is not None and t > 1:
            raise ValueError(
                f"{self._err('threshold', t)} expected `threshold` <= 1 with `relative=True` "
                f"(a fraction of the layer's largest filter norm), got {t!r}."
            )
        if self.norm not in NORMS:
            raise ValueError(
                f"{self._err('norm', self.norm)} expected `norm` in {list(NORMS)}, "
                f"got {self.norm!r}."
            )
        c = self.criterion
        if isinstance(c, str) and c not in CRITERIA:
            raise ValueError(
                f"{self._err('criterion', c)} expected `criterion` in {list(CRITERIA)} or a "
                f"callable `weight -> scores[out]`, got {c!r}."
            )
        if c is not None and not isinstance(c, str) and not callable(c):
            raise TypeError(
                f"{self._err('criterion', c)} expected a name in {list(CRITERIA)}, a callable or "
                f"None, got {type(c).__name__}."
            )
        f = self.fraction
        if f is not None and not (isinstance(f, (int, float)) and 0 <= f < 1):
            raise ValueError(
                f"{self._err('fraction', f)} expected `fraction` in [0, 1), got {f!r}."
            )
        if (c is None) != (f is None):
            raise ValueError(
                f"{self._err('fraction', f)} `criterion` and `fraction` go together, got "
                f"criterion={describe(c)!r}. HINT: `criterion='l1', fraction=0.1` kills the "
                "10% lowest-L1 live filters per round."
            )
        if t is None and c is None:
            raise ValueError(
                "`FilterThresholding()`: expected a `threshold` or a `criterion` with a "
                "`fraction`, got neither. HINT: `FilterThresholding(threshold=1e-3)`."
            )
        if self.cap is not None and not self.cap > 0:
            raise ValueError(f"{self._err('cap', self.cap)} expected `cap` > 0 or None.")
        for arg, low in (("every_n_epochs", 1), ("start_epoch", 0), ("min_filters", 1)):
            value = getattr(self, arg)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{self._err(arg, value)} expected an int.")
            if value < low:
                raise ValueError(f"{self._err(arg, value)} expected `{arg}` >= {low}, got {value}.")
        if self.max_rounds is not None and (
            not isinstance(self.max_rounds, int) or self.max_rounds < 1
        ):
            raise ValueError(
                f"{self._err('max_rounds', self.max_rounds)} expected an int >= 1 or None."
            )

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            threshold=self.threshold,
            norm=self.norm,
            relative=self.relative,
            criterion=describe(self.criterion),
            fraction=self.fraction,
            layers=describe(self.layers),
        )

    # ------------------------------------------------------------------ setup / state
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded_strategy(trainer, owner="FilterThresholding")
        self._reset_order()
        network = resolve_network(pl_module)
        selected = select_layers(network, self.layers, owner="FilterThresholding")
        skipped = [layer.name for layer in selected if layer.is_output]
        if skipped and self.layers is not None:
            rank_zero_warn(
                f"`FilterThresholding`: skipping the output layer(s) {skipped}: their units are "
                "the model's outputs and are never thresholded."
            )
        names = [layer.name for layer in selected if not layer.is_output]
        if not names:
            rank_zero_warn("`FilterThresholding`: no layer to threshold (only output layers).")
        self._groups = build_groups(network, names, owner="FilterThresholding")
        for name, group in self._groups.items():
            if self.min_filters > group.out_features:
                raise ValueError(
                    f"{self._err('min_filters', self.min_filters)} expected `min_filters` <= the "
                    f"number of filters of every thresholded layer, but {name!r} has "
                    f"{group.out_features}. HINT: lower `min_filters` or pass `layers=`."
                )
            if name not in self.masks:
                self.masks[name] = torch.ones(group.out_features, dtype=torch.bool)
        self._refresh_dead()

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {name: mask.tolist() for name, mask in self.masks.items()},
            "rounds": self.rounds,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        masks = state_dict.get("masks", {})
        self.masks = {name: torch.as_tensor(m, dtype=torch.bool).cpu() for name, m in masks.items()}
        self.rounds = int(state_dict.get("rounds", 0))
        self._refresh_dead()

    def _check_masks(self) -> None:
        unknown = sorted(set(self.masks) - set(self._groups))
        if unknown:
            raise RuntimeError(
                f"`FilterThresholding`: restored masks name layers {unknown} that this callback "
                f"does not threshold (it has {sorted(self._groups)}). HINT: resume with the same "
                "`layers=` and model."
            )
        for name, group in self._groups.items():
            if self.masks[name].shape != (group.out_features,):
                raise RuntimeError(
                    f"`FilterThresholding`: restored mask of {name!r} has "
                    f"{self.masks[name].numel()} entries, the layer has {group.out_features} "
                    "filters. HINT: resume into the unpruned model the checkpoint came from."
                )

    def _refresh_dead(self) -> None:
        self._dead = {n: (~m).nonzero().flatten() for n, m in self.masks.items() if not m.all()}

    def _apply(self, trainer: pl.Trainer) -> None:
        for name, dead in self._dead.items():
            group = self._groups[name]
            zero_filters(group, dead)
            zero_optimizer_state(trainer.optimizers, group, dead)

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_masks()
        self._apply(trainer)

    def _before_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for name, dead in self._dead.items():
            zero_grads(self._groups[name], dead)

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
        masks = {name: self._decide(group) for name, group in self._groups.items()}
        masks = trainer.strategy.broadcast(masks, src=0)
        killed = sum(int((self.masks[n] & ~m).sum()) for n, m in masks.items())
        self._last_kill = (trainer.global_step, killed)
        self.masks = masks
        self.rounds += 1
        self._refresh_dead()
        self._apply(trainer)
        live = {name: int(mask.sum()) for name, mask in self.masks.items()}
        rank_zero_info(f"`FilterThresholding` round {self.rounds} (epoch {epoch}): live {live}")

    def _train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer)
        step, killed = self._last_kill
        if killed and step == trainer.global_step:
            rank_zero_warn(
                f"`FilterThresholding`: the last round killed {killed} filters at the end of the "
                "last epoch, and no training step followed: the layers that read them were never "
                "trained without them, so accuracy may drop. HINT: stop the rounds earlier "
                "(`max_rounds`, `every_n_epochs`) or train one more epoch after the last round."
            )

    # ------------------------------------------------------------------ the decision
    def _score(self, weight: Tensor) -> Tensor:
        c = self.criterion
        if c == "l1_capped_l1":
            return l1_capped_l1_significance(weight, cap=self.cap)
        if c is None or isinstance(c, str):
            return filter_norms(weight, c or self.norm)
        scores = torch.as_tensor(c(weight.detach())).float().flatten()
        if scores.shape != (weight.shape[0],):
            raise ValueError(
                f"`FilterThresholding(criterion={describe(c)!r})`: expected the criterion to "
                f"return {weight.shape[0]} scores (one per filter), got shape "
                f"{tuple(scores.shape)}."
            )
        return scores

    def _decide(self, group: FilterGroup) -> Tensor:
        weight = group.weight.detach().float()
        if not torch.isfinite(weight).all():
            raise RuntimeError(
                f"`FilterThresholding`: layer {group.name!r} has NaN or inf weights at epoch-end "
                "thresholding; refusing to kill filters on them. HINT: lower the learning rate "
                "or the regularisation strength, or clip gradients."
            )
        mask = self.masks[group.name]
        norms = filter_norms(weight, self.norm).cpu()
        floor = min(self.min_filters, int(mask.sum()))
        new = mask
        wanted = int(mask.sum())  # live filters if no floor applied
        if self.threshold is not None:
            limit = self.threshold * float(norms.max()) if self.relative else self.threshold
            # an all-zero filter is dead at any threshold, 0 included (e.g. after a proximal map)
            below = (norms < limit) | (norms == 0)
            wanted -= int((mask & below).sum())
            new = kill_weakest(new, below, norms, floor)
        if self.criterion is not None and self.fraction is not None:
            scores = self._score(weight).cpu()
            live = new.nonzero().flatten()
            n_kill = math.floor(self.fraction * live.numel())
            order = torch.argsort(scores[live], stable=True)
            lowest = torch.zeros_like(mask)
            lowest[live[order[:n_kill]]] = True
            wanted -= n_kill
            new = kill_weakest(new, lowest, scores, floor)
        if wanted < floor:
            rank_zero_warn(
                f"`FilterThresholding`: the round would leave layer {group.name!r} with "
                f"{max(wanted, 0)} live filters; it keeps {int(new.sum())}, the strongest of the "
                f"candidates (`min_filters={self.min_filters}`)."
            )
        return new
