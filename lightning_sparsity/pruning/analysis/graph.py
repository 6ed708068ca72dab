"""Which channels are coupled, read from a ``torch.fx`` trace.

This module is shared by the thresholding callback (which BatchNorm normalises which conv, which
layer produces the model's output) and by the export (the full channel-coupling analysis).
"""

from __future__ import annotations

import inspect
import math
import traceback
from collections import deque
from typing import Any

import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_sparsity.pruning.layers import BATCHNORM_TYPES, PRUNABLE_TYPES
from lightning_sparsity.pruning.outputs import training_mode

__all__ = ["BATCHNORM_TYPES", "PRUNABLE_TYPES", "TraceError", "batchnorm_after", "trace"]


class TraceError(RuntimeError):
    """A model could not be traced by ``torch.fx``."""


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[nn.Module], opaque: set[nn.Module]) -> None:
        super().__init__(autowrap_modules=(math,))
        self.record_stack_traces = True
        self.leaves = leaves
        self.opaque = opaque
        self.stack: list[nn.Module] = []
        self.failed: list[nn.Module] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if m in self.opaque or m in self.leaves:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self.stack.append(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                self.failed = list(self.stack)
            raise
        finally:
            self.stack.pop()


def _where(err: BaseException, module: nn.Module) -> str:
    """The innermost line of the module's own source where ``err`` was raised, if any."""
    try:
        source = inspect.getsourcefile(type(module)) or ""
    except TypeError:
        source = ""
    frames = traceback.extract_tb(err.__traceback__)
    mine = [f for f in frames if source and f.filename == source] or frames[-1:]
    if not mine:
        return ""
    f = mine[-1]
    return f" at {f.filename}:{f.lineno} (`{(f.line or '').strip()}`)"


def trace_with_opaque(
    module: nn.Module, leaves: set[nn.Module], max_opaque: int = 64
) -> tuple[fx.GraphModule | None, set[nn.Module], str]:
    """Trace ``module``; submodules fx cannot follow become opaque leaves.

    ``None`` when the module's own code cannot be traced (with the reason).
    """
    opaque: set[nn.Module] = set()
    for _ in range(max_opaque):
        tracer = _Tracer(leaves, opaque)
        try:
            graph = tracer.trace(module)
        except Exception as err:
            failed = [m for m in (tracer.failed or []) if m is not module]
            if not failed:
                return None, opaque, f"{type(err).__name__}: {err}{_where(err, module)}"
            opaque.add(failed[-1])
            continue
        return fx.GraphModule(module, graph, type(module).__name__), opaque, ""
    return None, opaque, f"more than {max_opaque} submodules cannot be traced"


def is_norm_like(module: nn.Module) -> bool:
    """A per-channel normalisation layer as the zoos write them.

    That is a ``_BatchNorm`` subclass (with a fused activation, say) or any module holding 1-D
    ``weight``, ``bias``, ``running_mean`` and ``running_var`` (a frozen BatchNorm).
    """
    if isinstance(module, _BatchNorm):
        return True
    tensors = [getattr(module, k, None) for k in ("weight", "bias", "running_mean", "running_var")]
    return all(isinstance(t, Tensor) and t.dim() == 1 for t in tensors)


def trace(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` with ``torch.fx`` for the training callbacks' questions, in eval mode.

    The questions are which norm follows which layer and which layer makes the output. ``torch.nn``
    layers and zoo norm layers
    ([`is_norm_like`][lightning_sparsity.pruning.analysis.graph.is_norm_like]) stay leaves, a
    submodule fx cannot follow
    becomes an opaque leaf. The model's flags are restored.

    Raises:
        TraceError: the model's own forward cannot be traced (naming the line).
    """
    leaves = {m for m in model.modules() if is_norm_like(m) and m is not model}
    with training_mode(model, False):
        gm, _, why = trace_with_opaque(model, leaves)
    if gm is None:
        raise TraceError(
            f"torch.fx could not trace `{type(model).__name__}`: {why}. HINT: the callbacks "
            "need a forward torch.fx can follow at the top level (data-dependent Python control "
            "flow inside submodules is fine); move the branch into a submodule."
        )
    return gm


def _module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def output_layer_names(model: nn.Module) -> set[str]:
    """Names of the Conv/Linear layers that produce the model's output.

    Walks back from the graph's output through every op that is not a Conv/Linear layer and
    collects the Conv/Linear layers it reaches (the classifier). If the model cannot be traced,
    falls back to the last Conv/Linear layer in registration order.
    """
    try:
        gm = trace(model)
    except TraceError:
        last = [name for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
        return {last[-1]} if last else set()
    return layers_reaching_output(gm, PRUNABLE_TYPES)


def layers_reaching_output(gm: fx.GraphModule, types: tuple[type[nn.Module], ...]) -> set[str]:
    """The layers of ``types`` reached walking back from the graph's output through every other op.

    For example the classifier, or the last convs of a segmentation head.
    """
    found: set[str] = set()
    seen: set[fx.Node] = set()
    queue = deque(n for n in gm.graph.nodes if n.op == "output")
    while queue:
        node = queue.popleft()
        if node in seen:
            continue
        seen.add(node)
        module = _module_of(gm, node)
        if module is not None and isinstance(module, types):
            found.add(str(node.target))
            continue
        queue.extend(node.all_input_nodes)
    return found


def batchnorm_after(model: nn.Module) -> dict[str, str]:
    """Map each Conv/Linear layer to the BatchNorm that directly normalises its output.

    Only a BatchNorm whose input is exactly the layer's output counts (``conv -> bn``); a layer
    whose output feeds several BatchNorms, or none, is absent from the map.

    Raises:
        TraceError: when the model cannot be traced.
    """
    gm = trace(model)
    candidates: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        module = _module_of(gm, node)
        if module is None or not is_norm_like(module) or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node):
            continue
        producer = _module_of(gm, src)
        if producer is not None and isinstance(producer, PRUNABLE_TYPES):
            candidates.setdefault(str(src.target), []).append(str(node.target))
    return {layer: bns[0] for layer, bns in candidates.items() if len(bns) == 1}
