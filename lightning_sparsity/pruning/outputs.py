"""Running a model the way every check here runs it.

That is eval mode, no gradients, flags restored, the outputs flattened to a list of tensors whatever
their structure (tensor, tuple, list, dict, dataclass such as a ``ModelOutput``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn


def tensors(value: Any) -> list[Tensor]:
    """Every tensor inside nested tuples, lists, dicts and dataclasses, in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in tensors(getattr(value, f.name))]
    return []


@contextlib.contextmanager
def training_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """``model.train(training)`` inside, each submodule's own flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def eval_mode(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Eval mode inside, each submodule's own training flag restored afterwards."""
    return training_mode(model, False)


def run_eval(model: Any, args: tuple[Any, ...]) -> list[Tensor]:
    """The output tensors of ``model(*args)`` in eval mode without gradients (flags restored)."""
    with torch.no_grad():
        if isinstance(model, nn.Module):
            with eval_mode(model):
                return tensors(model(*args))
        return tensors(model(*args))
