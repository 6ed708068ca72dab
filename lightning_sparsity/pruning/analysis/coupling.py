"""Which channels can be removed exactly, and together with what: the coupling analysis.

The analysis walks a ``torch.fx`` graph whose nodes carry shapes (``ShapeProp``). Every tensor
with a channel dimension gets a [`Space`][lightning_sparsity.pruning.analysis.spaces.Space]; the
rules in `rules` say how
each op maps its inputs' channels to its output's and which channels it merges (removed
together), pins (kept) or constrains (groups balanced).

A group of merged channels is removable when every Conv/Linear that reads it (an *exit*) reads
only constants there: zeros are dropped, non-zero constants are folded exactly into the reader's
bias (or the BatchNorm right after it), and where folding is not exact (a zero-padded conv sees
zeros at the border) the group is kept. See
[`analyze`][lightning_sparsity.pruning.analysis.coupling.analyze].
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from lightning_sparsity.pruning.analysis.graph import layers_reaching_output
from lightning_sparsity.pruning.analysis.spaces import (
    ParamRef,
    Space,
    UnionFind,
    live,
    moved,
    param_ref,
)
from lightning_sparsity.pruning.layers import CHANNEL_NORM_TYPES, MIXING_TYPES


class UnsupportedOpError(ValueError):
    """Raised with ``strict=True`` when an op the analysis cannot follow gets removable channels.

    The op receives channels that could otherwise be removed (without ``strict`` they are kept, and
    the plan says why).
    """


@dataclass(frozen=True)
class Pin:
    """Slots that must be kept; ``error`` pins come from an op the analysis cannot follow."""

    slots: Tensor
    reason: str
    error: bool = False
    node: fx.Node | None = None


@dataclass(frozen=True)
class Fold:
    """Constants of removed input channels to fold into a layer's bias or its BatchNorm.

    Attributes:
        index: the removed input indices that carry a non-zero constant.
        value: those constants (float64).
        target: ``"bias"`` or the qualified name of the norm layer right after the layer.
    """

    index: Tensor
    value: Tensor
    target: str


@dataclass
class ChannelPlan:
    """What to remove: kept indices per layer, constants to fold, and why dead channels stay.

    Attributes:
        keep_out: layer -> kept output channels (Conv/ConvTranspose/Linear, and norm layers).
        keep_in: layer -> kept input channels (Conv/ConvTranspose/Linear).
        widths_out: layer -> original number of output channels.
        widths_in: layer -> original number of input channels.
        folds: layer -> constants to fold into it.
        kept_dead: layer -> {output channel: reason} for dead channels that must stay.
        keep_params: per-channel parameters used directly in ``forward`` -> kept indices.
        param_axes: those parameters -> the dimension the indices select.
        leaf_kinds: zoo modules analysed as a layer (see `leaves`) -> their kind.
        opaque: modules kept whole (their channels pinned) -> why.
    """

    keep_out: dict[str, Tensor] = field(default_factory=dict)
    keep_in: dict[str, Tensor] = field(default_factory=dict)
    widths_out: dict[str, int] = field(default_factory=dict)
    widths_in: dict[str, int] = field(default_factory=dict)
    folds: dict[str, Fold] = field(default_factory=dict)
    kept_dead: dict[str, dict[int, str]] = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    leaf_kinds: dict[str, str] = field(default_factory=dict)
    opaque: dict[str, str] = field(default_factory=dict)
    keep_params: dict[str, Tensor] = field(default_factory=dict)
    param_axes: dict[str, int] = field(default_factory=dict)

    def prefixed(self, prefix: str) -> ChannelPlan:
        """The same plan with every module name qualified by ``prefix``."""
        if not prefix:
            return self

        def q(name: str) -> str:
            return f"{prefix}.{name}"

        out = ChannelPlan(sources=tuple(q(n) for n in self.sources))
        for attr in ("keep_out", "keep_in", "widths_out", "widths_in", "folds", "kept_dead"):
            setattr(out, attr, {q(k): v for k, v in getattr(self, attr).items()})
        out.folds = {
            q(k): Fold(f.index, f.value, f.target if f.target == "bias" else q(f.target))
            for k, f in self.folds.items()
        }
        out.leaf_kinds = {q(k): v for k, v in self.leaf_kinds.items()}
        out.opaque = {q(k): v for k, v in self.opaque.items()}
        out.keep_params = {q(k): v for k, v in self.keep_params.items()}
        out.param_axes = {q(k): v for k, v in self.param_axes.items()}
        return out

    def update(self, other: ChannelPlan) -> None:
        """Add another region's plan (disjoint module names)."""
        for attr in (
            "keep_out", "keep_in", "widths_out", "widths_in", "folds", "kept_dead", "leaf_kinds",
            "opaque", "keep_params", "param_axes",
        ):  # fmt: skip
            getattr(self, attr).update(getattr(other, attr))
        self.sources = (*self.sources, *other.sources)

    def kept_summary(self) -> dict[str, int]:
        """Why dead channels stay: reason -> how many channels."""
        out: dict[str, int] = {}
        for channels in self.kept_dead.values():
            for why in channels.values():
                out[why] = out.get(why, 0) + 1
        return out

    def removed_out(self, layers_only: bool = True) -> dict[str, list[int]]:
        """Removed output channels per layer (Conv/Linear only unless ``layers_only=False``)."""
        out: dict[str, list[int]] = {}
        for name, keep in self.keep_out.items():
            if layers_only and name not in self.sources:
                continue
            mask = torch.ones(self.widths_out[name], dtype=torch.bool)
            mask[keep] = False
            removed = mask.nonzero().flatten().tolist()
            if removed:
                out[name] = removed
        return out

    @property
    def changed(self) -> bool:
        """Whether any layer loses a channel."""
        return any(k.numel() < self.widths_out[n] for n, k in self.keep_out.items()) or any(
            k.numel() < self.widths_in[n] for n, k in self.keep_in.items()
        )


def iter_spaces(value: Any) -> Iterator[Space]:
    """Every Space inside a nested tuple/list/dict of spaces."""
    if isinstance(value, Space):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from iter_spaces(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_spaces(item)


def source_line(node: fx.Node) -> str:
    """The user's source line that created ``node`` (from the trace's stack), or ``""``."""
    trace = node.stack_trace or (node.meta.get("stack_trace") if node.meta else None) or ""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
    lines = [
        ln.strip()
        for ln in str(trace).strip().splitlines()
        if ln.strip().startswith("File") and not any(d in ln for d in skip)
    ]
    if not lines:
        return ""
    last = lines[-1]  # 'File "path", line N, in fn'
    try:
        path = last.split('"')[1]
        line = last.split("line ")[1].split(",")[0]
    except IndexError:
        return ""
    return f"{path}:{line}"


def describe(gm: fx.GraphModule, node: fx.Node, prefix: str = "") -> str:
    """``node`` for a message: the op, the module it belongs to and the source line."""

    def q(name: str) -> str:
        return f"{prefix}.{name}" if prefix and name else (prefix or name)

    where = source_line(node)
    at = f" at {where}" if where else ""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return f"`{type(module).__name__}` module `{q(str(node.target))}`{at}"
    stack = node.meta.get("nn_module_stack") if node.meta else None
    owner = ""
    if stack:
        path = list(stack.values())[-1]
        path = path[0] if isinstance(path, tuple) else path
        owner = f" in `{q(str(path))}`" if path else ""
    elif prefix:
        owner = f" in `{prefix}`"
    if node.op == "call_method":
        return f"`Tensor.{node.target}`{owner}{at}"
    target = node.target
    name = getattr(target, "__name__", str(target))
    mod = str(getattr(target, "__module__", None) or "")
    mod = {"_operator": "operator", "torch._C._nn": "torch.nn.functional"}.get(mod, mod)
    return f"`{mod + '.' if mod else ''}{name}`{owner}{at}"


class Analysis:
    """State of one walk over a shape-annotated graph (see `analyze`)."""

    def __init__(
        self,
        gm: fx.GraphModule,
        leaves: Mapping[str, str] | None = None,
        opaque: Mapping[str, str] | None = None,
        prefix: str = "",
        strict: bool = False,
        boundary: str = "",
    ) -> None:
        self.gm = gm
        self.boundary = boundary
        self.leaves = dict(leaves or {})
        self.opaque = dict(opaque or {})
        self.prefix = prefix
        self.strict = strict
        self.modules = dict(gm.named_modules())
        self.uf = UnionFind()
        self.spaces: dict[fx.Node, Any] = {}
        self.layer_out: dict[str, Tensor] = {}
        self.layer_in: dict[str, Tensor] = {}
        self.norms: dict[str, Tensor] = {}
        self.params: dict[str, tuple[Tensor, ParamRef]] = {}
        self.exits: dict[str, list[tuple[fx.Node, Tensor]]] = {}
        self.pins: list[Pin] = []
        self.balance: list[tuple[list[Tensor], str]] = []
        self.nonempty: list[tuple[Tensor, str]] = []
        self.dead_out: dict[str, Tensor] = {}
        self.mutated = _mutated_inputs(gm, self.modules)

    # -- helpers used by the rules -------------------------------------------------------------
    def space(self, arg: Any) -> Any:
        """The channel space of ``arg`` when it is a node that has one, else ``None``."""
        return self.spaces.get(arg) if isinstance(arg, fx.Node) else None

    def module(self, node: fx.Node) -> nn.Module:
        """The submodule a ``call_module`` node calls."""
        return self.modules[str(node.target)]

    def describe(self, node: fx.Node) -> str:
        """``node`` for a message: the op, its module (qualified by ``prefix``) and source line."""
        return describe(self.gm, node, self.prefix)

    def pin(
        self, slots: Tensor, reason: str, error: bool = False, node: fx.Node | None = None
    ) -> None:
        """Keep channels ``slots`` for ``reason`` (``error``: a strict error if removable)."""
        self.pins.append(Pin(slots.flatten(), reason, error, node))

    def pin_all(
        self, value: Any, reason: str, error: bool = False, node: fx.Node | None = None
    ) -> None:
        """Keep every channel of every space inside ``value``, as `pin`."""
        for s in iter_spaces(value):
            self.pin(s.slots, reason, error, node)

    def module_slots(self, table: dict[str, Tensor], name: str, n: int) -> Tensor:
        """The slots of a module's channels, shared by every call of the module."""
        if name not in table:
            table[name] = self.uf.new(n)
        return table[name]

    def param_slots(self, ref: ParamRef) -> Tensor:
        """The slots of a per-channel parameter, shared by every use of it."""
        if ref.target not in self.params:
            self.params[ref.target] = (self.uf.new(ref.size), ref)
        return self.params[ref.target][0]

    def record_dead(self, name: str, value: Tensor) -> None:
        """Note which output channels of layer ``name`` emit a constant (for the report)."""
        known = ~torch.isnan(value)
        self.dead_out[name] = self.dead_out.get(name, torch.zeros_like(known)) | known

    def fixed(self, meta: Any, reason: str) -> Any:
        """Pinned spaces for a tensor (or tuple of tensors) whose channels cannot change."""
        # ShapeProp's TensorMetadata is itself a NamedTuple: only a tuple *of* metadata recurses
        if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):
            return tuple(self.fixed(m, reason) for m in meta)
        shape = getattr(meta, "shape", None)
        if shape is None or len(shape) < 2:
            return None
        slots = self.uf.new(int(shape[1]))
        self.pin(slots, reason)
        return Space(1, slots, live(int(shape[1])))

    def unknown(self, node: fx.Node, why: str = "the analysis cannot follow this op") -> Any:
        """Keep every channel reaching ``node`` and leaving it.

        With ``strict``, an error if they could otherwise be removed.
        """
        if node.op == "call_module" and str(node.target) in self.opaque:
            why = f"a module kept whole ({self.opaque[str(node.target)]})"
        for inp in node.all_input_nodes:
            self.pin_all(self.spaces.get(inp), why, error=True, node=node)
        return self.fixed(node.meta.get("tensor_meta"), f"output of {self.describe(node)}")

    # -- the walk --------------------------------------------------------------------------------
    def run(self) -> None:
        """Walk the graph in order, giving each node's output its channel space by the op's rule."""
        from lightning_sparsity.pruning.analysis.rules import lookup

        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                where = (
                    f"at the input of a part analysed on its own: {self.boundary}"
                    if self.boundary
                    else "a model input"
                )
                out = self.fixed(node.meta.get("tensor_meta"), where)
            elif node.op == "get_attr":
                attr = _attr(self.gm, str(node.target))
                out = param_ref(str(node.target), attr) if isinstance(attr, Tensor) else None
            elif _is_view(node) and isinstance(self.space(node.args[0]), ParamRef):
                out = moved(
                    self.space(node.args[0]),
                    node.meta.get("tensor_meta", None) and tuple(node.meta["tensor_meta"].shape),
                )
            elif node.op == "output":
                for name in layers_reaching_output(self.gm, MIXING_TYPES):
                    if name in self.layer_out:
                        self.pin(
                            self.layer_out[name],
                            f"at the output of a part analysed on its own: {self.boundary}"
                            if self.boundary
                            else f"`{name}` produces the model's output",
                        )
                self.pin_all(
                    _collect(self, node.args),
                    f"at the output of a part analysed on its own: {self.boundary}"
                    if self.boundary
                    else "reaches the model's output",
                )
                out = None
            else:
                rule = lookup(self, node)
                has_input = any(self.spaces.get(n) is not None for n in node.all_input_nodes)
                if rule is not None:
                    out = rule(self, node)
                elif has_input or node.meta.get("tensor_meta") is not None:
                    out = self.unknown(node)
                else:  # arithmetic on sizes
                    out = None
            if node in self.mutated:  # another user may see the in-place result: trust nothing
                out = _forget_values(out)
            self.spaces[node] = out

    # -- the decision ------------------------------------------------------------------------------
    def fold_target(self, name: str) -> tuple[str | None, str]:
        """Where constants reaching ``name``'s inputs can be folded exactly, or why not."""
        module = self.modules[name]
        calls = self.exits[name]
        if len(calls) != 1:
            return None, "a layer called more than once"
        if isinstance(module, _ConvNd):
            if name in self.leaves:
                return None, "a zoo conv that pads in its own forward"
            if module.transposed:
                return None, "a transposed conv spreads a constant unevenly"
            if module.padding_mode == "zeros" and _pads(module):
                return None, "whose zero padding makes the constant uneven at the border"
        if getattr(module, "bias", None) is not None:
            return "bias", ""
        users = list(calls[0][0].users)
        if (
            len(users) == 1
            and users[0].op == "call_module"
            and isinstance(self.modules[str(users[0].target)], CHANNEL_NORM_TYPES)
            and users[0].args[0] is calls[0][0]
            and sum(1 for n in self.gm.graph.nodes if n.target == users[0].target) == 1
        ):
            return str(users[0].target), ""
        return None, "which has no bias and no BatchNorm right after it to absorb the constant"

    def plan(self) -> ChannelPlan:
        """Solve the constraints: what can be removed, and why every other dead channel stays."""
        roots = self.uf.roots()
        n = roots.numel()
        pinned = torch.zeros(n, dtype=torch.bool)
        reason: dict[int, str] = {}
        error_pins: dict[int, Pin] = {}
        for p in self.pins:
            rs = roots[p.slots].unique().tolist()
            for r in rs:
                if p.error:
                    error_pins.setdefault(r, p)
                else:
                    reason.setdefault(r, p.reason)
            if not p.error:
                pinned[rs] = True
        live_blocked = torch.zeros(n, dtype=torch.bool)
        const_blocked = torch.zeros(n, dtype=torch.bool)
        targets: dict[str, str | None] = {}
        for name, calls in self.exits.items():
            target, why = self.fold_target(name)
            targets[name] = target
            in_roots = roots[self.layer_in[name]]
            for _, value in calls:
                is_live = torch.isnan(value)
                live_blocked[in_roots[is_live]] = True
                if target is None:
                    bad = (~is_live & (value != 0)).nonzero().flatten()
                    const_blocked[in_roots[bad]] = True
                    for i in bad.tolist():
                        msg = f"carries the constant {float(value[i]):.4g} into `{name}`, {why}"
                        reason.setdefault(int(in_roots[i]), msg)
        removable = ~pinned & ~live_blocked & ~const_blocked
        dead = self._dead_roots(roots)
        for r, p in error_pins.items():
            if removable[r] and dead[r] and self.strict:
                raise UnsupportedOpError(self._unsupported_message(roots, r, p))
        removable[list(error_pins)] = False
        for r, p in error_pins.items():
            op = self.describe(p.node) if p.node else "an op"
            reason.setdefault(r, f"reaches {op}: {p.reason}")
        removed = self._constrain(roots, removable, reason)
        return self._plan(roots, removed, live_blocked, reason, targets)

    def _dead_roots(self, roots: Tensor) -> Tensor:
        """Groups that some layer really emits as a constant.

        A strict error about a channel names a dead one, never a live channel that merely reaches
        the op.
        """
        out = torch.zeros(roots.numel(), dtype=torch.bool)
        for name, slots in self.layer_out.items():
            dead = self.dead_out.get(name)
            if dead is not None:
                out[roots[slots][dead]] = True
        return out

    def _constrain(self, roots: Tensor, removed: Tensor, reason: dict[int, str]) -> Tensor:
        """Un-remove groups until grouped convs/chunks stay balanced and no layer is emptied."""
        removed = removed.clone()
        balance = [([roots[p] for p in parts], why) for parts, why in self.balance]
        nonempty = [(roots[s], why) for s, why in self.nonempty if s.numel()]
        changed = True
        while changed:
            changed = False
            for parts, why in balance:
                counts = [int(removed[p].sum()) for p in parts]
                while max(counts) != min(counts):
                    target = min(counts)
                    for k, part in enumerate(parts):
                        while counts[k] > target:
                            r = int(part[removed[part]][-1])
                            removed[r] = False
                            reason.setdefault(r, why)
                            counts[k] = int(removed[part].sum())
                    counts = [int(removed[p].sum()) for p in parts]
                    changed = True
            for rs, why in nonempty:
                if bool(removed[rs].all()):
                    removed[rs[0]] = False
                    reason.setdefault(int(rs[0]), why)
                    changed = True
        return removed

    def _plan(
        self,
        roots: Tensor,
        removed: Tensor,
        live_blocked: Tensor,
        reason: dict[int, str],
        targets: dict[str, str | None],
    ) -> ChannelPlan:
        gone = removed[roots]  # per slot
        plan = ChannelPlan(sources=tuple(self.layer_out))
        plan.leaf_kinds = dict(self.leaves)
        plan.opaque = dict(self.opaque)
        for table, keep, widths in (
            (self.layer_out, plan.keep_out, plan.widths_out),
            (self.norms, plan.keep_out, plan.widths_out),
            (self.layer_in, plan.keep_in, plan.widths_in),
        ):
            for name, slots in table.items():
                keep[name] = (~gone[slots]).nonzero().flatten()
                widths[name] = slots.numel()
        for name, (slots, ref) in self.params.items():
            plan.keep_params[name] = (~gone[slots]).nonzero().flatten()
            plan.param_axes[name] = ref.axis
        for name, calls in self.exits.items():
            target = targets[name]
            value = calls[0][1]
            sel = gone[self.layer_in[name]] & ~torch.isnan(value) & (value != 0)
            if target is not None and bool(sel.any()):
                index = sel.nonzero().flatten()
                plan.folds[name] = Fold(index, value[index], target)
        for name, slots in self.layer_out.items():
            rs = roots[slots]
            dead = self.dead_out.get(name, torch.zeros(rs.numel(), dtype=torch.bool))
            kept = (dead & ~removed[rs]).nonzero().flatten().tolist()
            for o in kept:
                r = int(rs[o])
                why = reason.get(r)
                if why is None and bool(live_blocked[r]):
                    why = "merged with channels that carry a signal (a residual sum, a gate, ...)"
                plan.kept_dead.setdefault(name, {})[o] = why or "kept"
        return plan

    def _unsupported_message(self, roots: Tensor, root: int, pin: Pin) -> str:
        where = "a channel"
        for name, slots in self.layer_out.items():
            hits = (roots[slots] == root).nonzero().flatten()
            if hits.numel():
                where = f"output channel {int(hits[0])} of `{name}`"
                break
        op = self.describe(pin.node) if pin.node is not None else "an op"
        return (
            f"`prune_model`: cannot follow {op} ({pin.reason}); it receives {where}, which is dead "
            "and could otherwise be removed. HINT: express the op with supported ones (conv, "
            "linear, norms, activations, pooling, flatten/view, +, *, cat, chunk, channel "
            "shuffle), or keep that channel alive before exporting."
        )


_VIEW_METHODS = ("view", "reshape", "unsqueeze", "squeeze", "flatten", "expand", "expand_as")


def _is_view(node: fx.Node) -> bool:
    """A view that may only add or drop size-1 dimensions of a per-channel parameter."""
    if node.op == "call_method":
        return str(node.target) in _VIEW_METHODS
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return name in ("reshape", "unsqueeze", "squeeze", "getitem") and bool(node.args)
    return False


def _attr(gm: fx.GraphModule, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    try:
        return getattr(gm.get_submodule(owner) if owner else gm, name)
    except AttributeError:
        return None


def _pads(module: _ConvNd) -> bool:
    if isinstance(module.padding, str):
        return module.padding == "same" and any(k > 1 for k in module.kernel_size)
    return any(p > 0 for p in module.padding)


def _collect(a: Analysis, args: Any) -> list[Any]:
    out: list[Any] = []

    def visit(node: fx.Node) -> fx.Node:
        out.append(a.spaces.get(node))
        return node

    fx.node.map_arg(args, visit)
    return out


def _forget_values(out: Any) -> Any:
    if isinstance(out, Space):
        return out.with_value(torch.full_like(out.value, float("nan")))
    if isinstance(out, tuple):
        return tuple(_forget_values(o) for o in out)
    return out


def _is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("_")
    name = getattr(node.target, "__name__", "")
    return name.startswith("i") and getattr(node.target, "__module__", "") == "_operator"


def _mutated_inputs(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> set[fx.Node]:
    """Nodes changed in place by one user while another user also reads them."""
    out: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_method", "call_function") and node.args:
            src = node.args[0]
            if isinstance(src, fx.Node) and len(src.users) > 1 and _is_inplace(node, modules):
                out.add(src)
    return out


def analyze(
    gm: fx.GraphModule,
    leaves: Mapping[str, str] | None = None,
    opaque: Mapping[str, str] | None = None,
    prefix: str = "",
    strict: bool = False,
    boundary: str = "",
) -> ChannelPlan:
    """Run the coupling analysis on a traced graph annotated by ``ShapeProp``.

    Names are relative to ``gm`` (``prefix`` only qualifies the messages).

    Raises:
        UnsupportedOpError: with ``strict``, an op the analysis cannot follow receives a channel
            that could otherwise be removed (the message names the op, the module and the line).
    """
    analysis = Analysis(gm, leaves, opaque, prefix, strict, boundary)
    analysis.run()
    return analysis.plan()
