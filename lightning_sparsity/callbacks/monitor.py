"""Per-layer live-filter counts, density and the would-be pruned size, logged while training."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from typing_extensions import override

from lightning_sparsity.callbacks._order import OrderedCallback, exported_view
from lightning_sparsity.callbacks._runtime import refuse_sharded_strategy
from lightning_sparsity.functional.scores import FILTER_NORMS, FilterNorm, filter_norms
from lightning_sparsity.pruning.report import pruned_size
from lightning_sparsity.selection import LayerSpec, batch_input, resolve_network, select_layers
from lightning_sparsity.validation import (
    check_bool,
    check_choice,
    check_float,
    check_log_every,
    fail,
)

_OWNER = "SparsityMonitor"


def _log_step(trainer: pl.Trainer) -> int:
    """The step index Lightning gives metrics logged now: that of the last optimizer step."""
    return max(trainer.global_step - 1, 0)


class SparsityMonitor(OrderedCallback):
    """Log how many filters each layer has left, and what the pruned model would cost.

    A filter (output unit of a Conv/Linear layer, the output layer excepted) is *live* when its
    ``norm`` is above ``tolerance`` (default 0: only an exactly-zero filter is dead). Logged at
    every training-epoch end with ``pl_module.log`` (to every logger and into
    ``trainer.callback_metrics``, at the step index Lightning gives epoch metrics such as
    ``val/acc``: ``global_step - 1``), and every ``log_every_n_steps`` optimizer steps with
    ``logger.log_metrics`` (same step numbering):

    * ``sparsity/<layer>/filters``: live filters of the layer;
    * ``sparsity/<layer>/density``: share of the layer's weights whose magnitude is > ``tolerance``;
    * ``sparsity/filters``: live filters of all monitored layers;
    * ``sparsity/params`` and ``sparsity/macs``: parameters and MACs per sample of the model the
      export would write now ([`pruned_size`][lightning_sparsity.pruning.report.pruned_size]).

    With a TensorBoard logger it also writes (rank zero) a custom-scalars layout (one chart with
    every layer's filter count, one with the densities, params, MACs) and per-epoch histograms
    ``sparsity/<layer>/filter_norms``. Wherever it sits in the callback list, an epoch's counts
    include that epoch's thresholding round and count what will be exported (``U`` under
    [`VariableSplitting`][lightning_sparsity.VariableSplitting]). A first point is logged at step 0.

    Args:
        tolerance: a filter is live when its norm is > ``tolerance`` (>= 0).
        log_every_n_steps: also log every ``n`` optimizer steps; ``0`` (default): epoch ends
            only; ``None``: on the steps the Trainer logs (``Trainer(log_every_n_steps=...)``).
        histograms: write the filter-norm histograms (TensorBoard only).
        layers: which layers (see [`select_layers`][lightning_sparsity.select_layers]), names
            relative to
            ``pl_module.model`` when the LightningModule has one; output layers are skipped.
        example_inputs: one input sample (a tensor or a tuple of tensors) for the size count;
            ``None`` takes the first sample of the first training batch.
        norm: the filter norm compared with ``tolerance``: ``"l2"``, ``"l1"`` or ``"mean_abs"``.

    Raises:
        ValueError: a negative ``tolerance`` or ``log_every_n_steps``, an unknown ``norm`` or
            layer name.
        RuntimeError: a Trainer without a logger; a batch whose input cannot be found (pass
            ``example_inputs``); NaN/inf weights in a monitored layer (named).

    Example::

        >>> from lightning_sparsity import SparsityMonitor
        >>> monitor = SparsityMonitor(log_every_n_steps=100)
        >>> monitor.tolerance, monitor.histograms
        (0.0, True)

    Hooks used:
        ``setup`` (logger check, layer selection), ``on_train_start`` (custom-scalars layout),
        ``on_train_batch_start`` (captures one example input), ``on_train_batch_end`` (step
        logging), ``on_train_epoch_end`` (epoch logging, histograms). The model is only read.
    """

    #: after thresholding and the splitting method's ``U`` update
    RANKS: ClassVar[dict[str, int]] = {"batch_end": 50, "epoch_end": 50}

    def __init__(
        self,
        tolerance: float = 0.0,
        log_every_n_steps: int | None = 0,
        histograms: bool = True,
        layers: LayerSpec = None,
        example_inputs: Tensor | tuple[Tensor, ...] | None = None,
        norm: FilterNorm = "l2",
    ) -> None:
        self.tolerance = tolerance
        self.log_every_n_steps = log_every_n_steps
        self.histograms = histograms
        self.layers = layers
        self.example_inputs = example_inputs
        self.norm = norm
        self._validate()
        super().__init__()
        self._names: list[str] = []
        self._bns: dict[str, str] = {}
        self._example: Tensor | tuple[Tensor, ...] | None = None
        self._last_global_step = -1
        self._initial_due = False

    def _validate(self) -> None:
        check_float(self.tolerance, owner=_OWNER, arg="tolerance", low=0.0)
        check_log_every(self.log_every_n_steps, owner=_OWNER)
        check_bool(self.histograms, owner=_OWNER, arg="histograms")
        check_choice(self.norm, FILTER_NORMS, owner=_OWNER, arg="norm")
        ex = self.example_inputs
        if ex is not None and not (
            isinstance(ex, Tensor)
            or (isinstance(ex, tuple) and all(isinstance(e, Tensor) for e in ex))
        ):
            fail(
                _OWNER,
                "example_inputs",
                ex,
                "a tensor or a tuple of tensors",
                got=type(ex).__name__,
                error=TypeError,
            )

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return  # the monitor only acts while training
        if not trainer.loggers:
            raise RuntimeError(
                f"`{_OWNER}`: the Trainer has no logger (`logger=False`), so there is "
                "nowhere to log the sparsity curves. HINT: `Trainer(logger=TensorBoardLogger("
                "'runs'))`, or remove the callback."
            )
        refuse_sharded_strategy(trainer, owner=_OWNER)
        self._reset_order()
        network = resolve_network(pl_module)
        selected = select_layers(network, self.layers, owner=_OWNER)
        self._names = [layer.name for layer in selected if not layer.is_output]
        if self.example_inputs is not None:
            self._example = self.example_inputs

    def _tensorboards(self, trainer: pl.Trainer) -> list[TensorBoardLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_global_step = trainer.global_step
        if not trainer.is_global_zero or not self._names:
            return

        def chart(suffix: str) -> list[str]:
            return [re.escape(f"sparsity/{name}/{suffix}") for name in self._names]

        layout = {
            "sparsity": {
                "live filters per layer": ["Multiline", chart("filters")],
                "weight density per layer": ["Multiline", chart("density")],
                "live filters (total)": ["Multiline", [re.escape("sparsity/filters")]],
                "pruned params": ["Multiline", [re.escape("sparsity/params")]],
                "pruned MACs": ["Multiline", [re.escape("sparsity/macs")]],
            }
        }
        for logger in self._tensorboards(trainer):
            logger.experiment.add_custom_scalars(layout)
        # a first point before any step (so that even a one-epoch run draws a line), taken at the
        # first batch: every callback's on_train_start (restored state, U) has run by then
        self._initial_due = True

    # ------------------------------------------------------------------ measuring
    def _live(self, network: nn.Module) -> dict[str, Tensor]:
        modules = dict(network.named_modules())
        return {
            name: filter_norms(modules[name].weight, self.norm).cpu()  # type: ignore[arg-type]
            for name in self._names
        }

    def measure(self, pl_module: pl.LightningModule) -> tuple[dict[str, float], dict[str, Tensor]]:
        """The metrics (key -> value) and each layer's filter norms, from the current weights."""
        network = resolve_network(pl_module)
        modules = dict(network.named_modules())
        norms = self._live(network)
        bad = [name for name in self._names if not bool(torch.isfinite(norms[name]).all())]
        if bad:
            raise RuntimeError(
                f"`{_OWNER}`: the weights of layer(s) {bad} are NaN or inf, so their "
                "filters can be counted neither live nor dead. HINT: lower the learning rate or "
                "the regularisation strength, or clip gradients (`Trainer(gradient_clip_val=...)`)."
            )
        metrics: dict[str, float] = {}
        total = 0
        for name in self._names:
            live = int((norms[name] > self.tolerance).sum())
            weight = modules[name].weight.detach()
            density = float((weight.abs() > self.tolerance).sum()) / weight.numel()
            metrics[f"sparsity/{name}/filters"] = float(live)
            metrics[f"sparsity/{name}/density"] = density
            total += live
        metrics["sparsity/filters"] = float(total)
        if self._example is not None:
            dead = {name: (n <= self.tolerance).nonzero().flatten() for name, n in norms.items()}
            device = next((p.device for p in network.parameters()), torch.device("cpu"))
            params, macs = pruned_size(network, dead, self._example_on(device))
            metrics["sparsity/params"] = float(params)
            metrics["sparsity/macs"] = float(macs)
        return metrics, norms

    def _example_on(self, device: torch.device) -> tuple[Tensor, ...]:
        example = self._example
        args = example if isinstance(example, tuple) else (example,)
        return tuple(a.to(device) for a in args if a is not None)

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._example is None:
            self._capture(batch)
        if self._initial_due:
            self._initial_due = False
            with exported_view(trainer):
                metrics, _ = self.measure(pl_module)
            for any_logger in trainer.loggers:
                any_logger.log_metrics(metrics, step=trainer.global_step)

    def _capture(self, batch: Any) -> None:
        inputs = batch_input(batch, 1)
        if inputs is None:
            raise RuntimeError(
                f"`{_OWNER}`: cannot find the model input in a training batch of type "
                f"{type(batch).__name__}. HINT: pass `example_inputs=` (one sample)."
            )
        self._example = inputs

    def _batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int
    ) -> None:
        n = self.log_every_n_steps
        if n is None:  # the Trainer's cadence
            n = getattr(trainer, "log_every_n_steps", 0)
        step = trainer.global_step
        if not n or step == self._last_global_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._last_global_step = step
        if step % n or batch_idx + 1 >= trainer.num_training_batches:
            return  # not due, or the epoch end logs this step anyway
        with exported_view(trainer):
            metrics, _ = self.measure(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=_log_step(trainer))

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with exported_view(trainer):
            metrics, norms = self.measure(pl_module)
        pl_module.log_dict(metrics, on_step=False, on_epoch=True)
        if self.histograms and trainer.is_global_zero:
            for logger in self._tensorboards(trainer):
                for name, values in norms.items():
                    logger.experiment.add_histogram(
                        f"sparsity/{name}/filter_norms", values, global_step=_log_step(trainer)
                    )
