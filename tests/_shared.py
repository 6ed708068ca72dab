"""Shared test helpers: one tiny conv net, one LightningModule around it, one Trainer factory.

``conftest.py`` puts this folder on ``sys.path`` (the tests run with ``--import-mode=importlib``),
so a test module imports them with ``from _shared import Net, Tiny, make_trainer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


class Net(nn.Module):
    """conv1 -> BN -> leaky, conv2 (bias, no BN) -> leaky, fc (the output layer), on 1x8x8.

    Leaky ReLUs keep gradients flowing into dead channels, so a dead filter *would* revive if the
    masks were not re-applied."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        x = F.leaky_relu(self.conv2(x), 0.1)
        return self.fc(x.flatten(1))


def dataset(n: int = 32, classes: int = 3, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)
    )


def make_optimizer(name: str, params: Any, lr: float, **kwargs: Any) -> torch.optim.Optimizer:
    """``"sgd"`` (momentum 0.9), ``"adam"``, ``"adamw"``, ``"rmsprop"``; ``kwargs`` such as
    ``fused=True`` or ``foreach=False`` go to the optimizer."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, **{"momentum": 0.9, **kwargs})
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **kwargs)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, **kwargs)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, **kwargs)
    raise ValueError(name)


def make_trainer(tmp_path: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer: one epoch of two batches, no logger, no checkpoints (override any)."""
    options: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "max_epochs": 1,
        "limit_train_batches": 2,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        "accelerator": "cpu",
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)
