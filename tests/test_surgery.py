"""The layer surgery registry: each shrink keeps exactly the chosen slices, as a new module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_sparsity.pruning.surgery import shrink


def idx(*values: int) -> torch.Tensor:
    return torch.tensor(values)


def test_conv_keeps_rows_and_columns_and_leaves_the_original() -> None:
    conv = nn.Conv2d(4, 6, 3, bias=True).double()
    before = conv.weight.detach().clone()
    small = shrink(conv, keep_out=idx(5, 0, 2), keep_in=idx(1, 3))
    assert small is not conv
    assert isinstance(small, nn.Conv2d)
    assert (small.in_channels, small.out_channels, small.weight.dtype) == (2, 3, torch.float64)
    torch.testing.assert_close(small.weight, conv.weight[[0, 2, 5]][:, [1, 3]])  # sorted order
    torch.testing.assert_close(small.bias, conv.bias[[0, 2, 5]])
    assert torch.equal(conv.weight, before)
    assert conv.out_channels == 6
    assert small.weight.requires_grad
    assert small.weight.data_ptr() != conv.weight.data_ptr()


def test_grouped_conv_must_stay_balanced() -> None:
    conv = nn.Conv2d(8, 4, 1, groups=2)
    small = shrink(conv, keep_out=idx(0, 2), keep_in=idx(0, 1, 4, 5))
    assert small.groups == 2
    torch.testing.assert_close(small.weight, conv.weight[[0, 2]][:, [0, 1]])
    with pytest.raises(
        ValueError, match=r"groups=2 every group must keep the same number of input"
    ):
        shrink(conv, keep_in=idx(0, 1, 4))
    with pytest.raises(ValueError, match=r"same number of output channels, got \[2, 1\]"):
        shrink(conv, keep_out=idx(0, 1, 2))


def test_depthwise_conv_keeps_outputs_with_inputs() -> None:
    conv = nn.Conv1d(4, 8, 3, groups=4)  # channel multiplier 2
    small = shrink(conv, keep_out=idx(2, 3, 6, 7), keep_in=idx(1, 3))
    assert (small.in_channels, small.out_channels, small.groups) == (2, 4, 2)
    torch.testing.assert_close(small.weight, conv.weight[[2, 3, 6, 7]])
    with pytest.raises(ValueError, match="depthwise conv keeps its output channels"):
        shrink(conv, keep_out=idx(2, 6), keep_in=idx(1, 3))


def test_linear_and_transposed_conv() -> None:
    lin = nn.Linear(5, 3, bias=False)
    small = shrink(lin, keep_in=idx(0, 4))
    assert (small.in_features, small.out_features, small.bias) == (2, 3, None)
    up = nn.ConvTranspose2d(3, 5, 2)
    small_up = shrink(up, keep_out=idx(1, 4), keep_in=idx(2))
    torch.testing.assert_close(small_up.weight, up.weight[[2]][:, [1, 4]])
    torch.testing.assert_close(small_up.bias, up.bias[[1, 4]])


def test_batchnorm_keeps_running_statistics() -> None:
    bn = nn.BatchNorm3d(4)
    bn.running_mean.uniform_()
    bn.num_batches_tracked += 7
    small = shrink(bn, keep_out=idx(1, 3))
    assert small.num_features == 2
    assert int(small.num_batches_tracked) == 7
    torch.testing.assert_close(small.running_mean, bn.running_mean[[1, 3]])
    assert isinstance(small.running_var, torch.Tensor)
    assert small.running_var.shape == (2,)
    small.num_batches_tracked += 1  # not shared with the original
    assert int(bn.num_batches_tracked) == 7


def test_refusals() -> None:
    with pytest.raises(ValueError, match=r"GroupNorm.*statistics mix channels"):
        shrink(nn.GroupNorm(2, 4), keep_out=idx(0, 1))
    with pytest.raises(TypeError, match=r"no shrink function for this layer type; supported: \["):
        shrink(nn.LSTM(3, 4), keep_out=idx(0))
    with pytest.raises(
        ValueError, match=r"expected 1 to 6 `keep_out` indices in \[0, 6\), got \[6\]"
    ):
        shrink(nn.Conv2d(2, 6, 1), keep_out=idx(6))
    with pytest.raises(ValueError, match="indices repeat"):
        shrink(nn.Linear(2, 6), keep_out=idx(1, 1))
    conv = nn.Conv2d(2, 6, 1)
    torch.nn.utils.prune.random_structured(conv, "weight", amount=0.5, dim=0)
    with pytest.raises(ValueError, match=r"HINT: call `torch\.nn\.utils\.prune\.remove"):
        shrink(conv, keep_out=idx(0))
