"""Killing filters: zero a filter's parameters, gradients and optimizer state.

That is its weights, bias and the BatchNorm scale/shift after it, its gradients and its optimizer
state (plain torch, no Lightning import).

[`kill_filters`][lightning_sparsity.pruning.masks.kill_filters] is the one-call form (tests,
benchmarks, a user's own schedule); the
thresholding and monitor callbacks use the
[`FilterGroup`][lightning_sparsity.pruning.masks.FilterGroup] pieces.
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
    """`batchnorm_after`, or ``{}`` for an untraceable model that has no BatchNorm at all."""
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
    """One `FilterGroup` per layer name, the BatchNorm found by an ``fx`` trace."""
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
    that [`prune_model`][lightning_sparsity.prune_model] removes them and the pruned model's outputs
    stay
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


class _Masks:
    """Persistent bool masks per layer (``True`` = live): the bookkeeping both kinds share."""

    def __init__(self, widths: dict[str, int], masks: dict[str, Tensor] | None) -> None:
        self.masks = {name: torch.ones(n, dtype=torch.bool) for name, n in widths.items()}
        self.masks.update(masks or {})
        self._dead: dict[str, Tensor] = {}
        self._refresh()

    def _refresh(self) -> None:
        self._dead = {n: (~m).nonzero().flatten() for n, m in self.masks.items() if not m.all()}

    def update(
        self, masks: dict[str, Tensor], optimizers: Iterable[torch.optim.Optimizer] = ()
    ) -> int:
        """Replace the masks, kill the newly dead units; returns how many were killed."""
        killed = sum(int((self.masks[n] & ~m).sum()) for n, m in masks.items() if n in self.masks)
        self.masks = {**self.masks, **masks}
        self._refresh()
        self.apply(optimizers)
        return killed

    def apply(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Zero the dead units and their optimizer state."""
        raise NotImplementedError

    def live(self) -> dict[str, int]:
        """Live units per layer."""
        return {name: int(mask.sum()) for name, mask in self.masks.items()}


class FilterMasks(_Masks):
    """Live masks of filter groups that stay applied: dead filters, gradients and optimizer state.

    ``masks`` maps a layer name to a bool ``[out]`` tensor on the CPU (``True`` = live). A layer
    without a mask is all live.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
        >>> masks = FilterMasks(build_groups(net, ["0"], "doc"))
        >>> masks.update({"0": torch.tensor([True, False, True])})
        1
        >>> net[1].weight.tolist()
        [1.0, 0.0, 1.0]
    """

    def __init__(self, groups: dict[str, FilterGroup], masks: dict[str, Tensor] | None = None):
        self.groups = groups
        super().__init__({name: g.out_features for name, g in groups.items()}, masks)

    def check(self, owner: str) -> None:
        """Raise unless every mask names a grouped layer and has one entry per filter."""
        unknown = sorted(set(self.masks) - set(self.groups))
        if unknown:
            raise RuntimeError(
                f"`{owner}`: restored masks name layers {unknown} that this callback does not "
                f"threshold (it has {sorted(self.groups)}). HINT: resume with the same `layers=` "
                "and model."
            )
        for name, group in self.groups.items():
            if self.masks[name].shape != (group.out_features,):
                raise RuntimeError(
                    f"`{owner}`: restored mask of {name!r} has {self.masks[name].numel()} entries, "
                    f"the layer has {group.out_features} filters. HINT: resume into the unpruned "
                    "model the checkpoint came from."
                )

    def apply(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Zero the dead filters (`zero_filters`) and their optimizer state."""
        optimizers = list(optimizers)
        for name, dead in self._dead.items():
            zero_filters(self.groups[name], dead)
            zero_optimizer_state(optimizers, self.groups[name], dead)

    def zero_grads(self) -> None:
        """Zero the dead filters' gradients (before an optimizer step)."""
        for name, dead in self._dead.items():
            zero_grads(self.groups[name], dead)


class FeatureMasks(_Masks):
    """Live masks of Linear input features (weight columns) that stay applied.

    ``masks`` maps a Linear layer's name to a bool ``[in_features]`` tensor on the CPU (``True``
    = live). A dead feature's column of the weight, of its gradient and of every optimizer state
    tensor shaped like the weight is zero, so the export removes it
    ([`drop_dead_features`][lightning_sparsity.pruning.features.drop_dead_features]).

    Example::

        >>> fc = nn.Linear(4, 2)
        >>> masks = FeatureMasks({"fc": fc})
        >>> masks.update({"fc": torch.tensor([True, False, True, True])})
        1
        >>> fc.weight[:, 1].abs().sum().item()
        0.0
    """

    def __init__(self, layers: dict[str, nn.Module], masks: dict[str, Tensor] | None = None):
        self.layers = layers
        super().__init__({n: cast(Tensor, m.weight).shape[1] for n, m in layers.items()}, masks)

    def check(self, owner: str) -> None:
        """Raise unless every mask names a selected Linear layer and has one entry per input."""
        for name, mask in self.masks.items():
            layer = self.layers.get(name)
            if layer is None or mask.shape != (cast(Tensor, layer.weight).shape[1],):
                raise RuntimeError(
                    f"`{owner}`: a restored feature mask of {name!r} does not fit the model. "
                    "HINT: resume into the unpruned model the checkpoint came from, with the same "
                    "`layers=`."
                )

    @torch.no_grad()
    def apply(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Zero the dead columns of the weights and of their optimizer state."""
        optimizers = list(optimizers)
        for name, dead in self._dead.items():
            weight = cast(Tensor, self.layers[name].weight)
            weight.index_fill_(1, dead.to(weight.device), 0.0)
            for optimizer in optimizers:
                for value in (optimizer.state.get(weight) or {}).values():
                    if isinstance(value, Tensor) and value.shape == weight.shape:
                        value.index_fill_(1, dead.to(value.device), 0.0)

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Zero the dead columns' gradients (before an optimizer step)."""
        for name, dead in self._dead.items():
            grad = cast(Tensor, self.layers[name].weight).grad
            if grad is not None:
                grad.index_fill_(1, dead.to(grad.device), 0.0)
