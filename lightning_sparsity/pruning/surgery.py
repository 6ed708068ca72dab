"""Shrink one layer to the kept output and input indices.

The shrink function is the one the layer registry (`layers`) holds
for its type.

>>> import torch
>>> from torch import nn
>>> conv = nn.Conv2d(4, 6, 3, groups=2)
>>> small = shrink(conv, keep_out=torch.tensor([0, 1, 3, 4]), keep_in=torch.tensor([0, 2]))
>>> (small.in_channels, small.out_channels, small.groups, tuple(small.weight.shape))
(2, 4, 2, (4, 1, 3, 3))
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

from lightning_sparsity.pruning.layers import (
    CHANNEL_NORM_TYPES,
    LAYERS,
    Layer,
    ShrinkFn,
    layer_of,
)

__all__ = ["CHANNEL_NORM_TYPES", "is_masked", "register", "shrink", "shrink_fn"]


def register(*types: type[nn.Module]) -> Callable[[ShrinkFn], ShrinkFn]:
    """Register a shrink function for ``types`` (and their subclasses), ahead of built-in entries.

    Use it for a layer type of your own that ``prune_model`` should shrink.
    """

    def decorate(fn: ShrinkFn) -> ShrinkFn:
        LAYERS.insert(0, Layer(tuple(types), fn))
        return fn

    return decorate


def shrink_fn(module: nn.Module) -> ShrinkFn | None:
    """The registered shrink function for ``module``'s class (first match along its MRO)."""
    layer = layer_of(module)
    return layer.shrink if layer is not None else None


def is_masked(module: nn.Module) -> bool:
    """Whether ``module`` itself (not its children) has a pruning mask or a parametrization.

    The mask is a ``torch.nn.utils.prune`` one; either way its ``weight`` is then recomputed on
    every call and cannot be sliced.
    """
    hooks = module._forward_pre_hooks.values()
    masked = any(isinstance(h, prune.BasePruningMethod) for h in hooks)
    return masked or parametrize.is_parametrized(module)


def shrink(
    module: nn.Module, keep_out: Tensor | None = None, keep_in: Tensor | None = None
) -> nn.Module:
    """A new copy of ``module`` keeping only the ``keep_out`` output and ``keep_in`` input indices.

    Raises:
        TypeError: no shrink function is registered for the module's class.
        ValueError: the indices do not fit the layer (out of range, unbalanced groups, a layer
            that cannot be shrunk such as GroupNorm/LayerNorm, a parametrized layer).
    """
    fn = shrink_fn(module)
    if fn is None:
        raise TypeError(
            f"`shrink({type(module).__name__})`: no shrink function for this layer type; "
            f"supported: {sorted(t.__name__ for layer in LAYERS for t in layer.types)}."
        )
    if is_masked(module):
        raise ValueError(
            f"`shrink({type(module).__name__})`: the layer is parametrized or carries a "
            "`torch.nn.utils.prune` mask. HINT: call `torch.nn.utils.prune.remove(module, "
            "'weight')` or `parametrize.remove_parametrizations` before exporting."
        )
    return fn(module, keep_out, keep_in)
