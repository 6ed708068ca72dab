"""Pieces shared by the regularizer, proximal and splitting callbacks (private).

Which network the callbacks act on, strengths given as a float or an epoch schedule, the selected
weights with their granularities, the NaN check and the optimizer lookups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sparsity.functional.groups import check_granularity, check_weight
from lightning_sparsity.selection import LayerSpec, select_layers

#: A strength: a float >= 0 or a schedule ``epoch -> float``.
Strength = float | Callable[[int], float]


def describe(value: Any) -> Any:
    """A run-independent description of an argument (callables by name, not by address)."""
    if callable(value) and not isinstance(value, type):
        return getattr(value, "__qualname__", type(value).__qualname__)
    return value


def resolve_network(module: nn.Module) -> nn.Module:
    """The network inside a LightningModule: ``module.model`` when it is an ``nn.Module`` (the
    layer names in ``layers=`` are then relative to it), else ``module`` itself."""
    inner = getattr(module, "model", None)
    return inner if isinstance(inner, nn.Module) else module


def check_number(value: object, *, owner: str, arg: str, low: float = 0.0) -> float:
    """A finite float >= ``low`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"`{owner}({arg}={value!r})`: expected `{arg}` to be a float, "
            f"got {type(value).__name__}."
        )
    if not math.isfinite(value) or value < low:
        raise ValueError(
            f"`{owner}({arg}={value!r})`: expected `{arg}` finite and >= {low:g}, got {value!r}."
        )
    return float(value)


def check_strength(value: object, *, owner: str, arg: str = "strength") -> Strength:
    """Validate a strength: a finite float >= 0, or a callable schedule (checked when called)."""
    if callable(value):
        return value  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"`{owner}({arg}={value!r})`: expected `{arg}` to be a float >= 0 or a schedule "
            f"`epoch -> float`, got {type(value).__name__}."
        )
    return check_number(value, owner=owner, arg=arg)


def strength_at(strength: Strength, epoch: int, *, owner: str, arg: str = "strength") -> float:
    """The strength for ``epoch``; a schedule's value is validated like a float."""
    if not callable(strength):
        return float(strength)
    value = strength(epoch)
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"`{owner}({arg}={describe(strength)})`: the schedule returned {value!r} at epoch "
            f"{epoch}, expected a float >= 0."
        )
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"`{owner}({arg}={describe(strength)})`: expected the schedule's value finite and "
            f">= 0, got {value!r} at epoch {epoch}."
        )
    return float(value)


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


#: Strategies that shard parameters, gradients or optimizer state across processes (matched by
#: class name along the MRO, so that no optional package such as deepspeed is imported).
SHARDING_STRATEGIES: tuple[str, ...] = (
    "FSDPStrategy",
    "DeepSpeedStrategy",
    "ModelParallelStrategy",
    "XLAFSDPStrategy",
)


def refuse_sharded_strategy(trainer: Any, *, owner: str) -> None:
    """Raise when ``trainer.strategy`` shards the model (FSDP, DeepSpeed, ModelParallel).

    The callbacks need each layer's whole weight, gradient and optimizer state on every process
    (filter norms, masks, proximal maps, the export); under sharding each rank holds a slice, and
    the gradients live in flat buffers. DDP (a full replica per rank) is supported and tested.
    """
    strategy = getattr(trainer, "strategy", None)
    names = [cls.__name__ for cls in type(strategy).__mro__]
    sharding = next((name for name in names if name in SHARDING_STRATEGIES), None)
    if sharding is not None:
        raise RuntimeError(
            f"`{owner}`: `Trainer(strategy={type(strategy).__name__}(...))` is a {sharding}, which "
            "shards the parameters across processes, but this callback needs every layer's whole "
            "weight, gradient and optimizer state on each process. HINT: train with "
            '`strategy="ddp"` (supported: a full replica per process), and use FSDP or DeepSpeed '
            "for the exported, smaller model if needed."
        )


def raise_if_nonfinite(
    values: Tensor | dict[str, Tensor], names: Sequence[str], *, owner: str, what: str = ""
) -> None:
    """Raise naming the layers whose values are NaN or inf, with one device sync.

    ``values``: one value per layer, or ``{description: per-layer values}`` for several checks
    at once (e.g. the penalty and the gradient), each reported separately.
    """
    rows = values if isinstance(values, dict) else {what: values}
    finite = torch.isfinite(torch.stack(list(rows.values())))
    if bool(finite.all()):
        return
    problems = []
    for description, ok in zip(rows, finite.tolist()):
        bad = [name for name, good in zip(names, ok) if not good]
        if bad:
            problems.append(f"{description} is NaN or inf in layer(s) {bad}")
    raise RuntimeError(
        f"`{owner}`: {'; '.join(problems)}; stopping before the weights are corrupted. HINT: "
        "lower the learning rate or the strength, or clip gradients "
        "(`Trainer(gradient_clip_val=...)`)."
    )


class Workspace:
    """Scratch tensors reused from step to step (one per key), so that the per-step maths does not
    allocate weight-sized temporaries: on the CPU every large allocation may cost page faults."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, key: str, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """An uninitialised tensor shaped like ``like`` (same device; ``dtype`` or ``like``'s)."""
        dtype = like.dtype if dtype is None else dtype
        buf = self._buffers.get(key)
        if (
            buf is None
            or buf.shape != like.shape
            or buf.dtype != dtype
            or buf.device != like.device
        ):
            buf = self._buffers[key] = torch.empty(like.shape, dtype=dtype, device=like.device)
        return buf

    def clear(self) -> None:
        self._buffers.clear()


def check_log_every(value: object, *, owner: str) -> None:
    """``log_every_n_steps``: None (the Trainer's) or an int >= 0 (0: never log)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{owner}(log_every_n_steps={value!r})`: expected an int >= 0 or None.")
    if value < 0:
        raise ValueError(
            f"`{owner}(log_every_n_steps={value!r})`: expected `log_every_n_steps` >= 0, got "
            f"{value}. HINT: 0 disables logging, None follows the Trainer's."
        )


def log_due(trainer: Any, every: int | None, *, after_step: bool) -> bool:
    """Whether this optimizer step is one the Trainer writes to its loggers (``every=None``: the
    Trainer's ``log_every_n_steps``), so that ``self.log`` (a few ms per call) runs only then.
    ``after_step``: called after the optimizer step (``global_step`` already counts it)."""
    n = trainer.log_every_n_steps if every is None else every
    if n <= 0:
        return False
    step = trainer.global_step if after_step else trainer.global_step + 1
    return step % n == 0


def optimizer_param_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    """The ``id`` of every parameter an optimizer updates."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def no_targets_message(owner: str, granularity: str) -> str:
    hint = (
        " (at 'filter' granularity the output layer is skipped: its units are the classes)"
        if granularity == "filter"
        else ""
    )
    return f"`{owner}`: no layer selected{hint}; the callback does nothing."
