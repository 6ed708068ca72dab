"""The sparsity callbacks give the same result in any order of ``Trainer(callbacks=[...])``.

Two levels: for all 720 permutations of the six callbacks, the order in which their phases run
(driven hook by hook as Lightning drives them, in list order) is the canonical one; for a sample
of permutations, real Trainers end with bit-identical masks, logged values, ``U`` and exported
files. Then the splitting method's observers: the monitor, checkpoints and the export see ``U``.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _shared import Net, dataset, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_sparsity import (
    FilterThresholding,
    ProximalSparsity,
    PrunedExport,
    SparsityMonitor,
    SparsityRegularizer,
    VariableSplitting,
    load_pruned,
)
from lightning_sparsity.callbacks._order import OrderedCallback

CLASSES = (
    SparsityRegularizer,
    ProximalSparsity,
    VariableSplitting,
    FilterThresholding,
    SparsityMonitor,
    PrunedExport,
)


def six(tmp_path: Path) -> list[pl.Callback]:
    return [
        SparsityRegularizer("group_lasso", 1e-2),
        ProximalSparsity(2e-2, penalty="l0", granularity="filter", log_every_n_steps=1),
        VariableSplitting(1e-3, beta=1.0, log_every_n_steps=1),
        FilterThresholding(criterion="l1", fraction=0.25),
        SparsityMonitor(log_every_n_steps=1),
        PrunedExport(dirpath=tmp_path / "export", formats=("pt",)),
    ]


def test_every_permutation_runs_the_phases_in_one_order(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    for cls in CLASSES:
        for phase in ("before_step", "batch_end", "epoch_end", "train_end"):

            def record(self: Any, trainer: Any, *args: Any, _phase: str = phase) -> None:
                calls.append((_phase, type(self).__name__))

            monkeypatch.setattr(cls, f"_{phase}", record)
    callbacks = six(Path("unused"))
    sequences = set()
    for perm in itertools.permutations(callbacks):
        calls.clear()
        for cb in perm:
            cb._reset_order()
        trainer = SimpleNamespace(callbacks=list(perm), global_step=0, current_epoch=0)
        optimizer = object()
        for epoch in range(2):  # as Lightning: each hook on every callback, in list order
            trainer.current_epoch = epoch
            for batch_idx in range(2):
                for cb in perm:
                    cb.on_before_optimizer_step(trainer, None, optimizer)  # type: ignore[arg-type]
                trainer.global_step += 1
                for cb in perm:
                    cb.on_train_batch_end(trainer, None, None, None, batch_idx)  # type: ignore[arg-type]
            for cb in perm:
                cb.on_train_epoch_end(trainer, None)  # type: ignore[arg-type]
        for cb in perm:
            cb.on_train_end(trainer, None)  # type: ignore[arg-type]
        sequences.add(tuple(calls))
    assert len(sequences) == 1
    (sequence,) = sequences
    assert len(sequence) == 2 * 2 * 6 * 2 + 2 * 6 + 6  # every phase once per event
    # the canonical order of the phases that matter
    before = [name for phase, name in sequence[:6]]
    assert before.index("SparsityRegularizer") < before.index("FilterThresholding")
    assert before.index("VariableSplitting") < before.index("FilterThresholding")
    ends = [name for phase, name in sequence if phase == "epoch_end"][:6]
    assert ends.index("FilterThresholding") < ends.index("VariableSplitting")
    assert ends.index("VariableSplitting") < ends.index("SparsityMonitor")
    final = [name for phase, name in sequence if phase == "train_end"]
    assert final[0] == "VariableSplitting"
    assert final[-1] == "PrunedExport"
    assert final.index("FilterThresholding") < final.index("PrunedExport")


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = Net()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(dataset(24), batch_size=8)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def fit_in_order(tmp_path: Path, order: list[int]) -> dict[str, Any]:
    torch.manual_seed(0)
    callbacks = six(tmp_path)
    logger = CSVLogger(tmp_path, name="log", version=0)
    trainer = make_trainer(
        tmp_path,
        [callbacks[i] for i in order],
        max_epochs=3,
        limit_train_batches=3,
        logger=logger,
        log_every_n_steps=1,
    )
    module = Module()
    trainer.fit(module)
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text()
    exported = torch.load(tmp_path / "export" / "pruned.pt", weights_only=True)
    return {
        "masks": callbacks[3].masks,  # type: ignore[attr-defined]
        "U": callbacks[2].U,  # type: ignore[attr-defined]
        "metrics": metrics,
        "exported": exported,
        "weights": {k: v.clone() for k, v in module.state_dict().items()},
    }


def assert_identical(a: Any, b: Any) -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor)
        assert a.dtype == b.dtype
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_identical(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    else:
        assert a == b


def test_permutations_of_six_callbacks_give_identical_runs(tmp_path: Path) -> None:
    rng = random.Random(0)
    orders = [list(range(6)), list(reversed(range(6)))]
    orders += [rng.sample(range(6), 6) for _ in range(4)]
    runs = [fit_in_order(tmp_path / str(i), order) for i, order in enumerate(orders)]
    reference = runs[0]
    assert any(not bool(m.all()) for m in reference["masks"].values())  # filters were killed
    assert "sparsity/conv1/filters" in reference["metrics"]
    for run in runs[1:]:
        assert_identical(run, reference)


def test_export_placed_before_splitting_exports_u(tmp_path: Path) -> None:
    """``[PrunedExport, VariableSplitting]``: ``W = U`` still happens first, so the exported
    network computes what the final (projected) model computes.
    """
    torch.manual_seed(0)
    split = VariableSplitting(5e-2, beta=1.0)
    export = PrunedExport(dirpath=tmp_path, formats=("pt",), allow_unchanged=True)
    module = Module()
    make_trainer(tmp_path, [export, split], max_epochs=1, limit_train_batches=3).fit(module)
    for name, u in split.U.items():
        assert torch.equal(module.model.get_submodule(name).weight, u)  # W = U happened
    assert sum(int((u == 0).sum()) for u in split.U.values()) > 0
    reloaded = load_pruned(tmp_path / "pruned.pt", Net()).eval()
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(reloaded(x), module.model.eval()(x))


def test_monitor_counts_the_sparse_copy_u(tmp_path: Path) -> None:
    torch.manual_seed(0)
    split = VariableSplitting(5e-2, beta=1.0)
    monitor = SparsityMonitor()
    module = Module()
    trainer = make_trainer(
        tmp_path, [monitor, split], max_epochs=1, limit_train_batches=3, logger=CSVLogger(tmp_path)
    )
    trainer.fit(module)
    for name in ("conv1", "conv2"):
        u = split.U[name]
        density = float((u != 0).float().mean())
        assert density < 1.0  # U is sparser than W
        logged = float(trainer.callback_metrics[f"sparsity/{name}/density"])
        assert logged == pytest.approx(density)


def test_checkpoints_hold_u_and_resume_restores_w(tmp_path: Path) -> None:
    def fit(epochs: int, ckpt: Path | None, root: Path) -> tuple[VariableSplitting, Module]:
        torch.manual_seed(0)
        split = VariableSplitting(5e-2, beta=1.0, final_projection=True)
        saver = ModelCheckpoint(dirpath=root, save_last=True, every_n_epochs=1)
        module = Module()
        trainer = make_trainer(
            root,
            [split, saver],
            max_epochs=epochs,
            limit_train_batches=3,
            enable_checkpointing=True,
        )
        trainer.fit(module, ckpt_path=ckpt)
        return split, module

    fit(1, None, tmp_path / "a")
    checkpoint = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("VariableSplitting"))
    for name, u in state["U"].items():
        weight = checkpoint["state_dict"][f"model.{name}.weight"]
        assert torch.equal(weight, u)  # the checkpoint's model is the sparse copy
        assert not torch.equal(state["W"][name], u)  # W, dense, is kept beside it
    _, resumed = fit(2, tmp_path / "a" / "last.ckpt", tmp_path / "a")
    _, straight = fit(2, None, tmp_path / "b")
    assert_identical(resumed.state_dict(), straight.state_dict())


def test_splitting_schedule_ending_at_zero_keeps_the_l0_sparsity(tmp_path: Path) -> None:
    """Lambda > 0 in epoch 0, then 0 (a fine-tuning phase): the final W = U keeps the support."""
    torch.manual_seed(0)
    split = VariableSplitting(lambda epoch: 5e-2 if epoch == 0 else 0.0, beta=1.0)
    supports: list[dict[str, Tensor]] = []

    class Probe(pl.Callback):
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            supports.append({n: (u != 0).clone() for n, u in split.U.items()})

    module = Module()
    make_trainer(tmp_path, [Probe(), split], max_epochs=3, limit_train_batches=3).fit(module)
    zeros = 0
    for name, support in supports[0].items():
        weight = module.model.get_submodule(name).weight
        assert torch.count_nonzero(weight[~support]) == 0  # outside epoch 0's support: zero
        assert torch.equal(supports[-1][name], support)  # the support stayed frozen
        zeros += int((~support).sum())
    assert zeros > 0
    assert split.support_threshold == pytest.approx((2 * 5e-2 / 1.0) ** 0.5)


def test_ordered_callbacks_are_all_the_sparsity_callbacks() -> None:
    for cls in CLASSES:
        assert issubclass(cls, OrderedCallback)
