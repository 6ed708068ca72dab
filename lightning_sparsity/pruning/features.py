"""Input features of Linear layers removed one by one (plain torch, no Lightning import).

A Linear layer whose weight has an all-zero column ``W[:, j]`` ignores input feature ``j``: the
output does not depend on it (for finite inputs), so the column can go even when the feature is
one position of a flattened conv channel whose other positions are still read. Channel-level
pruning removes a dead conv channel's features only all together; this removes the rest.

``FeatureLinear`` is an ``nn.Linear`` that reads only ``kept_features`` of its input (a
buffer, so the indices travel in the state dict and load with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override


class FeatureLinear(nn.Linear):
    """``y = x[..., kept_features] @ W.T + b``: a Linear reading some of its input features.

    Args:
        in_features: the number of features read (``len(kept_features)``).
        out_features: the number of outputs.
        bias: whether there is a bias.
        total_features: the width of the input it receives.

    Example::

        >>> layer = FeatureLinear(2, 1, total_features=4)
        >>> layer.kept_features = torch.tensor([0, 3])
        >>> layer(torch.ones(5, 4)).shape
        torch.Size([5, 1])
    """

    kept_features: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        total_features: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.total_features = total_features
        self.register_buffer(
            "kept_features", torch.arange(in_features, dtype=torch.long, device=device)
        )

    @override
    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input.index_select(-1, self.kept_features), self.weight, self.bias)

    @override
    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, total_features={self.total_features}"


def select_features(layer: nn.Linear, keep: Tensor) -> FeatureLinear:
    """A ``FeatureLinear`` that reads the features ``keep`` (indices into ``layer``'s input).

    Composes with an existing selection: for a ``FeatureLinear``, ``keep`` indexes its
    ``kept_features``.
    """
    keep = keep.to(device=layer.weight.device, dtype=torch.long)
    total = layer.total_features if isinstance(layer, FeatureLinear) else layer.in_features
    new = FeatureLinear(
        int(keep.numel()),
        layer.out_features,
        layer.bias is not None,
        total_features=total,
        device=layer.weight.device,
        dtype=layer.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(layer.weight.index_select(1, keep))
        if layer.bias is not None:
            new.bias.copy_(layer.bias)  # type: ignore[union-attr]
        base = layer.kept_features if isinstance(layer, FeatureLinear) else None
        new.kept_features = keep if base is None else base.index_select(0, keep)
    new.train(layer.training)
    new.weight.requires_grad_(layer.weight.requires_grad)
    return new


def drop_dead_features(model: nn.Module) -> dict[str, int]:
    """Make every Linear layer with all-zero weight columns stop reading those inputs, in place.

    Each becomes a [`FeatureLinear`][lightning_sparsity.pruning.features.FeatureLinear]; returns
    ``{layer: features removed}``. At least one feature is kept per layer. Exact for finite
    inputs (a zero column multiplies its feature by 0).

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 2))
        >>> with torch.no_grad():
        ...     net[0].weight[:, 1] = 0
        >>> drop_dead_features(net), net[0].kept_features.tolist()
        ({'0': 1}, [0, 2, 3])
    """
    removed = {}
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]
    for name, layer in targets:
        dead = layer.weight.detach().abs().sum(dim=0) == 0
        n_dead = int(dead.sum())
        if n_dead == 0 or n_dead == dead.numel():
            continue
        new = select_features(layer, (~dead).nonzero().flatten())
        for alias, module in list(model.named_modules(remove_duplicate=False)):
            if module is layer:
                model.set_submodule(alias, new)
        removed[name] = n_dead
    return removed
