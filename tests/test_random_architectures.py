"""Property-based test of ``prune_model`` on random CNNs (hypothesis).

A random *spec* (a list of blocks: conv, grouped conv, depthwise conv, BatchNorm, activations,
max/avg pooling, residual ``+``, ``torch.cat``, then flatten + Linear(s) or global pooling +
Linear) builds both an fx-traceable ``nn.Module`` and, independently of the library, an *oracle*
of its channels. Random filters are killed (weights and bias zeroed, and the scale and shift of
the BatchNorm that normalises them). The oracle then says, from the spec and the kill sets alone:

* which channels are exactly zero: a killed filter; a grouped/depthwise filter (no bias) all of
  whose input channels are zero; a BatchNorm/activation/pool of a zero channel (the activations
  used all map 0 to 0); a sum only where every operand is zero; a concatenation channel by channel;
* which of them can go: channels are merged through the ops that pass them on (``+`` merges its
  operands, ``cat`` maps offsets, a depthwise conv's output channel goes with its input), and a
  merged set goes when every Conv/Linear that reads it reads zeros there and it is neither a
  network input channel nor a model output unit (so the live input of a killed depthwise filter
  goes too: nothing reads it any more);
* the exact parameter count of the pruned model (conv ``out * in/groups * k*k (+ out)``, BatchNorm
  ``2 * C``, Linear ``out * in (+ out)`` with a flattened channel worth ``h*w`` inputs).

Checked: the pruned model's outputs equal the original's on fresh inputs; its parameter count and
every layer's widths equal the oracle's. Grouped convs keep their groups the same size: when the
oracle's set leaves a grouped conv unbalanced, the library keeps some zero channels, so there the
checks are that every removed channel is in the oracle's set, the groups are balanced, and the
parameter count is the oracle's formula applied to what was removed. The same weaker checks apply
when the oracle's set would empty a layer (the library then keeps one of its channels).

``REL_MAX_EXAMPLES`` (environment) raises the number of examples for a long run by hand.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_sparsity import prune_model
from lightning_sparsity.pruning.export import plan_pruning

MAX_EXAMPLES = int(os.environ.get("REL_MAX_EXAMPLES", "40"))
ACTS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


# ====================================================================== the spec and the module
@dataclass
class Layer:
    """A Conv2d / Linear / BatchNorm2d of the spec (the oracle's view of it)."""

    kind: str  # "conv", "linear", "bn"
    cin: int
    cout: int
    k: int = 1
    groups: int = 1
    bias: bool = True
    pad: int = 0
    hw_in: int = 1  # Linear after flatten: inputs per channel


@dataclass
class Spec:
    c0: int
    hw: int
    ops: list[tuple[Any, ...]] = field(default_factory=list)  # (op, *args) executed in order
    layers: dict[str, Layer] = field(default_factory=dict)
    output: str = ""


class Net(nn.Module):
    """Runs ``spec.ops`` over named tensors (a static Python loop: fx unrolls it)."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.ops = list(spec.ops)
        mods: dict[str, nn.Module] = {}
        for name, lay in spec.layers.items():
            if lay.kind == "conv":
                mods[name] = nn.Conv2d(
                    lay.cin, lay.cout, lay.k, padding=lay.pad, groups=lay.groups, bias=lay.bias
                )
            elif lay.kind == "linear":
                mods[name] = nn.Linear(lay.cin * lay.hw_in, lay.cout, bias=lay.bias)
            else:
                mods[name] = nn.BatchNorm2d(lay.cout)
        for op in spec.ops:
            if op[0] == "act":
                mods[op[1]] = ACTS[op[4]]()
            elif op[0] == "pool":
                mods[op[1]] = nn.MaxPool2d(2) if op[4] == "max" else nn.AvgPool2d(2)
            elif op[0] == "gap":
                mods[op[1]] = nn.AdaptiveAvgPool2d(1)
        self.layers = nn.ModuleDict(mods)

    def forward(self, x: Tensor) -> Tensor:
        env = {"x": x}
        for op in self.ops:
            kind = op[0]
            if kind in ("layer", "act", "pool", "gap"):
                env[op[3]] = self.layers[op[1]](env[op[2]])
            elif kind == "add":
                env[op[3]] = env[op[1]] + env[op[2]]
            elif kind == "cat":
                env[op[3]] = torch.cat([env[op[1]], env[op[2]]], dim=1)
            elif kind == "flatten":
                env[op[2]] = torch.flatten(env[op[1]], 1)
        return env["out"]


class Builder:
    """Draws a random spec block by block; tracks each named tensor's channels and size."""

    def __init__(self, draw: Any) -> None:
        self.draw = draw
        c0 = draw(st.integers(1, 3))
        hw = draw(st.sampled_from([6, 8, 10]))
        self.spec = Spec(c0, hw)
        self.shape: dict[str, tuple[int, int]] = {"x": (c0, hw)}  # tensor -> (channels, h=w)
        self.n = 0

    def fresh(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def layer(self, src: str, lay: Layer, hw_out: int) -> str:
        name, dst = self.fresh(lay.kind), self.fresh("t")
        self.spec.layers[name] = lay
        self.spec.ops.append(("layer", name, src, dst))
        self.shape[dst] = (lay.cout, hw_out)
        return dst

    def act(self, src: str) -> str:
        kind = self.draw(st.sampled_from(sorted(ACTS)))
        dst = self.fresh("t")
        self.spec.ops.append(("act", self.fresh("act"), src, dst, kind))
        self.shape[dst] = self.shape[src]
        return dst

    def conv(self, src: str, cout: int, *, k: int, pad: int, groups: int = 1, bn: bool) -> str:
        cin, hw = self.shape[src]
        bias = groups == 1 and self.draw(st.booleans())  # grouped/depthwise: no bias
        out = self.layer(src, Layer("conv", cin, cout, k, groups, bias, pad), hw - k + 1 + 2 * pad)
        if bn:
            out = self.layer(out, Layer("bn", cout, cout), self.shape[out][1])
        return out

    def block(self, x: str) -> str:
        c, hw = self.shape[x]
        kinds = ["conv", "conv", "dw", "cat", "res"]
        divisors = [g for g in range(2, c) if c % g == 0]
        if divisors:
            kinds.append("group")
        if hw >= 4 and hw % 2 == 0:
            kinds.append("pool")
        kind = self.draw(st.sampled_from(kinds))
        d = self.draw
        if kind == "conv":
            k = d(st.sampled_from([1, 3]))
            pad = d(st.sampled_from([0, k // 2])) if hw > 2 else k // 2
            y = self.conv(x, d(st.integers(2, 8)), k=k, pad=pad, bn=d(st.booleans()))
            return self.act(y)
        if kind == "group":
            g = d(st.sampled_from(divisors))
            y = self.conv(x, g * d(st.integers(1, 2)), k=3, pad=1, groups=g, bn=d(st.booleans()))
            return self.act(y)
        if kind == "dw":
            return self.act(self.conv(x, c, k=3, pad=1, groups=c, bn=d(st.booleans())))
        if kind == "pool":
            dst = self.fresh("t")
            self.spec.ops.append(
                ("pool", self.fresh("pool"), x, dst, d(st.sampled_from(["max", "avg"])))
            )
            self.shape[dst] = (c, hw // 2)
            return dst
        if kind == "res":
            y = self.act(self.conv(x, c, k=3, pad=1, bn=d(st.booleans())))
            if d(st.booleans()):
                y = self.conv(y, c, k=3, pad=1, bn=d(st.booleans()))
            short = x
            if d(st.booleans()):
                short = self.conv(x, c, k=1, pad=0, bn=d(st.booleans()))
            dst = self.fresh("t")
            self.spec.ops.append(("add", y, short, dst))
            self.shape[dst] = (c, hw)
            return self.act(dst)
        # cat: two branches read x, concatenated
        a = self.conv(x, d(st.integers(1, 5)), k=3, pad=1, bn=d(st.booleans()))
        if d(st.booleans()) and c > 1:
            b = self.conv(x, c, k=3, pad=1, groups=c, bn=d(st.booleans()))  # depthwise branch
        else:
            b = self.conv(x, d(st.integers(1, 5)), k=1, pad=0, bn=d(st.booleans()))
        dst = self.fresh("t")
        self.spec.ops.append(("cat", a, b, dst))
        self.shape[dst] = (self.shape[a][0] + self.shape[b][0], hw)
        return self.act(dst)

    def head(self, x: str, classes: int) -> None:
        c, hw = self.shape[x]
        if self.draw(st.booleans()):
            dst = self.fresh("t")
            self.spec.ops.append(("gap", self.fresh("gap"), x, dst))
            hw = 1
            x = dst
        flat = self.fresh("t")
        self.spec.ops.append(("flatten", x, flat))
        self.shape[flat] = (c, hw)
        if self.draw(st.booleans()):
            hidden = self.draw(st.integers(2, 8))
            h = self.fresh("t")
            name = self.fresh("linear")
            self.spec.layers[name] = Layer("linear", c, hidden, hw_in=hw * hw)
            self.spec.ops.append(("layer", name, flat, h))
            self.shape[h] = (hidden, 1)
            flat, c, hw = self.act(h), hidden, 1
        name = self.fresh("linear")
        self.spec.layers[name] = Layer("linear", c, classes, hw_in=hw * hw)
        self.spec.ops.append(("layer", name, flat, "out"))
        self.spec.output = name


# ====================================================================== the oracle
class UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


@dataclass
class Oracle:
    """Zero channels, merged sets and expected widths, from the spec and the kill sets alone."""

    spec: Spec
    kills: dict[str, set[int]]
    uf: UnionFind = field(default_factory=UnionFind)
    ids: dict[str, list[int]] = field(default_factory=dict)  # tensor -> channel node ids
    zero: dict[str, list[bool]] = field(default_factory=dict)
    reads: dict[str, str] = field(default_factory=dict)  # layer -> input tensor
    writes: dict[str, str] = field(default_factory=dict)  # layer -> output tensor
    pinned: set[int] = field(default_factory=set)

    def run(self) -> None:
        s = self.spec
        self.ids["x"] = self.uf.add(s.c0)
        self.zero["x"] = [False] * s.c0
        self.pinned.update(self.ids["x"])
        for op in s.ops:
            if op[0] == "layer":
                self._layer(op[1], op[2], op[3])
            elif op[0] in ("act", "pool", "gap"):
                self._same(op[2], op[3])
            elif op[0] == "flatten":
                self._same(op[1], op[2])
            elif op[0] == "add":
                a, b, dst = op[1], op[2], op[3]
                self.ids[dst] = self.ids[a]
                for i, j in zip(self.ids[a], self.ids[b]):
                    self.uf.union(i, j)
                self.zero[dst] = [za and zb for za, zb in zip(self.zero[a], self.zero[b])]
            elif op[0] == "cat":
                a, b, dst = op[1], op[2], op[3]
                self.ids[dst] = self.ids[a] + self.ids[b]
                self.zero[dst] = self.zero[a] + self.zero[b]
        self.pinned.update(self.ids["out"])

    def _same(self, src: str, dst: str) -> None:
        self.ids[dst], self.zero[dst] = self.ids[src], list(self.zero[src])

    def _layer(self, name: str, src: str, dst: str) -> None:
        lay = self.spec.layers[name]
        self.reads[name], self.writes[name] = src, dst
        zin = self.zero[src]
        if lay.kind == "bn":  # killed together with the zero channels it normalises
            self._same(src, dst)
            return
        killed = self.kills.get(name, set())
        per_in, per_out = lay.cin // lay.groups, lay.cout // lay.groups
        zero = []
        for o in range(lay.cout):
            group = o // per_out
            inputs_zero = all(zin[group * per_in : (group + 1) * per_in])
            zero.append(o in killed or (inputs_zero and not lay.bias))
        self.zero[dst] = zero
        if self._depthwise(lay) and per_out == 1:  # an output channel goes with its input
            self.ids[dst] = list(self.ids[src])
            return
        self.ids[dst] = self.uf.add(lay.cout)

    def removable(self) -> set[int]:
        """Roots of the merged sets that can go: not pinned, and zero wherever a Conv/Linear reads
        them (a set's members that no layer reads, e.g. the input of a killed depthwise filter,
        do not matter: removing them changes nothing downstream).
        """
        roots = {self.uf.find(i) for ids in self.ids.values() for i in ids}
        ok = dict.fromkeys(roots, True)
        for i in self.pinned:
            ok[self.uf.find(i)] = False
        for name, tensor in self.reads.items():
            lay = self.spec.layers[name]
            if lay.kind == "bn" or self._depthwise(lay):
                continue  # merged with its input, not a reader
            for i, z in zip(self.ids[tensor], self.zero[tensor]):
                if not z:
                    ok[self.uf.find(i)] = False
        return {r for r, good in ok.items() if good}

    @staticmethod
    def _depthwise(lay: Layer) -> bool:
        return lay.kind == "conv" and lay.groups == lay.cin and lay.groups > 1

    def removed(self, tensor: str, roots: set[int]) -> list[bool]:
        return [self.uf.find(i) in roots for i in self.ids[tensor]]

    def widths(self, roots: set[int]) -> dict[str, tuple[int, int]]:
        """Layer -> (in, out) widths after removing the merged sets ``roots`` (a Linear's ``in``
        counts features: ``h*w`` per flattened channel).
        """
        out = {}
        for name, lay in self.spec.layers.items():
            rin = sum(self.removed(self.reads[name], roots))
            rout = sum(self.removed(self.writes[name], roots))
            if name == self.spec.output:
                rout = 0
            out[name] = ((lay.cin - rin) * lay.hw_in, lay.cout - rout)
        return out

    def params(self, widths: dict[str, tuple[int, int]]) -> int:
        total = 0
        for name, lay in self.spec.layers.items():
            cin, cout = widths[name]
            if lay.kind == "bn":
                total += 2 * cout
            elif lay.kind == "linear":
                total += cout * cin + (cout if lay.bias else 0)
            else:
                groups = cin if lay.groups == lay.cin and lay.groups > 1 else lay.groups
                total += cout * (cin // groups) * lay.k * lay.k + (cout if lay.bias else 0)
        return total

    def balanced(self, roots: set[int]) -> bool:
        """Whether every grouped (not depthwise) conv loses as many channels in every group."""
        for name, lay in self.spec.layers.items():
            if lay.kind != "conv" or lay.groups == 1 or lay.groups == lay.cin:
                continue
            for tensor, n in ((self.reads[name], lay.cin), (self.writes[name], lay.cout)):
                gone = self.removed(tensor, roots)
                size = n // lay.groups
                counts = {sum(gone[j * size : (j + 1) * size]) for j in range(lay.groups)}
                if len(counts) > 1:
                    return False
        return True


# ====================================================================== building a case
@dataclass
class Case:
    spec: Spec
    kills: dict[str, set[int]]
    seed: int

    def model(self) -> Net:
        torch.manual_seed(self.seed)
        net = Net(self.spec)
        oracle = Oracle(self.spec, self.kills)
        oracle.run()
        with torch.no_grad():
            for name, module in net.layers.items():
                lay = self.spec.layers.get(name)
                if lay is None:
                    continue
                if lay.kind == "bn":
                    assert isinstance(module, nn.BatchNorm2d)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.5, 0.5)
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
                    dead = [i for i, z in enumerate(oracle.zero[oracle.reads[name]]) if z]
                    module.weight[dead] = 0.0
                    module.bias[dead] = 0.0
                    continue
                killed = sorted(self.kills.get(name, set()))
                module.weight[killed] = 0.0
                if module.bias is not None:
                    module.bias.uniform_(-0.5, 0.5)
                    module.bias[killed] = 0.0
        return net.eval()


@st.composite
def cases(draw: Any) -> Case:
    b = Builder(draw)
    x = "x"
    for _ in range(draw(st.integers(1, 4))):
        x = b.block(x)
    b.head(x, draw(st.integers(2, 5)))
    kills: dict[str, set[int]] = {}
    for name, lay in b.spec.layers.items():
        if lay.kind == "bn" or name == b.spec.output:
            continue
        flags = draw(st.lists(st.booleans(), min_size=lay.cout, max_size=lay.cout))
        if all(flags):
            flags[draw(st.integers(0, lay.cout - 1))] = False
        kills[name] = {i for i, f in enumerate(flags) if f}
    oracle = Oracle(b.spec, kills)
    oracle.run()
    # a layer whose every output is zero would make the next layer emit its bias as a constant
    # (folded by the library, beyond this oracle): such draws are discarded
    assume(all(not all(oracle.zero[oracle.writes[n]]) for n in b.spec.layers))
    return Case(b.spec, kills, draw(st.integers(0, 2**16)))


# ====================================================================== the property
def _widths_of(model: nn.Module) -> dict[str, tuple[int, int]]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name.removeprefix("layers.")] = (m.in_channels, m.out_channels)
        elif isinstance(m, nn.Linear):
            out[name.removeprefix("layers.")] = (m.in_features, m.out_features)
        elif isinstance(m, nn.BatchNorm2d):
            out[name.removeprefix("layers.")] = (m.num_features, m.num_features)
    return out


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_case(case: Case) -> str:
    """Prune one case and check it; returns "exact" or "balanced" (which checks applied)."""
    model = case.model()
    oracle = Oracle(case.spec, case.kills)
    oracle.run()
    roots = oracle.removable()
    x = torch.randn(4, case.spec.c0, case.spec.hw, case.spec.hw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nothing to prune" when the oracle finds nothing either
        pruned = prune_model(model, x, allow_unchanged=True).eval()
    fresh = torch.randn(3, case.spec.c0, case.spec.hw, case.spec.hw)
    with torch.no_grad():
        torch.testing.assert_close(pruned(fresh), model(fresh), rtol=1e-4, atol=1e-5)
    got = _widths_of(pruned)
    expected = oracle.widths(roots)
    if oracle.balanced(roots) and all(w[1] > 0 for w in expected.values()):
        assert got == expected
        assert _params(pruned) == oracle.params(expected)
        return "exact"
    # a grouped conv keeps some zero channels to stay balanced, or a layer keeps one channel
    # rather than none: what went must still be removable
    plan = plan_pruning(model, x)
    removed = {n.removeprefix("layers."): set(idx) for n, idx in plan.removed_out().items()}
    for name, idx in removed.items():
        out_tensor = oracle.writes[name]
        gone = oracle.removed(out_tensor, roots)
        assert all(gone[i] for i in idx), (name, idx)
    assert _params(pruned) == oracle.params(got)
    for name, lay in case.spec.layers.items():
        if lay.kind == "conv" and 1 < lay.groups < lay.cin:
            cin, cout = got[name]
            assert cin % lay.groups == 0
            assert cout % lay.groups == 0
    assert _params(pruned) >= oracle.params(oracle.widths(roots))
    return "balanced"


COUNTS: dict[str, int] = {"exact": 0, "balanced": 0}


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases())
def _prune_random_cnn(case: Case) -> None:
    COUNTS[check_case(case)] += 1


def test_random_cnns_prune_exactly() -> None:
    """Every example checked; most (those where no grouped conv forces a balance) against the
    exact widths and parameter count: 1,858 of 2,000 in a long run. Printed with ``-s``.
    """
    COUNTS.update(exact=0, balanced=0)
    _prune_random_cnn()
    print(f"random architectures: {COUNTS}")
    total = sum(COUNTS.values())
    assert total >= min(MAX_EXAMPLES, 10), COUNTS
    assert COUNTS["exact"] > total / 2, COUNTS


@pytest.mark.parametrize("dummy", [0])
def test_oracle_counts_a_hand_built_case(dummy: int) -> None:
    """The oracle itself on a case whose answer is known by hand: conv(1->4) kills {1, 2},
    residual conv(4->4) with filter 1 killed, then flatten + Linear(4*36 -> 3).

    Channel 1 is zero in both operands of the sum, channel 2 only in one: only channel 1 goes.
    Params: conv 3x(1*9)+3 = 30, res conv 3x(3*9)+3 = 84, linear 3*(3*36)+3 = 327.
    """
    spec = Spec(1, 6)
    spec.layers = {
        "conv1": Layer("conv", 1, 4, 3, 1, True, 1),
        "conv2": Layer("conv", 4, 4, 3, 1, True, 1),
        "linear3": Layer("linear", 4, 3, hw_in=36),
    }
    spec.ops = [
        ("layer", "conv1", "x", "a"),
        ("layer", "conv2", "a", "b"),
        ("add", "b", "a", "c"),
        ("flatten", "c", "f"),
        ("layer", "linear3", "f", "out"),
    ]
    spec.output = "linear3"
    case = Case(spec, {"conv1": {1, 2}, "conv2": {1}}, seed=0)
    oracle = Oracle(spec, case.kills)
    oracle.run()
    widths = oracle.widths(oracle.removable())
    assert widths == {"conv1": (1, 3), "conv2": (3, 3), "linear3": (3 * 36, 3)}
    assert oracle.params(widths) == 30 + 84 + 327
    assert check_case(case) == "exact"


class ResidualOnInput(nn.Module):
    """``conv(x) + x`` on the model input (or on the max-pooled input), then a Linear."""

    def __init__(self, c: int, pooled: bool = False) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2) if pooled else nn.Identity()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.fc = nn.Linear(c * (9 if pooled else 36), 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x)
        return self.fc(torch.flatten(self.conv(x) + x, 1))


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("kill", [False, True])
def test_residual_with_the_input_keeps_the_sum_channels(kill: bool, pooled: bool) -> None:
    """Regression (found by ``test_random_cnns_prune_exactly``): ``conv(x) + x`` on the model
    input raised UnsupportedOpError and called a live channel dead, because the input's
    ``TensorMetadata`` (a NamedTuple) was taken for a tuple of outputs, leaving the input without
    a channel space. The sum's channels are the input's: they are kept, nothing fails.
    """
    torch.manual_seed(0)
    model = ResidualOnInput(2, pooled).eval()
    with torch.no_grad():
        if kill:
            model.conv.weight[0] = 0.0
            model.conv.bias[0] = 0.0
    x = torch.randn(3, 2, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = prune_model(model, x, allow_unchanged=True)
    # the sum's channels are the input's: nothing can go
    assert _params(pruned) == _params(model)
    torch.testing.assert_close(pruned(x), model(x))
