"""Linear input features removed one by one: exact, reloadable with weights_only, counted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_sparsity import load_pruned, prune_model, save_pruned, size_report
from lightning_sparsity.models import LeNet5Caffe
from lightning_sparsity.pruning.deploy import save_pt2
from lightning_sparsity.pruning.features import FeatureLinear
from lightning_sparsity.pruning.masks import kill_filters


def sparse_lenet(seed: int = 0) -> nn.Module:
    """LeNet-5-Caffe with conv filters killed and single fc1/fc2 input features zeroed."""
    torch.manual_seed(seed)
    net = LeNet5Caffe().eval()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    names = {m: n for n, m in net.named_modules()}
    kill_filters(net, {names[convs[0]]: [0, 1, 2], names[convs[1]]: list(range(10, 50))})
    with torch.no_grad():
        fc1, fc2 = linears[0], linears[1]
        live = fc1.weight.abs().sum(0) > 0
        cols = live.nonzero().flatten()
        fc1.weight[:, cols[::3]] = 0  # every third live feature, not whole channels
        fc2.weight[:, 100:400] = 0
    return net


def test_dead_features_are_removed_exactly_and_counted() -> None:
    net = sparse_lenet()
    x = torch.randn(4, 1, 28, 28)
    pruned = prune_model(net, x)  # verifies the outputs
    fc = [m for m in pruned.modules() if isinstance(m, nn.Linear)]
    assert isinstance(fc[0], FeatureLinear)
    assert isinstance(fc[1], FeatureLinear)
    live_in = 10 * 4 * 4  # conv2 keeps 10 of 50 filters; 4x4 positions each
    assert fc[0].in_features == live_in - len(range(0, live_in, 3))
    assert fc[1].in_features == 500 - 300
    torch.testing.assert_close(pruned(x), net(x), rtol=1e-5, atol=1e-5)
    report = size_report(net, pruned, x)
    assert report.architecture(after=False) == "20-50-800-500"
    assert report.architecture() == f"17-10-{fc[0].in_features}-200"
    assert report.params_after == sum(p.numel() for p in pruned.parameters())


def test_feature_selection_reloads_with_weights_only_and_exports(tmp_path: Path) -> None:
    net = sparse_lenet(1)
    x = torch.randn(3, 1, 28, 28)
    pruned = prune_model(net, x)
    path = save_pruned(pruned, tmp_path / "p.pt", example_inputs=(x,))
    raw = torch.load(path, weights_only=True)  # the kept indices are plain tensors in the file
    keys = [k for k in raw["state_dict"] if k.endswith("kept_features")]
    assert len(keys) == 2
    fresh = LeNet5Caffe()
    loaded = load_pruned(path, fresh).eval()
    torch.testing.assert_close(loaded(x), net(x), rtol=1e-5, atol=1e-5)
    program = save_pt2(pruned, (x,), tmp_path / "p.pt2")
    out = torch.export.load(program).module()(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)


def test_features_can_be_kept_and_a_wrong_file_is_refused(tmp_path: Path) -> None:
    net = sparse_lenet(2)
    x = torch.randn(2, 1, 28, 28)
    kept = prune_model(net, x, drop_features=False)
    assert not any(isinstance(m, FeatureLinear) for m in kept.modules())
    path = save_pruned(prune_model(net, x), tmp_path / "p.pt", example_inputs=(x,))
    wrong = nn.Sequential(nn.Conv2d(1, 20, 5))  # not the architecture that was pruned
    with pytest.raises(ValueError, match="does not have"):
        load_pruned(path, wrong)


def two_epochs(callbacks: list) -> Any:
    """A quiet two-epoch Trainer on the CPU."""
    import lightning.pytorch as pl

    return pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def test_thresholding_kills_single_input_features_that_the_export_removes(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_sparsity import ClassificationModule, FilterThresholding, PrunedExport

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)))
    module = ClassificationModule("lenet5", optimizer="sgd", lr=1e-9)  # weights barely move
    with torch.no_grad():
        fc1 = module.model.get_submodule("classifier.1")
        fc1.weight[:, 7] *= 1e-4  # one position of one conv2 channel, not the whole channel
    thresholding = FilterThresholding(threshold=0.01, relative=True, features=True)
    export = PrunedExport(dirpath=tmp_path, formats=("pt",), allow_unchanged=True)
    trainer = two_epochs([thresholding, export])
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert thresholding.feature_masks["classifier.1"].tolist().count(False) == 1
    assert not thresholding.feature_masks["classifier.1"][7]
    pruned_fc1 = torch.load(export.paths["pt"], weights_only=True)["state_dict"]
    assert pruned_fc1["classifier.1.kept_features"].numel() == 799
    assert export.report.architecture().split("-")[2] == "799"


def test_a_regularizer_on_linear_columns_empties_features_the_export_removes(
    tmp_path: Path,
) -> None:
    """Proximal group L1 on fc1's input columns (granularity "channel") sets the weak columns
    (every third, scaled by 0.01: single positions, not whole conv2 channels) to exactly zero,
    and only those; the thresholding kills them at threshold 0 after the first epoch, and the
    export drops them one by one (its first-batch and final checks compare outputs).
    """
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_sparsity import (
        ClassificationModule,
        FilterThresholding,
        ProximalSparsity,
        PrunedExport,
    )

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    module = ClassificationModule("lenet5", optimizer="sgd", lr=0.05)
    with torch.no_grad():
        module.model.get_submodule("classifier.1").weight[:, ::3] *= 0.01
    proximal = ProximalSparsity(
        penalty="l1", strength=0.3, granularity="channel", layers=["classifier.1"]
    )
    thresholding = FilterThresholding(
        threshold=0.0, features=True, layers=["classifier.1"], max_rounds=1
    )
    export = PrunedExport(dirpath=tmp_path, formats=("pt",))
    trainer = two_epochs([proximal, thresholding, export])
    trainer.fit(module, DataLoader(data, batch_size=16))
    expected = torch.ones(800, dtype=torch.bool)
    expected[::3] = False
    assert torch.equal(thresholding.feature_masks["classifier.1"], expected)
    assert export.report.architecture() == "20-50-533-500"
    state = torch.load(export.paths["pt"], weights_only=True)["state_dict"]
    assert state["classifier.1.kept_features"].tolist() == expected.nonzero().flatten().tolist()
