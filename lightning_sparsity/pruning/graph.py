"""Which channels are coupled, read from a ``torch.fx`` trace.

This module is shared by the thresholding callback (which BatchNorm normalises which conv, which
layer produces the model's output) and by the export (the full channel-coupling analysis).
"""

from __future__ import annotations

from collections import deque

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

#: Layers whose output units ("filters") can be pruned.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
#: Normalisation layers whose per-channel scale and shift follow a prunable layer.
BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class TraceError(RuntimeError):
    """A model could not be traced by ``torch.fx``."""


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` with ``torch.fx`` (``torch.nn`` layers stay leaf modules).

    Raises:
        TraceError: naming the model class and fx's own message when tracing fails (data-dependent
            control flow, for example).
    """
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types: TraceError, TypeError, NotImplementedError...
        raise TraceError(
            f"torch.fx could not trace `{type(model).__name__}`: {type(err).__name__}: {err}. "
            "HINT: the coupling analysis needs a traceable forward (no data-dependent Python "
            "control flow); wrap untraceable parts in a leaf module or pass `layers=` explicitly."
        ) from err


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
    found: set[str] = set()
    seen: set[fx.Node] = set()
    queue = deque(n for n in gm.graph.nodes if n.op == "output")
    while queue:
        node = queue.popleft()
        if node in seen:
            continue
        seen.add(node)
        module = _module_of(gm, node)
        if module is not None and isinstance(module, PRUNABLE_TYPES):
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
        if module is None or not isinstance(module, BATCHNORM_TYPES) or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node):
            continue
        producer = _module_of(gm, src)
        if producer is not None and isinstance(producer, PRUNABLE_TYPES):
            candidates.setdefault(str(src.target), []).append(str(node.target))
    return {layer: bns[0] for layer, bns in candidates.items() if len(bns) == 1}


def _first_layer(gm: fx.GraphModule) -> str:
    """A description of the first layer reading the model input, for error messages."""
    for node in gm.graph.nodes:
        module = _module_of(gm, node)
        if isinstance(module, (*PRUNABLE_TYPES, *BATCHNORM_TYPES)):
            return f"its first layer `{node.target}` is `{module}`"
    return "see the model's forward"


def shape_trace(model: nn.Module, example_inputs: tuple[Tensor, ...]) -> fx.GraphModule:
    """Trace ``model`` and annotate every node with its output shape (``ShapeProp``).

    The graph is traced in training mode, so that training-only branches (auxiliary heads, for
    instance) are part of it; shapes are then propagated by running ``example_inputs`` in eval
    mode without gradients (no BatchNorm statistics change). The model's training flags are
    restored.

    Raises:
        TraceError: the model cannot be traced.
        ValueError: the forward fails on ``example_inputs`` (wrong shape, dtype or device).
    """
    flags = {name: m.training for name, m in model.named_modules()}
    try:
        model.train()
        gm = trace(model)
        model.eval()
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*example_inputs)
        except Exception as err:
            got = [tuple(t.shape) for t in example_inputs]
            raise ValueError(
                f"`prune_model(example_inputs=...)`: expected inputs the model accepts "
                f"({_first_layer(gm)}), got tensors of shape {got}: the forward failed with "
                f"{type(err).__name__}: {err}. HINT: pass one batch shaped like the training data, "
                "e.g. `torch.randn(1, 3, 32, 32)` for CIFAR images."
            ) from err
    finally:
        for name, m in model.named_modules():
            m.training = flags.get(name, m.training)
    return gm
