"""The papers' reference architectures, built from plain ``torch.nn`` layers.

Every model is ``torch.fx``-traceable (no data-dependent control flow; residual sums are written
``out = out + shortcut``) because the coupling analysis and the physical export trace them.

>>> model = build_model("lenet5")
>>> sum(p.numel() for p in model.parameters())
431080
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_sparsity.validation import fail

#: Conv widths of VGG-16 for CIFAR ("M" = 2x2 max-pool), as in Li et al. 2017 / cifar.torch.
VGG16_CFG: tuple[int | str, ...] = (
    *(64, 64, "M", 128, 128, "M", 256, 256, 256, "M"),
    *(512, 512, 512, "M", 512, 512, 512, "M"),
)


class LeNet5Caffe(nn.Module):
    """LeNet-5-Caffe for 1x28x28 inputs.

    Layers: conv 1->20 5x5, pool, conv 20->50 5x5, pool, fc 800->500, fc 500->10 (431,080
    parameters, 2.293M multiply-accumulates).

    Caffe's prototxt has a ReLU after ``fc1`` only. Like the PyTorch ports used by the papers this
    library compares against (Louizos et al. 2018's L0 code, Bui et al. 2019), a ReLU also follows
    each convolution; ``conv_relu=False`` gives Caffe's exact graph. Neither changes the counts.

    Args:
        num_classes: output units of the last layer.
        in_channels: input image channels.
        conv_relu: put a ReLU after each convolution.

    Example::

        >>> LeNet5Caffe()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, conv_relu: bool = True) -> None:
        super().__init__()
        act: Callable[[], nn.Module] = nn.ReLU if conv_relu else nn.Identity
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, kernel_size=5),
            act(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, kernel_size=5),
            act(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(50 * 4 * 4, 500),
            nn.ReLU(),
            nn.Linear(500, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of 28x28 images with ``in_channels`` channels."""
        return self.classifier(self.features(x))


class VGG16CIFAR(nn.Module):
    """VGG-16 for 3x32x32 inputs in the variant of Li et al. 2017.

    Li et al. 2017 is "Pruning Filters for Efficient ConvNets"; the variant is Zagoruyko's
    cifar.torch ``vgg_bn_drop``: 13 conv3x3 (bias) + BatchNorm + ReLU, then a 512-512-10 classifier
    ``Linear(512, 512) -> BatchNorm1d -> ReLU -> Linear(512, 10)``.

    That classifier has two Linear layers, not three: with them the conv and linear weights and
    biases sum to 14,982,474 and a 32x32 image costs 313.46M multiply-accumulates, Li et al.'s
    numbers (1.5e7 parameters, 3.13e8 FLOPs). cifar.torch's dropout in the conv stack is left out;
    the classifier keeps an optional dropout before each Linear.

    Args:
        num_classes: output units of the last layer.
        dropout: dropout probability before each classifier Linear (0 disables it).

    Example::

        >>> VGG16CIFAR()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in VGG16_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                width = int(item)
                layers += [
                    nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                in_channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of 3x32x32 images."""
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """He et al.'s basic block: conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    The shortcut is the identity when the shape is kept, else (option B) a 1x1 conv + BN projection.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output: ReLU of the residual branch plus the shortcut."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class ResNetCIFAR(nn.Module):
    """ResNet for CIFAR (He et al. 2016, section 4.2).

    A 3x3 conv with 16 filters, three stages of ``n = (depth - 2) / 6`` basic blocks with 16, 32 and
    64 filters (stride 2 at the first block of the 2nd and 3rd stage), global average pooling and a
    Linear classifier. ResNet-20 has about 0.27M parameters, ResNet-56 about 0.85M.

    Args:
        depth: 6n + 2 (20, 32, 44, 56, 110, ...).
        num_classes: output units of the last layer.

    Raises:
        ValueError: ``depth`` is not 6n + 2 with n >= 1.

    Example::

        >>> ResNetCIFAR(20)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            fail("ResNetCIFAR", "depth", depth, "`depth` = 6n + 2 with n >= 1",
                 hint="20, 32, 44, 56 or 110.")  # fmt: skip
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Module] = []
        in_channels = 16
        for i, width in enumerate((16, 32, 64)):
            stage = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(BasicBlock(in_channels, width, stride))
                in_channels = width
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of 3x32x32 images."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(self.flatten(self.pool(out)))


class WideBasicBlock(nn.Module):
    """Zagoruyko & Komodakis's pre-activation block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3.

    When the shape changes, the shortcut is a 1x1 conv applied to the pre-activated input (as in
    the authors' code); otherwise it is the identity on the raw input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output: the residual branch plus the shortcut (no final activation)."""
        pre = self.relu1(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        # a structural branch (fixed at construction), so fx traces it without a data dependency
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = out + shortcut
        return out


class WideResNet(nn.Module):
    """WRN-d-k (Zagoruyko & Komodakis 2016) for CIFAR.

    A 3x3 conv with 16 filters, three groups of ``n = (d - 4) / 6`` pre-activation blocks with 16k,
    32k, 64k filters, BN-ReLU, global average pooling and a Linear classifier. WRN-28-10 has about
    36.5M parameters.

    Args:
        depth: 6n + 4 (16, 22, 28, 40, ...).
        widen_factor: the width multiplier k.
        num_classes: output units of the last layer.
        dropout: dropout probability between the two convs of each block (the paper uses 0.3).

    Raises:
        ValueError: a ``depth`` that is not 6n + 4, or ``widen_factor`` < 1.

    Example::

        >>> WideResNet(10, 1)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            fail("WideResNet", "depth", depth, "`depth` = 6n + 4 with n >= 1",
                 hint="16, 22, 28 or 40.")  # fmt: skip
        if widen_factor < 1:
            fail("WideResNet", "widen_factor", widen_factor, "`widen_factor` >= 1")
        blocks = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        groups: list[nn.Module] = []
        in_channels = 16
        for i, width in enumerate(widths):
            group = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                group.append(WideBasicBlock(in_channels, width, stride, dropout))
                in_channels = width
            groups.append(nn.Sequential(*group))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of 3x32x32 images."""
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn(out))
        return self.fc(self.flatten(self.pool(out)))


def _fixed(factory: Callable[..., nn.Module], **fixed: Any) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, **kwargs: Any) -> nn.Module:
        return factory(num_classes=num_classes, **fixed, **kwargs)

    return build


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "lenet5": _fixed(LeNet5Caffe),
    "vgg16": _fixed(VGG16CIFAR),
    "resnet20": _fixed(ResNetCIFAR, depth=20),
    "resnet56": _fixed(ResNetCIFAR, depth=56),
}
_WRN = re.compile(r"wrn-(\d+)-(\d+)")


def available_models() -> list[str]:
    """The names `build_model` accepts (``wrn-d-k`` stands for any valid depth and width)."""
    return [*_REGISTRY, "wrn-d-k"]


def build_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a reference model by name.

    Args:
        name: ``"lenet5"``, ``"vgg16"``, ``"resnet20"``, ``"resnet56"`` or ``"wrn-<depth>-<k>"``
            (e.g. ``"wrn-28-10"``); case-insensitive.
        num_classes: output units of the last layer.
        **kwargs: passed to the model class (e.g. ``dropout=0.3`` for a WideResNet).

    Raises:
        ValueError: an unknown name (the valid ones are listed).
        TypeError: ``name`` is not a string.

    Example::

        >>> type(build_model("wrn-16-2", dropout=0.3)).__name__
        'WideResNet'
    """
    if not isinstance(name, str):
        fail("build_model", "name", name, "a str", got=type(name).__name__, error=TypeError)
    key = name.strip().lower()
    if key in _REGISTRY:
        return _REGISTRY[key](num_classes=num_classes, **kwargs)
    match = _WRN.fullmatch(key)
    if match:
        depth, width = (int(g) for g in match.groups())
        return WideResNet(depth, width, num_classes=num_classes, **kwargs)
    fail("build_model", "name", name, f"one of {available_models()}", hint="'wrn-28-10'.")
