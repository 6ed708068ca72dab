"""lightning-sparsity: train CNNs to exact filter sparsity with Lightning callbacks.

Then export a physically smaller model whose outputs equal the trained one's.

Public names are imported lazily, so ``import lightning_sparsity`` stays cheap and never imports
torchvision (only [`lightning_sparsity.data`][lightning_sparsity.data] and the examples do).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # callbacks
    "SparsityRegularizer": "lightning_sparsity.callbacks.regularizer",
    "ProximalSparsity": "lightning_sparsity.callbacks.proximal",
    "VariableSplitting": "lightning_sparsity.callbacks.splitting",
    "FilterThresholding": "lightning_sparsity.callbacks.thresholding",
    "SparsityMonitor": "lightning_sparsity.callbacks.monitor",
    "SparsityBudget": "lightning_sparsity.callbacks.budget",
    "PrunedExport": "lightning_sparsity.callbacks.export",
    # physical pruning
    "prune_model": "lightning_sparsity.pruning.export",
    "dead_channels": "lightning_sparsity.pruning.export",
    "PruneReport": "lightning_sparsity.pruning.report",
    "size_report": "lightning_sparsity.pruning.report",
    "save_pruned": "lightning_sparsity.pruning.serialization",
    "load_pruned": "lightning_sparsity.pruning.serialization",
    "PrunedCheckpointMixin": "lightning_sparsity.checkpoint",
    "save_pruned_checkpoint": "lightning_sparsity.checkpoint",
    "save_pt2": "lightning_sparsity.pruning.deploy",
    "save_onnx": "lightning_sparsity.pruning.deploy",
    # models and the classification module
    "build_model": "lightning_sparsity.models",
    "LeNet5Caffe": "lightning_sparsity.models",
    "VGG16CIFAR": "lightning_sparsity.models",
    "ResNetCIFAR": "lightning_sparsity.models",
    "WideResNet": "lightning_sparsity.models",
    # datamodules (torchvision is imported only when one of these is used)
    "MNISTDataModule": "lightning_sparsity.data",
    "FashionMNISTDataModule": "lightning_sparsity.data",
    "CIFAR10DataModule": "lightning_sparsity.data",
    "build_datamodule": "lightning_sparsity.data",
    "ClassificationModule": "lightning_sparsity.module",
    # layer selection
    "select_layers": "lightning_sparsity.selection",
}

__all__ = [
    "VGG16CIFAR",
    "CIFAR10DataModule",
    "ClassificationModule",
    "FashionMNISTDataModule",
    "FilterThresholding",
    "LeNet5Caffe",
    "MNISTDataModule",
    "ProximalSparsity",
    "PruneReport",
    "PrunedCheckpointMixin",
    "PrunedExport",
    "ResNetCIFAR",
    "SparsityBudget",
    "SparsityMonitor",
    "SparsityRegularizer",
    "VariableSplitting",
    "WideResNet",
    "build_datamodule",
    "build_model",
    "dead_channels",
    "load_pruned",
    "prune_model",
    "save_onnx",
    "save_pruned",
    "save_pruned_checkpoint",
    "save_pt2",
    "select_layers",
    "size_report",
]

if TYPE_CHECKING:  # pragma: no cover
    from lightning_sparsity.callbacks.budget import SparsityBudget
    from lightning_sparsity.callbacks.export import PrunedExport
    from lightning_sparsity.callbacks.monitor import SparsityMonitor
    from lightning_sparsity.callbacks.proximal import ProximalSparsity
    from lightning_sparsity.callbacks.regularizer import SparsityRegularizer
    from lightning_sparsity.callbacks.splitting import VariableSplitting
    from lightning_sparsity.callbacks.thresholding import FilterThresholding
    from lightning_sparsity.checkpoint import PrunedCheckpointMixin, save_pruned_checkpoint
    from lightning_sparsity.data import (
        CIFAR10DataModule,
        FashionMNISTDataModule,
        MNISTDataModule,
        build_datamodule,
    )
    from lightning_sparsity.models import (
        VGG16CIFAR,
        LeNet5Caffe,
        ResNetCIFAR,
        WideResNet,
        build_model,
    )
    from lightning_sparsity.module import ClassificationModule
    from lightning_sparsity.pruning.deploy import save_onnx, save_pt2
    from lightning_sparsity.pruning.export import dead_channels, prune_model
    from lightning_sparsity.pruning.report import PruneReport, size_report
    from lightning_sparsity.pruning.serialization import load_pruned, save_pruned
    from lightning_sparsity.selection import select_layers


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_sparsity' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
