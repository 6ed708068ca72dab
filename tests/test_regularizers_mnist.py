"""The four seed methods on LeNet-5-Caffe with real MNIST: each drives whole filters to exactly zero
(or below 1e-6), while the same run without the method does not.

All runs: RMSProp (lr 1e-3, no momentum), batch 32, 3 epochs of 70 steps (210 optimizer steps)
on a fixed 16k-image subset of the training set, one thread; accuracy on 2000 test images.

What is honest here: a (sub)gradient penalty (l1/l2, L1 + capped L1) shrinks filters towards zero
but, with an adaptive optimizer, leaves them oscillating at an amplitude set by the learning rate
(about 1e-3 to 3e-2 in L2 norm here, never below 1e-6). The papers remove such filters
explicitly (Berthelier et al.: "irrelevant filters removed"; Kumar et al.: "insignificant filters
removed directly"), so those two methods run with :class:`FilterThresholding` (absolute L2 norm
threshold 0.05, at each epoch end) and the baseline runs with the *same* thresholding: whatever it
kills there is due to the penalty. The proximal L0 method and variable splitting produce exact zeros
by construction (the proximal map; ``W = U`` at the end), and their baseline is plain training
(plus, for splitting, the same final hard threshold applied to the baseline's weights).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparsity import (
    ClassificationModule,
    FilterThresholding,
    ProximalSparsity,
    SparsityRegularizer,
    VariableSplitting,
)

pytestmark = pytest.mark.slow

HIDDEN = (
    "features.0",
    "features.3",
    "classifier.1",
)  # the output layer classifier.3 is never pruned
THRESHOLD = 0.05
STEPS, EPOCHS = 70, 3
SPLIT_LAMBDA, SPLIT_BETA, SPLIT_GROWTH = 1e-4, 1.0, 1.25


@pytest.fixture(scope="module")
def mnist(data_root: Path) -> dict[str, torch.Tensor]:
    from torchvision.datasets import MNIST

    def load(train: bool, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ds = MNIST(str(data_root), train=train, download=True)  # extracts the offline archives
        x = (ds.data[:n].float() / 255 - 0.1307) / 0.3081
        return x.unsqueeze(1), ds.targets[:n]

    x, y = load(True, 16_000)
    tx, ty = load(False, 2_000)
    return {"x": x, "y": y, "test_x": tx, "test_y": ty}


def train(mnist: dict[str, torch.Tensor], callbacks: list[pl.Callback], seed: int = 0) -> nn.Module:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        module = ClassificationModule("lenet5", optimizer="rmsprop", lr=1e-3, momentum=0.0)
        loader = DataLoader(
            TensorDataset(mnist["x"], mnist["y"]),
            batch_size=32,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        pl.Trainer(
            max_epochs=EPOCHS,
            limit_train_batches=STEPS,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        ).fit(module, train_dataloaders=loader)
    finally:
        torch.set_num_threads(threads)
    return module.model


def filter_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight.detach().flatten(1).norm(dim=1) for n in HIDDEN}


def zero_filters(model: nn.Module, below: float = 1e-6) -> dict[str, int]:
    return {n: int((norms < below).sum()) for n, norms in filter_norms(model).items()}


def accuracy(model: nn.Module, mnist: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float((model(mnist["test_x"]).argmax(1) == mnist["test_y"]).float().mean())


@pytest.fixture(scope="module")
def baseline(mnist: dict[str, torch.Tensor]) -> nn.Module:
    """Plain training with the same thresholding the penalty methods use (it kills nothing)."""
    return train(mnist, [FilterThresholding(threshold=THRESHOLD)])


def check(
    name: str, model: nn.Module, baseline: nn.Module, mnist: dict[str, Any], exact: bool = True
) -> dict[str, int]:
    zeros = zero_filters(model)
    exact_zeros = {n: int((norms == 0).sum()) for n, norms in filter_norms(model).items()}
    base = zero_filters(baseline)
    acc, base_acc = accuracy(model, mnist), accuracy(baseline, mnist)
    print(
        f"\n{name}: filters < 1e-6 {zeros} (exactly 0: {exact_zeros}), acc {acc:.3f}; "
        f"baseline {base}, acc {base_acc:.3f}"
    )
    assert sum(base.values()) == 0, base
    assert sum(zeros.values()) > 0, zeros
    if exact:
        assert exact_zeros == zeros
    sizes = {n: norms.numel() for n, norms in filter_norms(model).items()}
    assert all(zeros[n] < sizes[n] for n in HIDDEN), "a layer lost every filter"
    # measured on this setting: baseline 0.922-0.924; l1/l2 0.901, L1 + capped L1 0.914,
    # proximal L0 0.928, splitting 0.914: a method may cost at most 4 points against the baseline
    assert base_acc > 0.90, base_acc
    assert acc > base_acc - 0.04, (acc, base_acc)
    return zeros


def test_baseline_keeps_every_filter(baseline: nn.Module) -> None:
    smallest = min(float(n.min()) for n in filter_norms(baseline).values())
    assert smallest > 5 * THRESHOLD  # far from the threshold: it decides nothing in the baseline


def test_l1_l2_regularizer_with_thresholding(mnist: dict[str, Any], baseline: nn.Module) -> None:
    callbacks = [SparsityRegularizer("l1_l2", 0.05), FilterThresholding(threshold=THRESHOLD)]
    check("l1/l2 (Berthelier)", train(mnist, callbacks), baseline, mnist)


def test_l1_plus_capped_l1_with_thresholding(mnist: dict[str, Any], baseline: nn.Module) -> None:
    callbacks = [
        SparsityRegularizer("l1", 1e-4),
        SparsityRegularizer("capped_l1", 1e-3, cap=2.0),
        FilterThresholding(threshold=THRESHOLD),
    ]
    check("L1 + capped L1 (Kumar)", train(mnist, callbacks), baseline, mnist)


def test_proximal_l0_rmsprop(mnist: dict[str, Any], baseline: nn.Module) -> None:
    model = train(mnist, [ProximalSparsity(0.02, "l0", "filter")])
    check("proximal L0, RMSProp metric (ICCAIRO 2019)", model, baseline, mnist)


def test_variable_splitting(mnist: dict[str, Any], baseline: nn.Module) -> None:
    split = VariableSplitting(SPLIT_LAMBDA, SPLIT_BETA, SPLIT_GROWTH, growth_every_n_epochs=1)
    model = train(mnist, [split])
    final_threshold = math.sqrt(2 * SPLIT_LAMBDA / (SPLIT_BETA * SPLIT_GROWTH ** (EPOCHS - 1)))
    assert split.threshold == pytest.approx(final_threshold)
    # the baseline under the same final hard threshold (what U would be without the l2,1 term
    # and the coupling) keeps every filter
    projected = type(baseline)()
    projected.load_state_dict(baseline.state_dict())
    with torch.no_grad():
        for n in HIDDEN:
            w = projected.get_submodule(n).weight
            w.mul_(w.abs() > final_threshold)
    check("l0 + l2,1 variable splitting (Bui)", model, projected, mnist)
