"""NaN and inf during regularized training: each callback detects them, names the layer, and never
turns them into masks or exported files.

A module injects ``nan`` or ``inf`` into one element of ``conv1`` (a layer every callback acts on)
at a chosen optimizer step, either into the weight (before the forward) or into the gradient
(after the backward). Each callback runs alone in a real ``Trainer``.

* ``SparsityRegularizer`` and ``VariableSplitting`` check in ``on_before_optimizer_step``: they
  must raise at the injection step, before the optimizer applies the bad gradient, so the weights
  the run leaves behind are still finite (injected weights excepted).
* ``ProximalSparsity`` checks the stepped weights before its map: it raises in the same step.
* ``FilterThresholding`` and ``SparsityMonitor`` act at the epoch end: they raise there, and the
  masks are exactly what they were (no filter killed or counted dead because of a NaN).
* ``PrunedExport`` (NaN left in the final weights): refuses, naming the layer; no file written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))

import reliability_common as rc

from lightning_sparsity import (
    FilterThresholding,
    ProximalSparsity,
    PrunedExport,
    SparsityMonitor,
    SparsityRegularizer,
    VariableSplitting,
)

STEPS_PER_EPOCH = rc.N_SAMPLES // 32  # 4
INJECT_AT = 2  # the third optimizer step of the first epoch


class Injecting(rc.LitTiny):
    """Puts ``value`` into ``conv1.weight[0, 0, 0, 0]`` (mode "weight", before the forward of
    step ``at``) or into its gradient (mode "grad", after that step's backward).
    """

    def __init__(self, mode: str, value: float, at: int = INJECT_AT) -> None:
        super().__init__()
        self.mode, self.value, self.at = mode, value, at
        self.injected_weights: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.mode == "weight" and self.global_step == self.at:
            with torch.no_grad():
                self.model.conv1.weight[0, 0, 0, 0] = self.value

    def on_after_backward(self) -> None:
        if self.mode == "grad" and self.global_step == self.at:
            self.model.conv1.weight.grad[0, 0, 0, 0] = self.value  # type: ignore[index]


def _trainer(tmp_path: Path, callback: Any, epochs: int = 2) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=[callback],
        logger=pl.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def _finite_except_injected(module: Injecting) -> bool:
    w = module.model.conv1.weight.detach().clone()
    if module.mode == "weight":
        w[0, 0, 0, 0] = 0.0
    others = [p for n, p in module.named_parameters() if n != "model.conv1.weight"]
    return bool(torch.isfinite(w).all()) and all(bool(torch.isfinite(p).all()) for p in others)


MODES = [("weight", "nan"), ("weight", "inf"), ("grad", "nan"), ("grad", "inf"), ("grad", "-inf")]
GRADIENT_CALLBACKS = {
    "SparsityRegularizer-l1_l2": lambda: SparsityRegularizer("l1_l2", strength=0.01),
    "SparsityRegularizer-group_lasso": lambda: SparsityRegularizer("group_lasso", strength=0.01),
    "SparsityRegularizer-l1": lambda: SparsityRegularizer("l1", strength=1e-4),
    "VariableSplitting": lambda: VariableSplitting(strength=0.01, beta=1.0),
}


@pytest.mark.parametrize(("mode", "value"), MODES)
@pytest.mark.parametrize("name", sorted(GRADIENT_CALLBACKS))
def test_gradient_callbacks_stop_before_the_step_naming_the_layer(
    tmp_path: Path, name: str, mode: str, value: str
) -> None:
    module = Injecting(mode, float(value))
    trainer = _trainer(tmp_path, GRADIENT_CALLBACKS[name]())
    with pytest.raises(RuntimeError, match=r"NaN or inf in layer\(s\) \['conv1'.*\]"):
        trainer.fit(module, rc.loader(32))
    assert trainer.global_step == INJECT_AT  # the bad step was never taken
    assert _finite_except_injected(module)  # nothing spread into the weights


@pytest.mark.parametrize(("mode", "value"), MODES)
def test_proximal_stops_before_its_map_naming_the_layer(
    tmp_path: Path, mode: str, value: str
) -> None:
    module = Injecting(mode, float(value))
    prox = ProximalSparsity(strength=1e-3)
    with pytest.raises(RuntimeError, match=r"ProximalSparsity.*NaN or inf.*'conv1'"):
        _trainer(tmp_path, prox).fit(module, rc.loader(32))
    # the optimizer took step INJECT_AT (its counter moved), the map did not run on its result
    assert module.trainer.global_step == INJECT_AT + 1


@pytest.mark.parametrize(("mode", "value"), MODES)
def test_thresholding_refuses_and_keeps_its_masks(tmp_path: Path, mode: str, value: str) -> None:
    module = Injecting(mode, float(value))
    thresholding = FilterThresholding(threshold=1e-3)
    with pytest.raises(RuntimeError, match=r"FilterThresholding.*'conv1'.*NaN or inf"):
        _trainer(tmp_path, thresholding).fit(module, rc.loader(32))
    assert module.trainer.global_step == STEPS_PER_EPOCH  # at the first epoch end
    assert thresholding.rounds == 0
    assert thresholding.masks
    assert all(bool(m.all()) for m in thresholding.masks.values())


@pytest.mark.parametrize(("mode", "value"), MODES)
def test_monitor_reports_the_layer_instead_of_counting_it_dead(
    tmp_path: Path, mode: str, value: str
) -> None:
    module = Injecting(mode, float(value))
    monitor = SparsityMonitor(histograms=False)
    trainer = _trainer(tmp_path, monitor)
    with pytest.raises(RuntimeError, match=r"SparsityMonitor.*'conv1'.*NaN or inf"):
        trainer.fit(module, rc.loader(32))
    assert "sparsity/conv1/filters" not in trainer.callback_metrics


class KillOneFilter(pl.Callback):
    """At the end of training, kill conv2's filter 0 (something to prune) and, if asked, leave a
    NaN/inf in conv1.
    """

    def __init__(self, value: float | None) -> None:
        self.value = value

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            pl_module.model.conv2.weight[0] = 0.0
            pl_module.model.conv2.bias[0] = 0.0
            if self.value is not None:
                pl_module.model.conv1.weight[0, 0, 0, 0] = self.value


@pytest.mark.parametrize("value", ["nan", "inf", None])
def test_export_refuses_non_finite_weights_naming_the_layer(
    tmp_path: Path, value: str | None
) -> None:
    export = PrunedExport(dirpath=tmp_path / "export", formats=("pt",))
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        callbacks=[KillOneFilter(None if value is None else float(value)), export],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    if value is None:  # control: the same run with finite weights exports
        trainer.fit(rc.LitTiny(), rc.loader(32))
        assert rc.export_widths(export.paths["pt"])["conv2"]["out_channels"] == 11
        return
    with pytest.raises((RuntimeError, ValueError), match=r"NaN or inf.*conv1"):
        trainer.fit(rc.LitTiny(), rc.loader(32))
    assert not (tmp_path / "export").exists() or not list((tmp_path / "export").iterdir())


# min(inf, cap) = cap: capped L1 rightly leaves an inf group unpenalised (the callbacks' gradient
# check catches that case); a NaN must still show
PENALTY_CASES = [
    *[(name, bad) for name in ("l1", "group_lasso", "l1_l2") for bad in ("nan", "inf")],
    ("capped_l1", "nan"),
]


@pytest.mark.parametrize(("name", "bad"), PENALTY_CASES)
def test_penalty_values_do_not_hide_a_non_finite_weight(name: str, bad: str) -> None:
    """The functional penalties, alone and fused: a NaN/inf weight gives a non-finite value (the
    callbacks' guard reads these values), never a finite one such as 0.
    """
    from lightning_sparsity.functional.penalties import PENALTIES, penalty_and_grads

    w = torch.randn(4, 3, 3, 3)
    w[1, 0, 0, 0] = float(bad)
    kwargs: dict[str, Any] = {"cap": 0.5} if name == "capped_l1" else {}
    values, _ = penalty_and_grads(name, [w, torch.randn(2, 3)], ["filter", "filter"], **kwargs)
    assert not bool(torch.isfinite(values[0]))
    assert bool(torch.isfinite(values[1]))
    if name == "l1":
        alone = PENALTIES[name](w)
    elif name == "capped_l1":
        alone = PENALTIES[name](w, 0.5, "filter")
    else:
        alone = PENALTIES[name](w, "filter")
    assert not bool(torch.isfinite(alone))
