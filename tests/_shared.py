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
    masks were not re-applied.
    """

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


class GroupedNet(nn.Module):
    """conv-BN-ReLU, depthwise conv, grouped 1x1 conv-BN-ReLU, pool, flatten, Linear,
    (LayerNorm,) ReLU, Linear: the coupled layers a width file must get right, on 3x8x8.
    """

    def __init__(
        self,
        c1: int = 8,
        c2: int = 12,
        hidden: int = 16,
        groups: int = 2,
        layer_norm: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.dw = nn.Conv2d(c1, c1, 3, padding=1, groups=c1, bias=False)
        self.conv2 = nn.Conv2d(c1, c2, 1, groups=groups)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(c2 * 4, hidden)
        self.ln = nn.LayerNorm(hidden) if layer_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(self.dw(x))))
        x = self.pool(x).flatten(1)
        return self.fc2(torch.relu(self.ln(self.fc1(x))))


def dataset(n: int = 32, classes: int = 3, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)
    )


def make_optimizer(name: str, params: Any, lr: float, **kwargs: Any) -> torch.optim.Optimizer:
    """``"sgd"`` (momentum 0.9), ``"adam"``, ``"adamw"``, ``"rmsprop"``; ``kwargs`` such as
    ``fused=True`` or ``foreach=False`` go to the optimizer.
    """
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
