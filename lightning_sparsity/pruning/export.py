"""``prune_model``: a physically smaller copy of a model without its dead channels, verified equal.

A channel is *dead* when the parameters producing it are all exactly zero (the conv filter, its
bias, and the following BatchNorm's scale and shift), so that it always emits zero. The coupling
analysis (`analysis`) decides which dead channels can go together
(residual sums, concatenations, grouped convs, gates, flatten) and how a dead channel that still
emits a constant is folded into its readers; the surgery (`lightning_sparsity.pruning.surgery`)
shrinks each layer; the result is checked against the original on the example inputs.

>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
>>> with torch.no_grad():
...     net[0].weight[1:3] = 0
...     net[0].bias[1:3] = 0
>>> small = prune_model(net, torch.randn(1, 1, 8, 8))
>>> small[0].out_channels, small[3].in_features
(2, 72)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from lightning_sparsity.pruning.analysis.capture import capture
from lightning_sparsity.pruning.analysis.coupling import ChannelPlan, Fold, analyze
from lightning_sparsity.pruning.analysis.leaves import shrink_channelwise
from lightning_sparsity.pruning.analysis.spaces import contribution
from lightning_sparsity.pruning.features import drop_dead_features
from lightning_sparsity.pruning.layers import replace_tensor
from lightning_sparsity.pruning.outputs import run_eval, tensors
from lightning_sparsity.pruning.surgery import is_masked, shrink

ExampleInputs = Tensor | Sequence[Tensor]


def as_inputs(example_inputs: Any, owner: str = "prune_model") -> tuple[Any, ...]:
    """``example_inputs`` as the positional arguments of ``forward``.

    A tensor is one argument; a tuple (or a list of tensors) holds one entry per argument, each a
    tensor or a structure of tensors (a detection model's list of images: ``([img1, img2],)``).

    Raises:
        TypeError: no tensor anywhere in ``example_inputs``.
    """
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and tensors(example_inputs):
        return tuple(example_inputs)
    raise TypeError(
        f"`{owner}(example_inputs=...)`: expected a tensor or a tuple of the forward's positional "
        f"arguments holding tensors, got {type(example_inputs).__name__}. "
        "HINT: pass one batch, e.g. `torch.randn(1, 3, 32, 32)`, or `([image1, image2],)` for "
        "a model that takes a list."
    )


def _check_device(model: nn.Module, inputs: tuple[Any, ...], owner: str) -> None:
    param = next(model.parameters(), None)
    if param is None:
        return
    for t in tensors(inputs):
        if t.device != param.device:
            raise ValueError(
                f"`{owner}(example_inputs=...)`: expected inputs on the model's device "
                f"{param.device}, got {t.device}. HINT: `example_inputs.to({str(param.device)!r})`."
            )


def _check_plain_weights(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if is_masked(module):
            raise ValueError(
                f"`prune_model(model)`: expected plain weights, but layer {name or 'model'!r} "
                "carries a `torch.nn.utils.prune` mask or a parametrization. HINT: make the "
                "pruning permanent first (`torch.nn.utils.prune.remove(module, 'weight')`, or "
                "Lightning's `ModelPruning(make_pruning_permanent=True)`)."
            )


def _check_finite(model: nn.Module) -> None:
    """A NaN/inf weight is neither dead nor comparable: refuse it, naming the tensors."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    bad = [n for n, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(
            f"`prune_model(model)`: expected finite weights, got NaN or inf in {bad[:8]}"
            f"{'...' if len(bad) > 8 else ''}; dead channels cannot be told and the pruned model "
            "cannot be verified. HINT: the training diverged: lower the learning rate or the "
            "regularisation strength, or clip gradients."
        )


def _analyze(work: nn.Module, inputs: tuple[Any, ...], strict: bool) -> ChannelPlan:
    """Capture ``work`` (a copy: it is run in eval mode) region by region and analyse it."""
    found = capture(work, inputs)
    plan = ChannelPlan()
    for region in found.regions:
        part = analyze(region.gm, region.leaves, region.opaque, region.prefix, strict, region.why)
        plan.update(part.prefixed(region.prefix))
    for name, why in found.untraced.items():
        plan.opaque.setdefault(name, why)
    return plan


def plan_pruning(
    model: nn.Module, example_inputs: ExampleInputs, *, strict: bool = False
) -> ChannelPlan:
    """The coupling analysis of ``model``: which channels go, what is folded, what stays and why.

    Read-only: the analysis runs on a copy in eval mode, so ``model``'s parameters, buffers
    (BatchNorm statistics), training flags and hooks stay exactly as they were.

    Raises:
        TypeError: ``example_inputs`` is not a tensor or a tuple of tensors.
        ValueError: the forward fails on ``example_inputs``.
        TraceError: no part of the model can be captured (``analysis.graph.TraceError``).
        UnsupportedOpError: with ``strict=True``, an op the analysis cannot follow receives a
            channel that could otherwise be removed (``analysis.coupling.UnsupportedOpError``).
    """
    inputs = as_inputs(example_inputs, "plan_pruning")
    _check_device(model, inputs, "plan_pruning")
    return _analyze(copy.deepcopy(model), inputs, strict)


def dead_channels(model: nn.Module, example_inputs: ExampleInputs) -> dict[str, list[int]]:
    """The output channels of each Conv/Linear layer that `prune_model` would remove.

    Only channels that can be removed exactly are listed (coupling taken into account: a channel
    dead in one branch of a residual sum but alive in the other is not). Layers losing nothing are
    absent.

    Example::

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> with torch.no_grad():
        ...     net[0].weight[2] = 0
        ...     net[0].bias[2] = 0
        >>> dead_channels(net, torch.randn(1, 3))
        {'0': [2]}
    """
    return plan_pruning(model, example_inputs).removed_out()


def _fold(named: dict[str, nn.Module], name: str, fold: Fold) -> None:
    """Add the constants of removed inputs to ``name``'s bias (or its BatchNorm's mean)."""
    module = cast(_ConvNd | nn.Linear, named[name])
    weight = module.weight.detach()
    groups = module.groups if isinstance(module, _ConvNd) else 1
    w = weight.reshape(weight.shape[0], weight.shape[1], -1)
    value = torch.zeros(w.shape[1] * groups, dtype=torch.float64)
    value[fold.index] = fold.value
    delta = contribution(w, groups, fold.index, value)
    with torch.no_grad():
        if fold.target == "bias":
            bias = cast(Tensor, module.bias)
            bias.add_(delta.to(dtype=bias.dtype, device=bias.device))
        else:
            mean = getattr(named[fold.target], "running_mean", None)
            if isinstance(mean, Tensor):  # batch statistics absorb a shift on their own
                mean.sub_(delta.to(dtype=mean.dtype, device=mean.device))


def apply_plan(model: nn.Module, plan: ChannelPlan) -> nn.Module:
    """Fold the plan's constants and shrink its layers, in place; returns ``model``."""
    named = dict(model.named_modules())
    aliases: dict[int, list[str]] = {}
    for alias, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(alias)
    for name, fold in plan.folds.items():
        _fold(named, name, fold)
    for name in dict.fromkeys([*plan.keep_out, *plan.keep_in]):
        keep_out, keep_in = plan.keep_out.get(name), plan.keep_in.get(name)
        if keep_out is not None and keep_out.numel() == plan.widths_out[name]:
            keep_out = None
        if keep_in is not None and keep_in.numel() == plan.widths_in[name]:
            keep_in = None
        if keep_out is not None or keep_in is not None:
            if plan.leaf_kinds.get(name) == "channelwise":
                keep = keep_out if keep_out is not None else keep_in
                new = shrink_channelwise(named[name], cast(Tensor, keep), plan.widths_out[name])
            else:
                new = shrink(named[name], keep_out, keep_in)
            for alias in aliases[id(named[name])]:  # a module registered under several names
                model.set_submodule(alias, new)
    for target, keep in plan.keep_params.items():  # per-channel parameters used in `forward`
        owner_name, _, attr = target.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, attr)
        axis = plan.param_axes[target]
        if keep.numel() == old.shape[axis]:
            continue
        replace_tensor(owner, attr, old.detach().index_select(axis, keep.to(old.device)))
    return model


def verify_equal(
    original: nn.Module,
    pruned: nn.Module,
    example_inputs: ExampleInputs,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> float:
    """Run both models in eval mode on ``example_inputs``; the largest absolute difference.

    Raises:
        RuntimeError: the pruned model fails, or an output differs by more than
            ``atol + rtol * |original|``.
    """
    inputs = as_inputs(example_inputs, "verify_equal")
    expected = run_eval(original, inputs)
    try:
        got = run_eval(pruned, inputs)
    except Exception as err:
        raise RuntimeError(
            f"`prune_model`: the pruned model's forward failed: {type(err).__name__}: {err}. "
            "HINT: a size written literally in `forward` (e.g. `x.view(-1, 800)`) does not follow "
            "the pruned widths; compute it from the tensor instead."
        ) from err
    if len(expected) != len(got) or any(a.shape != b.shape for a, b in zip(expected, got)):
        raise RuntimeError(
            "`prune_model`: the pruned model's outputs have shapes "
            f"{[tuple(t.shape) for t in got]}, expected {[tuple(t.shape) for t in expected]}."
        )
    worst = 0.0
    for i, (a, b) in enumerate(zip(expected, got)):
        if not a.is_floating_point():
            if not torch.equal(a, b):
                raise RuntimeError(f"`prune_model`: output {i} differs after pruning.")
            continue
        diff = (a.double() - b.double()).abs()
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        if bool((diff > atol + rtol * a.double().abs()).any()) or bool(diff.isnan().any()):
            raise RuntimeError(
                f"`prune_model`: the pruned model is not equivalent: output {i} differs by up to "
                f"{float(diff.max()):.3g} (tolerance atol={atol} + rtol={rtol} * |output|). "
                "This is a bug in the export; please report it with the model."
            )
    return worst


def _nothing_message(plan: ChannelPlan) -> str:
    msg = (
        f"`prune_model(model)`: expected at least one dead channel (an output channel whose "
        f"filter, bias and following BatchNorm scale and shift are all exactly zero) that can be "
        f"removed, found none among {len(plan.sources)} Conv/Linear layers."
    )
    kept = [(n, o, why) for n, d in plan.kept_dead.items() for o, why in d.items()]
    if kept:
        shown = "; ".join(f"`{n}` channel {o}: {why}" for n, o, why in kept[:5])
        more = f" (and {len(kept) - 5} more)" if len(kept) > 5 else ""
        msg += f" {len(kept)} dead channels must stay: {shown}{more}."
    return msg + (
        " HINT: train with a sparsity callback and `FilterThresholding` first (it zeroes whole "
        "filters with their BatchNorm), or pass `allow_unchanged=True` for an unchanged copy."
    )


def prune_model(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    allow_unchanged: bool = False,
    strict: bool = False,
    drop_features: bool = True,
) -> nn.Module:
    """A new, physically smaller copy of ``model`` with every removable dead channel removed.

    The copy has the same module names and classes as ``model`` (a Linear that stops reading some
    input features becomes a ``FeatureLinear``, a subclass); only the widths of some layers
    (Conv/Linear/BatchNorm) shrink, so a state dict plus the widths rebuild it from a fresh model.
    Dead channels that emit a non-zero constant (a bias or BatchNorm shift left non-zero) are
    folded into their readers where that is exact (eval-mode statistics), else kept. ``model`` is
    not modified.

    Args:
        model: the trained network (``torch.fx``-traceable).
        example_inputs: one batch (a tensor, or a tuple of the forward's positional tensors).
        verify: compare the outputs of both models on ``example_inputs`` in eval mode.
        rtol: relative tolerance of the check.
        atol: absolute tolerance of the check.
        allow_unchanged: return an unchanged copy (with a warning) instead of raising when
            nothing can be removed.
        strict: raise (``UnsupportedOpError``) when an op, module or construct the analysis
            cannot follow keeps a dead channel that could otherwise go; by default such channels
            are kept (with everything coupled to them) and ``plan_pruning(...).kept_dead`` says
            which and why (the op, its module and source line).
        drop_features: also remove the input features that a Linear layer ignores one by one
            (all-zero weight columns, e.g. single positions of a flattened conv channel): the
            layer becomes a [`FeatureLinear`][lightning_sparsity.pruning.features.FeatureLinear]
            that reads the kept features (their indices are a buffer in its state dict).

    Returns:
        The pruned copy, in the same training mode as ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``example_inputs`` not tensors.
        ValueError: the forward fails on ``example_inputs`` (message: expected vs got), an op the
            analysis cannot follow receives a dead channel (``UnsupportedOpError``, naming the op
            and the layer), nothing can be removed (unless ``allow_unchanged``), or a weight or
            buffer holds NaN or inf (named).
        lightning_sparsity.pruning.analysis.graph.TraceError: the model cannot be traced.
        RuntimeError: the check fails (outputs differ beyond ``atol + rtol * |output|``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`prune_model(model=...)`: expected an nn.Module, got {type(model).__name__}."
        )
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not isinstance(tol, (int, float)) or tol < 0:
            raise ValueError(f"`prune_model({name}={tol!r})`: expected `{name}` >= 0, got {tol!r}.")
    inputs = as_inputs(example_inputs)
    _check_device(model, inputs, "prune_model")
    _check_plain_weights(model)
    _check_finite(model)
    work = copy.deepcopy(model)
    flags = {name: m.training for name, m in work.named_modules()}
    plan = _analyze(work, inputs, strict)
    for name, m in work.named_modules():
        m.training = flags.get(name, m.training)
    if plan.changed:
        apply_plan(work, plan)
    features = drop_dead_features(work) if drop_features else {}
    if not plan.changed and not features:
        if not allow_unchanged:
            raise ValueError(_nothing_message(plan))
        warnings.warn(_nothing_message(plan).split(" HINT")[0], stacklevel=2)
        return work
    if verify:
        verify_equal(model, work, inputs, rtol=rtol, atol=atol)
    return work
