"""Killing filters: zero a filter's parameters, gradients and optimizer state.

That is its weights, bias and the BatchNorm scale/shift after it, its gradients and its optimizer
state (plain torch, no Lightning import).

:func:`kill_filters` is the one-call form (tests, benchmarks, a user's own schedule); the
thresholding and monitor callbacks use the :class:`FilterGroup` pieces.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from lightning_sparsity.pruning.analysis.graph import TraceError, batchnorm_after, is_norm_like


@dataclass(frozen=True)
class FilterGroup:
    """A prunable layer and the BatchNorm (if any) that normalises its output."""

    name: str
    layer: nn.Module
    bn: nn.Module | None

    @property
    def weight(self) -> Tensor:
        """The layer's weight (output units along dim 0)."""
        return cast(Tensor, self.layer.weight)

    @property
    def out_features(self) -> int:
        """The number of output units (filters) of the layer."""
        return int(self.weight.shape[0])

    def params(self) -> Iterator[Tensor]:
        """The parameters indexed by output unit along dim 0: weight, bias, BN scale and shift."""
        for module in (self.layer, self.bn):
            if module is None:
                continue
            for attr in ("weight", "bias"):
                param = getattr(module, attr, None)
                if isinstance(param, Tensor):
                    yield param


def batchnorm_map(model: nn.Module, owner: str) -> dict[str, str]:
    """:func:`batchnorm_after`, or ``{}`` for an untraceable model that has no BatchNorm at all."""
    try:
        return batchnorm_after(model)
    except TraceError as err:
        if any(is_norm_like(m) for m in model.modules()):
            raise TraceError(
                f"`{owner}`: cannot tell which BatchNorm follows which layer, so a killed "
                f"filter's channel would still emit the BatchNorm shift. {err}"
            ) from err
        return {}


def build_groups(model: nn.Module, names: Iterable[str], owner: str) -> dict[str, FilterGroup]:
    """One :class:`FilterGroup` per layer name, the BatchNorm found by an ``fx`` trace."""
    modules = dict(model.named_modules())
    bns = batchnorm_map(model, owner)
    return {
        name: FilterGroup(name, modules[name], modules[bns[name]] if name in bns else None)
        for name in names
    }


@torch.no_grad()
def zero_filters(group: FilterGroup, dead: Tensor) -> None:
    """Zero output units ``dead`` (an index tensor) of ``group``.

    That is the weight rows, bias, BN scale and shift, and the BN running mean (so an
    ``affine=False`` BatchNorm also emits exactly 0).
    """
    for param in group.params():
        param.index_fill_(0, dead.to(param.device), 0.0)
    running_mean = getattr(group.bn, "running_mean", None)
    if isinstance(running_mean, Tensor):
        running_mean.index_fill_(0, dead.to(running_mean.device), 0.0)


@torch.no_grad()
def zero_grads(group: FilterGroup, dead: Tensor) -> None:
    """Zero the gradients of the dead units, so the optimizer never accumulates state for them."""
    for param in group.params():
        if param.grad is not None:
            param.grad.index_fill_(0, dead.to(param.grad.device), 0.0)


@torch.no_grad()
def zero_optimizer_state(
    optimizers: Iterable[torch.optim.Optimizer], group: FilterGroup, dead: Tensor
) -> None:
    """Zero every per-parameter optimizer state tensor shaped like the parameter at the dead units.

    For example SGD ``momentum_buffer``, Adam ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``, RMSprop
    ``square_avg``/``momentum``/``grad_avg``, Adagrad ``sum``... Scalars such as ``step`` are left
    alone.
    """
    params = list(group.params())
    for optimizer in optimizers:
        for param in params:
            state = optimizer.state.get(param)
            if not state:
                continue
            for value in state.values():
                if isinstance(value, Tensor) and value.shape == param.shape and value.dim() > 0:
                    value.index_fill_(0, dead.to(value.device), 0.0)


def kill_filters(
    model: nn.Module, dead: Mapping[str, Sequence[int] | Tensor], *, owner: str = "kill_filters"
) -> None:
    """Make filters emit exactly 0, so that they can be removed.

    For each ``layer name -> filter indices``, zero the weight rows, the bias, and the scale, shift
    and running mean of the BatchNorm that follows the layer (found by a ``torch.fx`` trace), so
    that :func:`~lightning_sparsity.prune_model` removes them and the pruned model's outputs stay
    equal.

    Raises:
        ValueError: a layer name that is not a module of ``model``.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> kill_filters(net, {"0": [1, 2]})
        >>> net[0].weight.flatten(1).norm(dim=1).eq(0).tolist(), net[1].weight.tolist()
        ([False, True, True, False], [1.0, 0.0, 0.0, 1.0])
    """
    modules = dict(model.named_modules())
    unknown = sorted(set(dead) - set(modules))
    if unknown:
        raise ValueError(
            f"`{owner}(dead={{{unknown[0]!r}: ...}})`: expected layer names of "
            f"`{type(model).__name__}`, got {unknown}."
        )
    groups = build_groups(model, list(dead), owner)
    for name, idx in dead.items():
        zero_filters(groups[name], torch.as_tensor(idx, dtype=torch.long).flatten())
