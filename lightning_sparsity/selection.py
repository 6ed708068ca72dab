"""Which layers a sparsity callback acts on, and with which groups.

By default every Conv1d/2d/3d and Linear layer. The output units of the layer(s) producing the
model's output are never a prunable group (they are the classes): such layers are returned with
``is_output=True`` so that filter-granularity users skip them while channel-granularity users may
still act on their inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from lightning_sparsity.functional.groups import check_granularity, check_weight
from lightning_sparsity.pruning.analysis.graph import PRUNABLE_TYPES, output_layer_names

LayerSpec = Sequence[str] | Callable[[str, nn.Module], bool] | None


@dataclass(frozen=True)
class PrunableLayer:
    """A selected layer: its qualified name, the module, and whether it produces the output."""

    name: str
    module: nn.Module
    is_output: bool


def select_layers(
    model: nn.Module, layers: LayerSpec = None, *, owner: str = "select_layers"
) -> list[PrunableLayer]:
    """Select the prunable layers of ``model``.

    Args:
        model: the network.
        layers: ``None`` for every Conv/Linear layer; a sequence of qualified module names; or a
            predicate ``(name, module) -> bool`` applied to the Conv/Linear layers.
        owner: the caller's name, used in error messages (e.g. ``"SparsityRegularizer"``).

    Raises:
        ValueError: a name that does not exist (the available ones are listed), or that names a
            layer of an unsupported type.
        TypeError: ``layers`` of the wrong type.

    Example::

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 10))
        >>> [(layer.name, layer.is_output) for layer in select_layers(net)]
        [('0', False), ('3', True)]
    """
    available = {
        name: module for name, module in model.named_modules() if isinstance(module, PRUNABLE_TYPES)
    }
    if layers is None:
        chosen = list(available)
    elif callable(layers):
        chosen = [name for name, module in available.items() if layers(name, module)]
    elif isinstance(layers, str) or not isinstance(layers, Sequence):
        raise TypeError(
            f"`{owner}(layers={layers!r})`: expected `layers` to be None, a list of qualified "
            "module names or a predicate `(name, module) -> bool`, "
            f"got {type(layers).__name__}. HINT: use `layers=[{layers!r}]` for a single layer."
        )
    else:
        all_modules = dict(model.named_modules())
        chosen = []
        for name in layers:
            if name not in all_modules:
                raise ValueError(
                    f"`{owner}(layers=[..., {name!r}, ...])`: no module named {name!r} in "
                    f"`{type(model).__name__}`. Available Conv/Linear layers: {sorted(available)}."
                )
            if name not in available:
                raise ValueError(
                    f"`{owner}(layers=[..., {name!r}, ...])`: {name!r} is a "
                    f"`{type(all_modules[name]).__name__}`, expected one of "
                    f"{[t.__name__ for t in PRUNABLE_TYPES]}. Available: {sorted(available)}."
                )
            chosen.append(name)
    outputs = output_layer_names(model)
    return [PrunableLayer(name, available[name], name in outputs) for name in chosen]


def resolve_network(module: nn.Module) -> nn.Module:
    """The network inside a LightningModule.

    ``module.model`` when it is an ``nn.Module`` (the layer names in ``layers=`` are then relative
    to it), else ``module`` itself.
    """
    inner = getattr(module, "model", None)
    return inner if isinstance(inner, nn.Module) else module


@dataclass(frozen=True)
class Target:
    """One penalised weight: the layer's qualified name, the parameter and its granularity."""

    name: str
    param: nn.Parameter
    granularity: str


def select_targets(
    module: nn.Module,
    layers: LayerSpec,
    granularity: str,
    *,
    owner: str,
    linear_granularity: str | None = None,
) -> list[Target]:
    """The selected Conv/Linear weights with their granularity.

    The output layer is skipped at "filter" granularity (its output units are the classes); a
    "kernel" granularity on a Linear layer raises. ``linear_granularity`` overrides the granularity
    of Linear layers.
    """
    network = resolve_network(module)
    targets = []
    for layer in select_layers(network, layers, owner=owner):
        weight = getattr(layer.module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            continue
        gran = granularity
        if isinstance(layer.module, nn.Linear) and linear_granularity is not None:
            gran = linear_granularity
        if gran == "filter" and layer.is_output:
            continue
        if gran == "kernel" and weight.dim() == 2:
            raise ValueError(
                f"`{owner}(granularity='kernel')`: layer {layer.name!r} is a Linear layer, whose "
                "weight has no kh x kw kernel slices. HINT: select only convolutions, e.g. "
                "`layers=lambda name, m: isinstance(m, torch.nn.Conv2d)`, or use 'weight'."
            )
        check_weight(weight, check_granularity(gran, owner=owner), owner=owner)
        targets.append(Target(layer.name, weight, gran))
    return targets


def no_targets_message(owner: str, granularity: str) -> str:
    """The warning of a callback that selected no layer."""
    hint = (
        " (at 'filter' granularity the output layer is skipped: its units are the classes)"
        if granularity == "filter"
        else ""
    )
    return f"`{owner}`: no layer selected{hint}; the callback does nothing."


def network_name(module: nn.Module, submodule: str | None = None, *, owner: str) -> str:
    """The qualified name of the network inside a LightningModule (``""``: the module itself).

    ``submodule`` when given (checked), else ``"model"`` when ``module.model`` is an
    ``nn.Module`` (as :func:`resolve_network`), else ``""``.

    Raises:
        ValueError: ``submodule`` names no submodule (the children are listed).
    """
    if submodule is None:
        return "model" if isinstance(getattr(module, "model", None), nn.Module) else ""
    try:
        module.get_submodule(submodule)
    except AttributeError:
        children = [name for name, _ in module.named_children()]
        raise ValueError(
            f"`{owner}(submodule={submodule!r})`: expected a submodule of "
            f"`{type(module).__name__}`, got none of that name. Its children: {children}; '' is "
            "the LightningModule itself."
        ) from None
    return submodule


def batch_input(batch: object, samples: int) -> Tensor | None:
    """The first ``samples`` samples of a batch's input (a detached CPU copy), or ``None``.

    The input is the batch itself when it is a tensor, else its first element.

    Example::

        >>> import torch
        >>> batch_input((torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 2])), 2).tolist()
        [[0.0, 1.0], [2.0, 3.0]]
    """
    x = batch[0] if isinstance(batch, list | tuple) and batch else batch
    if not isinstance(x, Tensor) or x.dim() == 0 or len(x) == 0:
        return None
    return x[:samples].detach().to("cpu", copy=True)
