"""Layer widths as plain data.

Describe a pruned model's widths, check them against a freshly built model of the original
architecture, and reshape that model's layers to them.

The description holds only ``str``/``int``/``list``/``dict`` values, so it travels inside a file
that ``torch.load(..., weights_only=True)`` opens::

    {"format": "lightning_sparsity.pruned_widths", "version": 1,
     "modules": {"conv1": {"class": "Conv2d", "in_channels": 1, "out_channels": 7, "groups": 1},
                 "fc1": {"class": "Linear", "in_features": 567, "out_features": 500}, ...}}

Every module that has a width (Conv/ConvTranspose 1d-3d, Linear, BatchNorm/InstanceNorm, GroupNorm,
LayerNorm, PReLU) is described; loading reshapes only those whose width differs.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_sparsity.pruning.features import FeatureLinear
from lightning_sparsity.pruning.layers import COUNT_ATTRS, Layer, Shape, layer_of
from lightning_sparsity.pruning.outputs import run_eval

WIDTHS_FORMAT = "lightning_sparsity.pruned_widths"
WIDTHS_VERSION = 1


def _family(module: nn.Module) -> Layer | None:
    """The registry entry of a layer that has widths to save."""
    layer = layer_of(module)
    return layer if layer is not None and layer.attrs else None


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def describe_inputs(
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...], module: str = ""
) -> dict[str, Any]:
    """The shapes and dtypes of ``example_inputs`` of submodule ``module``, as plain data.

    Stored beside the widths, they let
    [`reshape_to_widths`][lightning_sparsity.pruning.widths.reshape_to_widths] check that the widths
    of coupled
    layers agree (a forward pass), which no layer-by-layer check can see.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    return {
        "module": module,
        "specs": [
            {"shape": [1, *map(int, t.shape[1:])], "dtype": str(t.dtype).removeprefix("torch.")}
            for t in inputs
        ],
    }


def describe_widths(model: nn.Module, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The widths of every layer of ``model`` that has one, as plain data.

    ``inputs`` come from [`describe_inputs`][lightning_sparsity.pruning.widths.describe_inputs] when
    given.

    Example::

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 3, 5), nn.BatchNorm2d(3))
        >>> describe_widths(net)["modules"]["1"]
        {'class': 'BatchNorm2d', 'num_features': 3}
    """
    modules: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        family = _family(module)
        if family is None:
            own = _own_tensors(module)
            if own and name:  # any other module: the shapes of its own tensors (a layer scale)
                tensors = {k: [int(d) for d in t.shape] for k, t in own.items()}
                modules[name] = {"class": type(module).__name__, "tensors": tensors}
            continue
        entry: dict[str, Any] = {"class": type(module).__name__}
        if isinstance(module, FeatureLinear):  # a Linear reading some of its input features
            entry = {"class": "Linear", "total_features": module.total_features}
        entry.update({attr: _plain(getattr(module, attr)) for attr in family.attrs})
        modules[name] = entry
    description: dict[str, Any] = {
        "format": WIDTHS_FORMAT,
        "version": WIDTHS_VERSION,
        "modules": modules,
    }
    if inputs is not None:
        description["inputs"] = inputs
    return description


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {
        k: v for k, v in module._parameters.items() if v is not None
    }
    tensors.update(
        (k, v)
        for k, v in module._buffers.items()
        if v is not None and k not in module._non_persistent_buffers_set
    )
    return tensors


def _is_width(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_entry(name: str, module: nn.Module, entry: Any, family: Layer) -> dict[str, Any]:
    """The validated widths of one entry, or a ValueError saying which rule it breaks."""
    cls = type(module).__name__
    if not isinstance(entry, Mapping) or entry.get("class") != cls:
        got = entry.get("class") if isinstance(entry, Mapping) else type(entry).__name__
        raise ValueError(f"module {name!r}: saved class {got!r}, but the model has a `{cls}` there")
    missing = [a for a in family.attrs if a not in entry]
    if missing:
        raise ValueError(f"module {name!r} (`{cls}`): the saved widths lack {missing}")
    widths = {a: entry[a] for a in family.attrs}
    for attr, value in widths.items():
        original = _plain(getattr(module, attr))
        if isinstance(original, list):
            ok = (
                isinstance(value, list)
                and len(value) == len(original)
                and all(_is_width(v) and v <= o for v, o in zip(value, original))
            )
            rule = f"a list of {len(original)} positive ints, each <= {original}"
        else:
            ok = _is_width(value) and value <= original
            rule = f"a positive int <= the original {original}"
        if not ok:
            raise ValueError(
                f"module {name!r} (`{cls}`): expected `{attr}` to be {rule}, got {value!r}"
            )
    problem = family.rule(widths)
    if problem:
        raise ValueError(f"module {name!r} (`{cls}`): {problem}")
    return widths


def _check_tensors(
    name: str, module: nn.Module, entry: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Shape]]:
    """The shapes of a module without a family, and the counting attributes they imply.

    The shapes are its own tensors', each no larger than the model's.
    """
    cls = type(module).__name__
    if entry.get("class") != cls:
        raise ValueError(
            f"module {name!r}: saved class {entry.get('class')!r}, but the model has a "
            f"`{cls}` there"
        )
    own = _own_tensors(module)
    saved = entry.get("tensors")
    if not isinstance(saved, Mapping) or not set(saved) <= set(own):
        raise ValueError(f"module {name!r} (`{cls}`): the saved tensors do not match its own")
    shapes: dict[str, Shape] = {}
    widths: dict[str, Any] = {}
    for key, shape in saved.items():
        original = tuple(own[key].shape)
        if (
            not isinstance(shape, list)
            or len(shape) != len(original)
            or not all(_is_width(d) and d <= o for d, o in zip(shape, original))
        ):
            raise ValueError(
                f"module {name!r} (`{cls}`): expected `{key}` to have {len(original)} positive "
                f"sizes, each <= {list(original)}, got {shape!r}"
            )
        shapes[key] = tuple(shape)
        if shape and shape[0] != original[0]:
            for attr in COUNT_ATTRS:
                if getattr(module, attr, None) == original[0]:
                    widths[attr] = shape[0]
    return widths, shapes


def _resized(module: nn.Module, widths: dict[str, Any], shapes: dict[str, Shape]) -> nn.Module:
    """A copy of ``module`` (same class, dtype and device) with the given widths.

    Its tensors are uninitialised; the caller loads them.
    """
    new = copy.deepcopy(module)
    for attr, value in widths.items():
        setattr(new, attr, tuple(value) if isinstance(value, list) else value)
    for key, shape in shapes.items():
        old = new._parameters.get(key)
        if old is not None:
            new._parameters[key] = nn.Parameter(
                torch.empty(shape, dtype=old.dtype, device=old.device),
                requires_grad=old.requires_grad,
            )
            continue
        buf = new._buffers.get(key)
        if buf is not None:
            new._buffers[key] = torch.zeros(shape, dtype=buf.dtype, device=buf.device)
    return new


def _feature_linear(
    name: str, module: nn.Module, entry: Mapping[str, Any], widths: dict[str, Any]
) -> nn.Module:
    """The :class:`FeatureLinear` an entry with ``total_features`` describes (tensors empty)."""
    total = entry["total_features"]
    fits = _is_width(total) and int(widths["in_features"]) <= total
    if not isinstance(module, nn.Linear) or not fits or total > module.in_features:
        raise ValueError(
            f"module {name!r}: expected the saved selection of input features to read at most "
            f"the {getattr(module, 'in_features', None)!r} features of the model's "
            f"`{type(module).__name__}` there, got {widths['in_features']!r} of {total!r}"
        )
    return FeatureLinear(
        int(widths["in_features"]),
        int(widths["out_features"]),
        module.bias is not None,
        total_features=int(total),
        device=module.weight.device,
        dtype=module.weight.dtype,
    )


def _close(name: str, names: list[str]) -> str:
    near = difflib.get_close_matches(name, names, n=3)
    return f" Did you mean {near}?" if near else ""


def reshape_to_widths(  # noqa: C901 (one case per layer family)
    model: nn.Module,
    description: Any,
    state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
) -> nn.Module:
    """Shrink the layers of ``model`` (in place) to the widths in ``description``.

    Everything is checked before ``model`` is touched: the format tag, that every described module
    exists with the saved class, that each width is a positive int no larger than the model's, that
    groups divide channels, and that the tensors in ``state_dict`` have the shapes those widths
    imply. With ``strict`` the keys of ``state_dict`` must also equal the reshaped model's exactly
    (as ``load_state_dict(strict=True)`` will require). Layers whose width changes are replaced by
    new modules of the same class, dtype and device; the weights are not loaded here.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: naming the module and the rule it breaks; ``model`` is then unchanged.
    """
    if not isinstance(description, Mapping) or description.get("format") != WIDTHS_FORMAT:
        raise ValueError(f"expected a widths description with format {WIDTHS_FORMAT!r}")
    if description.get("version") != WIDTHS_VERSION:
        raise ValueError(
            f"widths format version {description.get('version')!r} is not supported "
            f"(this library reads version {WIDTHS_VERSION}); HINT: upgrade lightning-sparsity"
        )
    entries = description.get("modules")
    if not isinstance(entries, Mapping):
        raise ValueError("the widths description has no `modules` mapping")
    named = dict(model.named_modules())
    plan: dict[str, nn.Module] = {}
    current_state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in current_state.items()}
    for name, entry in entries.items():
        module = named.get(name) if isinstance(name, str) else None
        if module is None:
            raise ValueError(
                f"the saved widths describe a module {name!r} that `{type(model).__name__}` does "
                f"not have.{_close(str(name), list(named))} HINT: load into a freshly built model "
                "of the architecture that was pruned"
            )
        family = _family(module)
        if family is None and isinstance(entry, Mapping) and "tensors" in entry:
            prefix = f"{name}." if name else ""
            widths, shapes = _check_tensors(name, module, entry)
            for key, shape in shapes.items():
                expected[f"{prefix}{key}"] = shape
            if any(tuple(_own_tensors(module)[k].shape) != v for k, v in shapes.items()):
                plan[name] = _resized(module, widths, shapes)
            continue
        if family is None:
            raise ValueError(
                f"module {name!r} is a `{type(module).__name__}`, which has no width to restore"
            )
        widths = _check_entry(name, module, entry, family)
        current = {a: _plain(getattr(module, a)) for a in family.attrs}
        own = _own_tensors(module)
        shapes = {k: s for k, s in family.shapes(module, widths).items() if k in own}
        prefix = f"{name}." if name else ""
        for key, shape in shapes.items():
            if f"{prefix}{key}" in expected:
                expected[f"{prefix}{key}"] = shape
        if isinstance(entry, Mapping) and "total_features" in entry:
            plan[name] = _feature_linear(name, module, entry, widths)
            expected[f"{prefix}kept_features"] = (int(widths["in_features"]),)
            continue
        if widths == current:
            continue
        if not name:
            raise ValueError(f"the root module (`{type(module).__name__}`) cannot be reshaped")
        if torch.nn.utils.parametrize.is_parametrized(module):
            raise ValueError(f"module {name!r} is parametrized; remove the parametrization first")
        plan[name] = _resized(module, widths, shapes)
    _check_state_dict(expected, current_state, state_dict, strict=strict)
    order = sorted(plan, key=lambda n: n.count("."))  # parents before their children
    previous = {name: model.get_submodule(name) for name in order}
    for name in order:
        model.set_submodule(name, plan[name])
    inputs = description.get("inputs")
    if inputs is not None:
        try:
            _check_forward(model, inputs)
        except ValueError:
            for name in reversed(order):  # undo: the model is left exactly as it was
                model.set_submodule(name, previous[name])
            raise
    return model


def _check_forward(model: nn.Module, inputs: Any) -> None:
    """Run the reshaped model on zeros of the saved input shapes.

    Widths of coupled layers that disagree (a conv narrower than its BatchNorm, a Linear reading
    more features than arrive) fail here instead of at the user's first forward.
    """
    try:
        target = model.get_submodule(str(inputs["module"]))
        args = [
            torch.zeros(
                [int(d) for d in spec["shape"]],
                dtype=getattr(torch, str(spec["dtype"])),
                device=next(model.parameters(), torch.zeros(())).device,
            )
            for spec in inputs["specs"]
        ]
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"the saved input description is malformed ({err})") from None
    try:
        run_eval(target, tuple(args))
    except Exception as err:
        raise ValueError(
            "the saved widths do not fit together: a forward pass of "
            f"`{type(target).__name__}` on inputs of shape "
            f"{[spec['shape'] for spec in inputs['specs']]} fails "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "HINT: coupled layers (a conv and its BatchNorm, a layer and its consumer) must "
            "keep the same channels; export the model again"
        ) from None


def _check_state_dict(
    expected: dict[str, Shape],
    current: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, Any],
    *,
    strict: bool,
) -> None:
    if strict:
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"the saved tensors do not match the model's: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{'...' if len(unexpected) > 5 else ''}"
            )
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"saved entry {key!r} is a {type(value).__name__}, expected a tensor")
        if key in expected and tuple(value.shape) != expected[key]:
            raise ValueError(
                f"saved tensor {key!r} has shape {list(value.shape)}, but the saved widths imply "
                f"{list(expected[key])}"
            )
        if key in current and value.is_floating_point() != current[key].is_floating_point():
            raise ValueError(
                f"saved tensor {key!r} has dtype {value.dtype}, the model's is {current[key].dtype}"
            )
