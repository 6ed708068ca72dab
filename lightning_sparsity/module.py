"""A small image-classification LightningModule for the reference models."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_sparsity.checkpoint import PrunedCheckpointMixin
from lightning_sparsity.models import available_models, build_model
from lightning_sparsity.validation import check_choice, check_float, check_int, fail

OPTIMIZERS = ("sgd", "adam", "rmsprop")
LR_SCHEDULES = ("none", "cosine", "step")


class ClassificationModule(PrunedCheckpointMixin, pl.LightningModule):
    """Cross-entropy classification of any network, with top-1 accuracy from torchmetrics.

    The network is ``self.model``; the sparsity callbacks and the export act on it. Through
    [`PrunedCheckpointMixin`][lightning_sparsity.PrunedCheckpointMixin], ``load_from_checkpoint``
    also loads a
    physically pruned checkpoint (``PrunedExport``'s ``"ckpt"``) of a model built by name, at its
    pruned widths.

    Args:
        model: a network, or a [`build_model`][lightning_sparsity.build_model] name
            (``"lenet5"``, ``"vgg16"``, ``"resnet20"``, ``"resnet56"``, ``"wrn-28-10"``...).
        num_classes: number of classes (the output width of a model built by name).
        optimizer: ``"sgd"``, ``"adam"`` or ``"rmsprop"``.
        lr: learning rate.
        momentum: momentum of SGD and RMSProp (Adam keeps its default betas).
        nesterov: Nesterov momentum for SGD.
        weight_decay: L2 weight decay, on every parameter.
        lr_schedule: ``"none"``; ``"cosine"`` (annealed to 0 over the whole run, per step); or
            ``"step"`` (multiplied by ``gamma`` at each epoch in ``milestones``).
        milestones: epochs of the ``"step"`` schedule.
        gamma: factor of the ``"step"`` schedule.
        model_kwargs: extra arguments of ``build_model`` (e.g. ``{"dropout": 0.3}``).

    Logged: ``train/loss`` (per step), ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``,
    ``test/acc`` (per epoch).

    Raises:
        ValueError: an unknown model, optimizer or schedule name, or an out-of-range number.
        TypeError: ``model`` is neither an ``nn.Module`` nor a string.

    Example::

        >>> module = ClassificationModule("lenet5", optimizer="adam", lr=1e-3)
        >>> module(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        model: nn.Module | str = "lenet5",
        num_classes: int = 10,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        lr_schedule: str = "none",
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.milestones = list(milestones or [])
        self.gamma = gamma
        self._validate(model, num_classes)
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        if isinstance(model, str):
            model = build_model(model, num_classes=num_classes, **(model_kwargs or {}))
        self.model = model
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def _validate(self, model: Any, num_classes: int) -> None:
        owner = "ClassificationModule"
        if not isinstance(model, nn.Module | str):
            fail(owner, "model", model, f"an nn.Module or a model name {available_models()}",
                 got=type(model).__name__, error=TypeError)  # fmt: skip
        check_int(num_classes, owner=owner, arg="num_classes", low=1)
        check_choice(self.optimizer_name, OPTIMIZERS, owner=owner, arg="optimizer")
        check_float(self.lr, owner=owner, arg="lr", low=0.0, strict_low=True)
        check_float(self.momentum, owner=owner, arg="momentum", low=0.0, high=1.0, strict_high=True)
        check_float(self.weight_decay, owner=owner, arg="weight_decay", low=0.0)
        check_choice(self.lr_schedule, LR_SCHEDULES, owner=owner, arg="lr_schedule")
        m = self.milestones
        if self.lr_schedule == "step" and (
            not m or any(x < 1 for x in m) or list(m) != sorted(set(m))
        ):
            fail(owner, "milestones", m, "increasing positive epochs for `lr_schedule='step'`",
                 hint="e.g. `milestones=[40, 80, 120, 160]`.")  # fmt: skip
        check_float(self.gamma, owner=owner, arg="gamma", low=0.0, high=1.0, strict_low=True)
        if self.nesterov and (self.optimizer_name != "sgd" or self.momentum == 0):
            fail(owner, "nesterov", True,
                 "`nesterov=True` only with `optimizer='sgd'` and `momentum` > 0")  # fmt: skip

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(
        self, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), logits, y

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        loss, logits, y = self._step(batch)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits, y = self._step(batch)
        self.val_acc(logits, y)
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits, y = self._step(batch)
        self.test_acc(logits, y)
        self.log("test/loss", loss)
        self.log("test/acc", self.test_acc)

    @override
    def configure_optimizers(self) -> Any:
        params = self.parameters()
        optimizer: torch.optim.Optimizer
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(
                params,
                lr=self.lr,
                momentum=self.momentum,
                nesterov=self.nesterov,
                weight_decay=self.weight_decay,
            )
        elif self.optimizer_name == "adam":
            optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            optimizer = torch.optim.RMSprop(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        if self.lr_schedule == "none":
            return optimizer
        if self.lr_schedule == "cosine":
            steps = max(1, int(self.trainer.estimated_stepping_batches))
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": cosine, "interval": "step"},
            }
        step = torch.optim.lr_scheduler.MultiStepLR(optimizer, self.milestones, gamma=self.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": step, "interval": "epoch"}}
