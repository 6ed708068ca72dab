"""ClassificationModule in a real Trainer: logged keys and values, optimizers, schedules, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparsity.checkpoint import save_pruned_checkpoint
from lightning_sparsity.models import LeNet5Caffe
from lightning_sparsity.module import ClassificationModule


def trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        default_root_dir=tmp_path,
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> DataLoader[Any]:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def test_test_metrics_are_the_known_answer(tmp_path: Path) -> None:
    # identity "classifier": predicts argmax(x); 3 of the 4 samples are right
    net = nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.copy_(torch.eye(2))
        net.bias.zero_()
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 2.0]])
    y = torch.tensor([0, 1, 1, 1])
    module = ClassificationModule(net, num_classes=2)
    (result,) = trainer(tmp_path).test(module, loader(x, y, batch_size=4))
    assert result["test/acc"] == pytest.approx(0.75)
    assert result["test/loss"] == pytest.approx(F.cross_entropy(x, y).item(), rel=1e-6)
    assert "model" not in module.hparams  # an nn.Module is not a hyperparameter


def test_fit_logs_train_and_val_and_learns(tmp_path: Path) -> None:
    torch.manual_seed(0)
    y = torch.randint(0, 2, (128,))
    x = 0.5 * torch.randn(128, 1, 28, 28)
    x[y == 0, :, :14] += 1.0  # class 0: bright top half, class 1: bright bottom half
    x[y == 1, :, 14:] += 1.0
    module = ClassificationModule("lenet5", optimizer="adam", lr=1e-3)
    fit = trainer(tmp_path, max_epochs=2)
    fit.fit(module, loader(x, y, 32), loader(x, y, 64))
    metrics = fit.callback_metrics
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(metrics)
    assert metrics["val/acc"] > 0.9, metrics["val/acc"]
    assert isinstance(module.model, LeNet5Caffe)
    assert module.hparams["model"] == "lenet5"


def test_checkpoint_round_trip_rebuilds_named_model(tmp_path: Path) -> None:
    module = ClassificationModule("resnet20", optimizer="rmsprop", lr=1e-3, momentum=0.5)
    fit = trainer(tmp_path, limit_train_batches=1, limit_val_batches=0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    fit.fit(module, loader(x, y, 4))
    path = tmp_path / "m.ckpt"
    fit.save_checkpoint(path)
    restored = ClassificationModule.load_from_checkpoint(path).eval()
    module.eval()
    torch.testing.assert_close(restored(x), module(x))
    assert restored.optimizer_name == "rmsprop"


def test_pruned_checkpoint_loads_at_pruned_widths(tmp_path: Path) -> None:
    module = ClassificationModule("lenet5", optimizer="adam", lr=1e-3).eval()
    features = module.model.features
    keep = torch.arange(0, 20, 2)  # conv1 keeps 10 of its 20 filters, by hand
    conv1, conv2 = nn.Conv2d(1, 10, 5), nn.Conv2d(10, 50, 5)
    with torch.no_grad():
        conv1.weight.copy_(features[0].weight[keep])
        conv1.bias.copy_(features[0].bias[keep])
        conv2.weight.copy_(features[3].weight[:, keep])
        conv2.bias.copy_(features[3].bias)
    features[0], features[3] = conv1, conv2
    path = save_pruned_checkpoint(module, tmp_path / "pruned.ckpt")

    restored = ClassificationModule.load_from_checkpoint(path).eval()
    assert restored.model.features[0].out_channels == 10
    assert restored.model.features[3].in_channels == 10
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(restored(x), module(x))
    assert restored.hparams["optimizer"] == "adam"


@pytest.mark.parametrize(
    ("kwargs", "cls", "expected"),
    [
        (dict(optimizer="sgd", lr=0.1, momentum=0.8, nesterov=True), torch.optim.SGD, 0.8),
        (dict(optimizer="adam", lr=1e-3, weight_decay=5e-4), torch.optim.Adam, None),
        (dict(optimizer="rmsprop", lr=1e-3, momentum=0.5), torch.optim.RMSprop, 0.5),
    ],
)
def test_optimizer_choice(kwargs: dict[str, Any], cls: type, expected: float | None) -> None:
    module = ClassificationModule(nn.Linear(2, 2), num_classes=2, **kwargs)
    optimizer = module.configure_optimizers()
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert group["lr"] == kwargs["lr"]
    assert group["weight_decay"] == kwargs.get("weight_decay", 0.0)
    if expected is not None:
        assert group["momentum"] == expected
    assert group.get("nesterov", False) == kwargs.get("nesterov", False)


def test_lr_schedules_in_a_trainer(tmp_path: Path) -> None:
    x, y = torch.randn(16, 2), torch.randint(0, 2, (16,))
    cosine = ClassificationModule(nn.Linear(2, 2), num_classes=2, lr=0.1, lr_schedule="cosine")
    fit = trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    fit.fit(cosine, loader(x, y, 4))
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)

    step = ClassificationModule(
        nn.Linear(2, 2), num_classes=2, lr=0.1, lr_schedule="step", milestones=[1, 2], gamma=0.5
    )
    fit = trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    fit.fit(step, loader(x, y, 4))
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * 0.5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            dict(optimizer="adagrad"),
            ValueError,
            r"optimizer='adagrad'.*\['sgd', 'adam', 'rmsprop'\]",
        ),
        (dict(lr=0.0), ValueError, r"expected `lr` finite and > 0, got 0.0"),
        (dict(momentum=1.0), ValueError, r"`momentum` finite and >= 0 and < 1"),
        (dict(weight_decay=-1.0), ValueError, r"`weight_decay` finite and >= 0"),
        (dict(lr_schedule="linear"), ValueError, r"\['none', 'cosine', 'step'\]"),
        (dict(lr_schedule="step"), ValueError, r"milestones=\[\].*HINT"),
        (dict(lr_schedule="step", milestones=[5, 3]), ValueError, r"increasing"),
        (dict(gamma=0.0), ValueError, r"`gamma` finite and > 0 and <= 1"),
        (dict(optimizer="adam", nesterov=True), ValueError, r"only with `optimizer='sgd'`"),
        (dict(num_classes=0), ValueError, r"`num_classes` >= 1"),
        (dict(model="resnet18"), ValueError, r"expected one of .*'lenet5'"),
        (dict(model=3), TypeError, r"expected an nn.Module or a model name"),
    ],
)
def test_bad_input(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ClassificationModule(**kwargs)
