"""Capture a model's graph for the coupling analysis, keeping what cannot be captured.

``torch.fx`` traces the model in eval mode. Layers are leaves of the trace (the ``torch.nn``
ones, and a zoo's subclasses of them whose behaviour on channels `leaves` checks on the
layer's real inputs); other modules are traced through. A submodule whose forward ``torch.fx``
cannot follow (shape-dependent Python, ``torch.jit.isinstance``...) becomes an *opaque* leaf: the
channels that reach it or leave it are kept, and it is captured again as a region of its own, on
the inputs it received in a real forward. A model whose own forward cannot be traced is split into
its children the same way. Each region's inputs and outputs keep all their channels, so pruning
inside a region never changes what it computes.

Everything here runs on the model it is given: callers pass a copy (``prune_model`` does) or use
[`capture`][lightning_sparsity.pruning.analysis.capture.capture] through `plan_pruning`, which
copies.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from lightning_sparsity.pruning.analysis.graph import TraceError, trace_with_opaque
from lightning_sparsity.pruning.analysis.leaves import LeafKind, leaf_kind
from lightning_sparsity.pruning.outputs import training_mode


@dataclass
class Region:
    """One traced part of a model.

    Attributes:
        prefix: qualified name of the traced module in the model (``""``: the model itself).
        gm: the shape-annotated graph; node targets are relative to the region's module.
        leaves: qualified names (relative) -> the kind of layer a zoo module was proven to be.
        opaque: relative names of submodules kept whole, with the reason.
    """

    prefix: str
    gm: fx.GraphModule
    leaves: dict[str, LeafKind] = field(default_factory=dict)
    opaque: dict[str, str] = field(default_factory=dict)
    why: str = ""  # why this module is a region of its own ("" for the model)


@dataclass
class Capture:
    """The regions of a model and what could not be captured at all."""

    regions: list[Region]
    untraced: dict[str, str] = field(default_factory=dict)  # module -> why (never ran, ...)


@contextlib.contextmanager
def without_hooks(model: nn.Module) -> Iterator[None]:
    """The user's forward hooks do not fire while the analysis runs the model (restored)."""
    saved = [(m, m._forward_hooks, m._forward_pre_hooks) for m in model.modules()]
    for m, _, _ in saved:
        m._forward_hooks = OrderedDict()
        m._forward_pre_hooks = OrderedDict()
    try:
        yield
    finally:
        for m, post, pre in saved:
            m._forward_hooks, m._forward_pre_hooks = post, pre


def record_inputs(model: nn.Module, inputs: tuple[Any, ...]) -> dict[nn.Module, tuple[Any, ...]]:
    """The positional arguments (keywords bound in) of every submodule's first call.

    They come from one eval-mode forward without gradients on ``model``.
    """
    seen: dict[nn.Module, tuple[Any, ...]] = {}
    handles = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module in seen:
            return
        try:
            bound = inspect.signature(module.forward).bind(*args, **kwargs)
            bound.apply_defaults()
            seen[module] = tuple(bound.args) + tuple(bound.kwargs.values())
        except (TypeError, ValueError):
            seen[module] = tuple(args)

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _with_params(gm: fx.GraphModule) -> set[str]:
    out = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(str(node.target))
            if any(True for _ in m.parameters()):
                out.add(str(node.target))
    return out


def _trace_both(
    module: nn.Module, leaves: set[nn.Module]
) -> tuple[fx.GraphModule | None, set[nn.Module], str]:
    """The eval-mode graph, or the training-mode one when it calls more layers.

    The training-mode graph is used when it calls layers the eval-mode graph does not (auxiliary
    heads: they must keep fitting their inputs after pruning).
    """
    gm, opaque, why = trace_with_opaque(module, leaves)
    if gm is None:
        return gm, opaque, why
    with training_mode(module, True):
        gm_train, opaque_train, _ = trace_with_opaque(module, leaves)
    if gm_train is not None and _with_params(gm_train) - _with_params(gm):
        return gm_train, opaque_train, ""
    return gm, opaque, why


def capture(model: nn.Module, inputs: tuple[Any, ...]) -> Capture:
    """Split ``model`` into traced regions (see the module docstring).

    ``model`` is put in eval mode; pass a copy.

    Raises:
        ValueError: the forward fails on ``inputs``.
        TraceError: not even one region could be captured.
    """
    model.eval()
    with without_hooks(model):
        return _capture(model, inputs)


def _capture(model: nn.Module, inputs: tuple[Any, ...]) -> Capture:  # noqa: C901 (one walk over the module tree with its fallbacks)
    try:
        calls = record_inputs(model, inputs)
    except Exception as err:
        raise ValueError(
            f"`prune_model(example_inputs=...)`: expected inputs the model accepts, got "
            f"{_describe(inputs)}: the forward failed with {type(err).__name__}: {err}. HINT: "
            "pass one batch shaped like the training data, e.g. `torch.randn(2, 3, 32, 32)`."
        ) from err
    names = {m: n for n, m in model.named_modules()}
    leaves: dict[nn.Module, LeafKind] = {}
    for m, args in calls.items():
        kind = leaf_kind(m, args)
        if kind is not None:
            leaves[m] = kind
    regions: list[Region] = []
    untraced: dict[str, str] = {}
    todo: list[tuple[nn.Module, str]] = [(model, "")]
    done: set[nn.Module] = set()
    while todo:
        module, region_why = todo.pop(0)
        if module in done:
            continue
        done.add(module)
        name = names.get(module, "")
        if module not in calls:
            untraced[name] = "never called in the forward on the example inputs"
            continue
        if module is not model and (module in leaves or _is_torch_layer(module)):
            region = _leaf_region(model, name, module, calls[module], region_why)
            if region is not None:
                kind = leaves.get(module)
                if kind is not None:
                    region.leaves[name.rsplit(".", 1)[-1]] = kind
                regions.append(region)
                continue
        gm, opaque, why = _trace_both(module, set(leaves))
        if gm is not None:
            try:
                with torch.no_grad():
                    ShapeProp(gm).propagate(*calls[module])
            except Exception as err:
                gm, why = None, f"shape propagation failed: {type(err).__name__}: {err}"
        if gm is None:
            children = [c for c in module.children() if any(True for _ in c.parameters())]
            untraced[name] = why
            label = f"`{name or type(model).__name__}` cannot be traced ({why})"
            todo.extend((c, label) for c in children)
            if module is model and not children:
                raise TraceError(
                    f"`{type(model).__name__}` cannot be captured: {why}. HINT: the analysis "
                    "needs a forward torch.fx can trace, or submodules it can."
                )
            continue
        region = Region(name, gm, why=region_why)
        for m, kind in leaves.items():
            rel = _relative(names[m], name)
            if rel:
                region.leaves[rel] = kind
        for m in opaque:
            sub = names[m]
            region.opaque[sub[len(name) + 1 :] if name else sub] = "torch.fx cannot trace it"
            todo.append((m, f"`{sub}` cannot be traced inside `{name or type(model).__name__}`"))
        regions.append(region)
    if not regions:
        whys = "; ".join(f"{k or type(model).__name__}: {v}" for k, v in untraced.items())
        raise TraceError(
            f"`{type(model).__name__}` cannot be captured: no part of it can be traced "
            f"({whys[:500]})."
        )
    return Capture(regions, untraced)


def _is_torch_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn") and not isinstance(
        module, nn.Sequential | nn.ModuleList | nn.ModuleDict
    )


def _leaf_region(
    model: nn.Module, name: str, module: nn.Module, args: tuple[Any, ...], why: str
) -> Region | None:
    """A region holding one layer called on its own (its parent cannot be traced)."""
    parent_name, _, short = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    graph = fx.Graph()
    params = list(inspect.signature(module.forward).parameters)
    placeholders = [graph.placeholder(p) for p in params[: len(args)]]
    graph.output(graph.call_module(short, tuple(placeholders)))
    gm = fx.GraphModule(parent, graph, type(parent).__name__)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception:
        return None
    return Region(parent_name, gm, why=why)


def _relative(qualname: str, prefix: str) -> str | None:
    """``qualname`` relative to the module named ``prefix``, ``None`` if not inside it."""
    if not prefix:
        return qualname or None
    return qualname[len(prefix) + 1 :] if qualname.startswith(prefix + ".") else None


def _describe(inputs: tuple[Any, ...]) -> str:
    out = []
    for t in inputs:
        out.append(
            f"tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        )
    return ", ".join(out) or "no inputs"
