"""prune_model on toy nets, one per coupling rule.

Oracle: the pruned model's outputs equal the original's (``assert_close``) and its parameters are
exactly those of the same architecture built by hand with the smaller widths (same shapes, same
count). Killed filters have weights, bias and the following BatchNorm's scale and shift zeroed;
BatchNorm statistics are random so that constants that reach a reader are not trivially zero.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_sparsity.pruning.analysis.coupling import UnsupportedOpError
from lightning_sparsity.pruning.export import dead_channels, plan_pruning, prune_model, verify_equal
from lightning_sparsity.pruning.masks import FilterGroup, zero_filters


@pytest.fixture(autouse=True)
def _one_thread() -> None:  # the CPU is shared: one thread is faster than two fighting
    torch.set_num_threads(1)


def randomize(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics, scales and shifts (as after training)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def kill(layer: nn.Module, idx: Sequence[int], bn: nn.Module | None = None) -> None:
    """Zero filters ``idx`` of ``layer`` (weights, bias) and of the BatchNorm ``bn`` after it."""
    zero_filters(FilterGroup("layer", layer, bn), torch.tensor(list(idx), dtype=torch.long))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check(model: nn.Module, x: Tensor, expected: nn.Module | None, **kwargs: object) -> nn.Module:
    """Prune ``model``; outputs equal, shapes and parameter count equal ``expected``'s."""
    model.eval()
    with torch.no_grad():
        ref = model(x)
    pruned = prune_model(model, x, **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x), ref, rtol=1e-4, atol=1e-5)
    if expected is not None:
        assert shapes(pruned) == shapes(expected)
        assert n_params(pruned) == n_params(expected)
    return pruned


# -- conv -> bn -> relu -> conv ... -> flatten -> linear -> linear ------------------------------
class Plain(nn.Module):
    def __init__(self, c1: int = 8, c2: int = 6, h: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c1, 3), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3), nn.BatchNorm2d(c2)
        self.fc1, self.fc2 = nn.Linear(c2 * 4 * 4, h), nn.Linear(h, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.flatten(torch.relu(self.bn2(self.conv2(x))), 1)
        return self.fc2(nn.functional.dropout(torch.relu(self.fc1(x)), 0.5, self.training))


def test_plain_chain_flatten_and_linear_to_linear() -> None:
    net = randomize(Plain())
    kill(net.conv1, [1, 5], net.bn1)
    kill(net.conv2, [2], net.bn2)
    kill(net.fc1, [4])
    x = torch.randn(2, 3, 8, 8)
    pruned = check(net, x, Plain(6, 5, 9))
    # the flatten blocks: channel c of conv2 is columns c*16 .. c*16+15 of fc1
    kept_cols = [c * 16 + j for c in (0, 1, 3, 4, 5) for j in range(16)]
    kept_rows = [r for r in range(10) if r != 4]
    torch.testing.assert_close(pruned.fc1.weight, net.fc1.weight[kept_rows][:, kept_cols])
    torch.testing.assert_close(
        pruned.conv2.weight, net.conv2.weight[[0, 1, 3, 4, 5]][:, [0, 2, 3, 4, 6, 7]]
    )
    assert dead_channels(net, x) == {"conv1": [1, 5], "conv2": [2], "fc1": [4]}


def test_original_untouched_and_copy_trains() -> None:
    net = randomize(Plain()).train()
    kill(net.conv1, [0], net.bn1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    pruned = prune_model(net, x)
    assert pruned is not net
    assert net.conv1.out_channels == 8
    assert pruned.conv1.out_channels == 7
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training
    assert all(m.training for m in net.modules())
    assert pruned.training  # the copy keeps the original's mode
    pruned(x).sum().backward()  # fine-tunes: gradients flow through the shrunk layers
    assert pruned.conv1.weight.grad is not None
    assert pruned.conv1.weight.grad.shape == (7, 3, 3, 3)


def test_output_units_are_never_removed() -> None:
    net = randomize(Plain())
    kill(net.fc2, [1])  # an output unit is dead, but it is a class score
    kill(net.conv1, [3], net.bn1)
    pruned = check(net, torch.randn(2, 3, 8, 8), Plain(7, 6, 10))
    assert pruned.fc2.out_features == 3
    assert plan_pruning(net, torch.randn(1, 3, 8, 8)).kept_dead["fc2"] == {
        1: "`fc2` produces the model's output"
    }


# -- residual sums -----------------------------------------------------------------------------
class Res(nn.Module):
    def __init__(self, stem: int = 6, mid: int = 5, stem_kept: int | None = None) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, stem, 3, padding=1), nn.BatchNorm2d(stem)
        self.conv1, self.bn1 = nn.Conv2d(stem, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem)
        self.fc = nn.Linear(stem, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        out = torch.relu(out + x)
        return self.fc(nn.functional.adaptive_avg_pool2d(out, 1).flatten(1))


def test_residual_channel_dead_in_one_branch_is_kept() -> None:
    net = randomize(Res())
    kill(net.conv2, [2], net.bn2)  # dead in the block's branch only: x still carries channel 2
    kill(net.conv1, [1], net.bn1)  # inside the block: free to go
    x = torch.randn(2, 3, 8, 8)
    pruned = check(net, x, Res(6, 4))
    assert pruned.conv2.out_channels == 6
    reason = plan_pruning(net, x).kept_dead["conv2"][2]
    assert "merged with channels that carry a signal" in reason


def test_residual_channel_dead_in_every_branch_goes() -> None:
    net = randomize(Res())
    kill(net.conv2, [2, 4], net.bn2)
    kill(net.stem, [2, 4], net.bn0)
    check(net, torch.randn(2, 3, 8, 8), Res(4, 5))


# -- concatenation -----------------------------------------------------------------------------
class Cat(nn.Module):
    def __init__(self, a: int = 4, b: int = 6) -> None:
        super().__init__()
        self.a, self.bna = nn.Conv2d(3, a, 1), nn.BatchNorm2d(a)
        self.b, self.bnb = nn.Conv2d(3, b, 3, padding=1), nn.BatchNorm2d(b)
        self.head = nn.Conv2d(a + b, 5, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.cat([torch.relu(self.bna(self.a(x))), torch.relu(self.bnb(self.b(x)))], dim=1)
        return self.head(nn.functional.max_pool2d(y, 2))


def test_concat_offsets() -> None:
    net = randomize(Cat())
    kill(net.a, [1], net.bna)
    kill(net.b, [2, 5], net.bnb)
    pruned = check(net, torch.randn(2, 3, 12, 12), Cat(3, 4))
    keep = [0, 2, 3, 4, 5, 7, 8]  # channel 1 of a and channels 4+2, 4+5 of b are gone
    torch.testing.assert_close(pruned.head.weight, net.head.weight[:, keep])


# -- grouped and depthwise convolutions ------------------------------------------------------
class Grouped(nn.Module):
    def __init__(self, c: int = 8, g_out: int = 8, groups: int = 2) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 1), nn.BatchNorm2d(c)
        self.gconv, self.bn2 = nn.Conv2d(c, g_out, 3, groups=groups), nn.BatchNorm2d(g_out)
        self.head = nn.Conv2d(g_out, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.head(torch.relu(self.bn2(self.gconv(x))))


def test_grouped_conv_unbalanced_removal_is_kept() -> None:
    net = randomize(Grouped())
    kill(net.conv1, [1], net.bn1)  # only group 0 would lose a channel
    kill(net.gconv, [0, 5], net.bn2)  # one output per group: balanced, goes
    x = torch.randn(2, 3, 6, 6)
    check(net, x, Grouped(8, 6))
    assert "grouped conv `gconv`" in plan_pruning(net, x).kept_dead["conv1"][1]


def test_grouped_conv_balanced_removal_goes() -> None:
    net = randomize(Grouped())
    kill(net.conv1, [1, 2, 6, 7], net.bn1)  # two inputs in each group
    pruned = check(net, torch.randn(2, 3, 6, 6), Grouped(4, 8))
    assert pruned.gconv.groups == 2
    # group 0 (inputs 0-3) keeps local inputs 0, 3; group 1 (inputs 4-7) keeps 0, 1
    torch.testing.assert_close(pruned.gconv.weight[:4], net.gconv.weight[:4, [0, 3]])
    torch.testing.assert_close(pruned.gconv.weight[4:], net.gconv.weight[4:, [0, 1]])


class Depthwise(nn.Module):
    def __init__(self, c: int = 6, mult: int = 1, project_bias: bool = False) -> None:
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(3, c, 1, bias=False), nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c * mult, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c * mult)
        self.project = nn.Conv2d(c * mult, 4, 1, bias=project_bias)
        self.bn3 = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.relu6(self.bn1(self.expand(x)))
        x = nn.functional.relu6(self.bn2(self.dw(x)))
        return self.bn3(self.project(x))


@pytest.mark.parametrize("mult", [1, 2])
@pytest.mark.parametrize("project_bias", [False, True])
def test_depthwise_channel_goes_with_its_input(mult: int, project_bias: bool) -> None:
    net = randomize(Depthwise(mult=mult, project_bias=project_bias))
    kill(net.expand, [0, 4], net.bn1)
    with torch.no_grad():
        net.bn2.bias[0] = 0.4 - net.bn2.weight[0] * net.bn2.running_mean[0] / (1 + 1e-5) ** 0.5
        net.bn2.running_var[0] = 1.0
    # the depthwise conv sees zeros, but its BatchNorm shifts them to a constant: that constant
    # reaches `project` (1x1, no padding) and is folded into its bias or into bn3's mean
    x = torch.randn(2, 3, 5, 5)
    plan = plan_pruning(net, x)
    assert set(plan.folds) == {"project"}
    assert plan.folds["project"].target == ("bias" if project_bias else "bn3")
    pruned = check(net, x, Depthwise(4, mult, project_bias))
    assert pruned.dw.groups == 4


# -- squeeze-excitation -------------------------------------------------------------------------
class SE(nn.Module):
    def __init__(self, c: int = 8, r: int = 4) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        gate = torch.sigmoid(
            self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(x, 1))))
        )
        return self.head(x * gate)


def test_squeeze_excitation_gate() -> None:
    net = randomize(SE())
    kill(net.conv, [3, 6], net.bn)  # goes from conv, fc1's inputs, fc2's outputs, head's inputs
    kill(net.fc1, [1])  # an SE unit: relu(0) = 0 reaches fc2
    pruned = check(net, torch.randn(2, 3, 6, 6), SE(6, 3))
    assert (pruned.fc2.out_channels, pruned.fc1.in_channels) == (6, 6)


def test_gate_channel_that_is_only_constant_is_kept() -> None:
    net = randomize(SE())
    kill(net.conv, [3])  # the BN shift stays: x[3] = 1 is a constant, times a live gate
    with torch.no_grad():
        net.bn.running_mean[3], net.bn.bias[3] = 0.0, 1.0
    x = torch.randn(2, 3, 6, 6)
    assert "carry a signal" in plan_pruning(net, x).kept_dead["conv"][3]
    with pytest.warns(UserWarning, match="1 dead channels must stay"):
        check(net, x, SE(8, 4), allow_unchanged=True)


# -- Linear -> Linear, Conv1d, Conv3d -----------------------------------------------------------
def mlp(h1: int = 8, h2: int = 6) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(10, h1), nn.ReLU(), nn.Linear(h1, h2), nn.Tanh(), nn.Linear(h2, 3)
    )


def test_linear_to_linear() -> None:
    net = mlp()
    kill(net[0], [0, 7])
    kill(net[2], [3])
    check(net, torch.randn(4, 10), mlp(6, 5))


def conv_nd(dim: int, c: int = 6) -> nn.Sequential:
    conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dim]
    return nn.Sequential(
        conv(2, c, 3), bn(c), nn.ReLU(), conv(c, 4, 3), nn.Flatten(), nn.Linear(4 * 2**dim, 2)
    )


@pytest.mark.parametrize("dim", [1, 3])
def test_conv1d_and_conv3d(dim: int) -> None:
    net = randomize(conv_nd(dim))
    kill(net[0], [1, 2], net[1])
    kill(net[3], [0])  # conv -> flatten: a channel is 2**dim columns of the Linear
    check(net, torch.randn(2, 2, *([6] * dim)), _shrunk_nd(dim))


def _shrunk_nd(dim: int) -> nn.Sequential:
    net = conv_nd(dim, 4)
    conv = type(net[3])
    net[3] = conv(4, 3, 3)
    net[5] = nn.Linear(3 * 2**dim, 2)
    return net


# -- constants: folded where exact, kept where not ---------------------------------------------
class Const(nn.Module):
    def __init__(self, c: int = 6, kernel: int = 1, padding: int = 0, bias: bool = True) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3), nn.BatchNorm2d(c)
        self.reader = nn.Conv2d(c, 4, kernel, padding=padding, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.reader(torch.relu(self.bn(self.conv(x))))


def _dead_weights_live_shift(net: Const, idx: list[int]) -> None:
    """Filters and BN scales zeroed, BN shifts left positive: the channels emit relu(beta)."""
    kill(net.conv, idx)
    with torch.no_grad():
        net.bn.weight[idx] = 0
        net.bn.bias[idx] = torch.tensor([0.7, 0.3])[: len(idx)]


def test_constant_channel_folded_into_unpadded_reader() -> None:
    net = randomize(Const(kernel=3, padding=0))
    _dead_weights_live_shift(net, [1, 4])
    x = torch.randn(2, 3, 9, 9)
    plan = plan_pruning(net, x)
    torch.testing.assert_close(
        plan.folds["reader"].value, torch.tensor([0.7, 0.3], dtype=torch.float64)
    )
    check(net, x, Const(4, kernel=3))


def test_constant_channel_before_zero_padding_is_kept() -> None:
    net = randomize(Const(kernel=3, padding=1))
    _dead_weights_live_shift(net, [1, 4])
    x = torch.randn(2, 3, 9, 9)
    kept = plan_pruning(net, x).kept_dead["conv"]
    assert set(kept) == {1, 4}
    assert "zero padding" in kept[1]
    with pytest.raises(ValueError, match="2 dead channels must stay"):
        prune_model(net, x)


def test_constant_channel_kept_when_reader_cannot_absorb_it() -> None:
    net = randomize(Const(kernel=1, bias=False))
    _dead_weights_live_shift(net, [2])
    kill(net.conv, [0], net.bn)  # a truly dead channel still goes
    x = torch.randn(2, 3, 9, 9)
    assert "no bias and no BatchNorm" in plan_pruning(net, x).kept_dead["conv"][2]
    check(net, x, Const(5, bias=False))


# -- channel shuffle with chunk (ShuffleNet v2) -----------------------------------------------
class Shuffle(nn.Module):
    def __init__(self, c: int = 8, mid: int = 4) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, c, 1), nn.BatchNorm2d(c)
        self.b1, self.bn1 = nn.Conv2d(c // 2, mid, 1), nn.BatchNorm2d(mid)
        self.b2, self.bn2 = nn.Conv2d(mid, c // 2, 1), nn.BatchNorm2d(c // 2)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x1, x2 = x.chunk(2, dim=1)
        y = torch.relu(self.bn2(self.b2(torch.relu(self.bn1(self.b1(x2))))))
        out = torch.cat((x1, y), dim=1)
        n, c, h, w = out.size()
        out = out.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.head(out)


def test_channel_shuffle_and_chunk() -> None:
    net = randomize(Shuffle())
    kill(net.b1, [1], net.bn1)  # inside the branch: goes
    # the shuffle interleaves x1[k] with y[k]: stem channel 0 goes only with b2's channel 0
    kill(net.stem, [0], net.bn0)
    kill(net.b2, [0], net.bn2)
    x = torch.randn(2, 3, 4, 4)
    plan = plan_pruning(net, x)
    assert plan.removed_out() == {"b1": [1]}  # but chunk(2) needs both halves to stay equal
    assert "equal chunks" in plan.kept_dead["stem"][0]
    kill(net.stem, [5], net.bn0)  # now one channel goes from each half
    assert plan_pruning(net, x).removed_out() == {"stem": [0, 5], "b1": [1], "b2": [0]}
    check(net, x, Shuffle(6, 3))


# -- errors ----------------------------------------------------------------------------------
class Rolled(nn.Module):
    def __init__(self, roll_input: bool = False) -> None:
        super().__init__()
        self.roll_input = roll_input
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.roll_input:
            x = torch.roll(x, 1, dims=1)
        y = torch.relu(self.bn(self.conv(x)))
        return self.head(y if self.roll_input else torch.roll(y, 1, dims=1))


def test_unsupported_op_keeps_the_channel_and_says_why() -> None:
    """By default the dead channel reaching `torch.roll` is kept (the export goes on, exact),
    and the plan names the op and the source line; `strict=True` makes it the error it was.
    """
    net = randomize(Rolled())
    kill(net.conv, [2], net.bn)
    x = torch.randn(1, 3, 4, 4)
    why = plan_pruning(net, x).kept_dead["conv"][2]
    assert re.search(r"reaches `torch\.roll`.* at .*test_prune_model\.py:\d+", why), why
    with pytest.warns(UserWarning, match="1 dead channels must stay"):
        pruned = check(net, x, None, allow_unchanged=True)
    assert pruned.conv.out_channels == 4
    with pytest.raises(UnsupportedOpError, match=r"`torch\.roll`.*test_prune_model\.py.*`conv`"):
        prune_model(net, x, strict=True)


def test_unsupported_op_on_kept_channels_is_left_alone() -> None:
    net = randomize(Rolled(roll_input=True))
    kill(net.conv, [2], net.bn)
    pruned = check(net, torch.randn(1, 3, 4, 4), None)
    assert pruned.conv.out_channels == 3


class HardCodedView(Plain):
    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x))).view(-1, 6 * 4 * 4)
        return self.fc2(torch.relu(self.fc1(x)))


def test_hard_coded_view_keeps_the_channel() -> None:
    net = randomize(HardCodedView())
    kill(net.conv2, [1], net.bn2)
    with pytest.raises(UnsupportedOpError, match=r"`Tensor.view`.*literally.*torch.flatten"):
        prune_model(net, torch.randn(1, 3, 8, 8), strict=True)
    why = plan_pruning(net, torch.randn(1, 3, 8, 8)).kept_dead["conv2"][1]
    assert "`Tensor.view`" in why
    assert "literally" in why
    kill(net.conv1, [1], net.bn1)  # before the view: fine
    net.conv2.weight.data.normal_()
    net.bn2.weight.data.fill_(1.0)
    assert prune_model(net, torch.randn(1, 3, 8, 8)).conv1.out_channels == 7


def test_wrong_input_shape() -> None:
    net = randomize(Plain())
    kill(net.conv1, [1], net.bn1)
    with pytest.raises(
        ValueError,
        match=r"expected inputs the model accepts, got tensor of shape \(1, 1, 8, 8\).*"
        r"to have 3 channels",
    ):
        prune_model(net, torch.randn(1, 1, 8, 8))
    with pytest.raises(TypeError, match="expected a tensor or a tuple of the forward's"):
        prune_model(net, [[1.0, 2.0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected an nn\.Module"):
        prune_model("net", torch.randn(1, 3, 8, 8))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`prune_model\(atol=-1\)`: expected `atol` >= 0"):
        prune_model(net, torch.randn(1, 3, 8, 8), atol=-1)


def test_nothing_to_prune() -> None:
    net = randomize(Plain())
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"expected at least one dead channel.*HINT"):
        prune_model(net, x)
    with pytest.warns(UserWarning, match="expected at least one dead channel"):
        same = prune_model(net, x, allow_unchanged=True)
    assert same is not net
    assert shapes(same) == shapes(net)


def test_verify_reports_the_difference() -> None:
    a, b = mlp(), mlp()
    with pytest.raises(RuntimeError, match="not equivalent: output 0 differs by up to"):
        verify_equal(a, b, torch.randn(2, 10))
    assert verify_equal(a, copy.deepcopy(a), torch.randn(2, 10)) == 0.0


# -- more layer types ----------------------------------------------------------------------------
class Up(nn.Module):
    def __init__(self, c: int = 6, u: int = 4) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.up, self.bn2 = nn.ConvTranspose2d(c, u, 2, stride=2), nn.BatchNorm2d(u)
        self.head = nn.Conv2d(u, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(torch.relu(self.bn2(self.up(x))))


def test_conv_transpose() -> None:
    net = randomize(Up())
    kill(net.conv, [1], net.bn)
    with torch.no_grad():  # a ConvTranspose2d weight is [in, out, k, k]: output 2 is W[:, 2]
        net.up.weight[:, 2] = 0
        net.up.bias[2] = 0
        net.bn2.weight[2] = net.bn2.bias[2] = 0
    pruned = check(net, torch.randn(2, 3, 5, 5), Up(5, 3))
    torch.testing.assert_close(pruned.up.weight, net.up.weight[[0, 2, 3, 4, 5]][:, [0, 1, 3]])


def test_prelu_per_channel() -> None:
    def build(c: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(3, c, 3), nn.BatchNorm2d(c), nn.PReLU(c), nn.Conv2d(c, 2, 1))

    net = randomize(build(6))
    kill(net[0], [2, 3], net[1])
    pruned = check(net, torch.randn(2, 3, 5, 5), build(4))
    torch.testing.assert_close(pruned[2].weight, net[2].weight[[0, 1, 4, 5]])


def test_group_norm_keeps_its_channels() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    kill(net[0], [1])
    x = torch.randn(2, 3, 5, 5)
    assert "normalises channels jointly" in plan_pruning(net, x).kept_dead["0"][1]
    with pytest.raises(ValueError, match="1 dead channels must stay"):
        prune_model(net, x)


def test_torch_prune_masks_are_refused() -> None:
    net = randomize(Plain())
    torch.nn.utils.prune.ln_structured(net.conv1, "weight", amount=0.25, n=2, dim=0)
    with pytest.raises(ValueError, match=r"layer 'conv1' carries a `torch.nn.utils.prune` mask"):
        prune_model(net, torch.randn(1, 3, 8, 8))
    torch.nn.utils.prune.remove(net.conv1, "weight")  # 2 filters zeroed, their BN shift stays:
    kill(net.conv1, [0], net.bn1)  # constants folded into conv2 (3x3, no padding), all 3 go
    assert prune_model(net, torch.randn(1, 3, 8, 8)).conv1.out_channels == 5


# -- random kills over every rule at once ---------------------------------------------------------
class Mixed(nn.Module):
    """Residual sum, concatenation, grouped conv, depthwise conv, SE gate, flatten, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a, self.bna = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.g, self.bng = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bnd = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.b, self.bnb = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)
        self.fc1, self.fc2 = nn.Conv2d(12, 3, 1), nn.Conv2d(3, 12, 1)
        self.lin1, self.lin2 = nn.Linear(12 * 4, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(x + self.bng(self.g(torch.relu(self.bna(self.a(x))))))
        z = torch.cat([y, torch.relu(self.bnb(self.b(torch.relu(self.bnd(self.dw(y))))))], 1)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(z.mean((2, 3), keepdim=True)))))
        z = nn.functional.adaptive_avg_pool2d(z * gate, 2).flatten(1)
        return self.lin2(torch.relu(self.lin1(z)))


KILLABLE = {"stem": "bn0", "a": "bna", "g": "bng", "dw": "bnd", "b": "bnb", "fc1": "", "lin1": ""}


@settings(max_examples=25, deadline=None, phases=(Phase.explicit, Phase.generate))
@given(
    st.fixed_dictionaries(
        {k: st.sets(st.integers(0, 7 if k not in ("b", "fc1", "lin1") else 2)) for k in KILLABLE}
    ),
    st.sets(st.sampled_from([k for k, bn in KILLABLE.items() if bn])),
    st.integers(0, 2**16),
)
def test_random_kills_stay_exact(killed: dict[str, set[int]], shifted: set[str], seed: int) -> None:
    """Random dead filters everywhere; in ``shifted`` layers the BN shift is left non-zero, so
    those channels emit constants that must be folded exactly or kept.
    """
    torch.manual_seed(seed)
    net = randomize(Mixed())
    named = dict(net.named_modules())
    for layer, channels in killed.items():
        if channels:
            bn = named[KILLABLE[layer]] if KILLABLE[layer] else None
            kill(named[layer], sorted(channels), bn)
            if bn is not None and layer in shifted:
                with torch.no_grad():
                    bn.bias[sorted(channels)] = torch.rand(len(channels)) - 0.3
    x = torch.randn(2, 3, 8, 8)
    try:
        removed = dead_channels(net, x)
        check(net, x, None)
    except ValueError as err:  # nothing removable: the message says so
        message = str(err)
    else:
        message = ""
    if message:
        assert "expected at least one dead channel" in message
        return
    if shifted:
        return
    # a killed unit of a plain chain always goes (other units may go too: all their inputs died)
    for layer, n in (("fc1", 3), ("lin1", 6)):
        gone = set(removed.get(layer, []))
        assert killed[layer] <= gone or len(gone) == n - 1  # or all died and one must stay


class Branchy(Plain):
    def forward(self, x: Tensor) -> Tensor:
        if x.mean() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return super().forward(x)


def test_untraceable_model_is_split_into_its_layers() -> None:
    """`Branchy`'s own forward branches on data: each child is analysed on its own, its inputs
    and outputs kept, so nothing goes, and the plan says why with the line of the branch.
    """
    net = randomize(Branchy())
    kill(net.conv1, [0], net.bn1)
    plan = plan_pruning(net, torch.randn(1, 3, 8, 8))
    assert plan.removed_out() == {}
    assert re.search(r"control flow at .*test_prune_model\.py:\d+", plan.opaque[""])
    assert "analysed on its own: `Branchy` cannot be traced" in plan.kept_dead["conv1"][0]
