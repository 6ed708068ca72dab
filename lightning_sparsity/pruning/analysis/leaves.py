"""Layers as the zoos write them.

A module outside ``torch.nn`` is analysed as a layer when it behaves like one on its real inputs.

Model zoos subclass ``torch.nn`` layers with their own ``forward`` ("same" padding, norm plus
activation) or write their own per-channel layers (a frozen BatchNorm, a layer scale). Rather than
a list of names, each such module is checked on the inputs it received in a real forward:

* ``"conv"`` / ``"linear"``: a subclass of a conv (not transposed) or of ``nn.Linear`` that,
  shrunk by the library's own surgery, computes exactly the kept outputs, and whose removed input
  channels only ever mattered through the sliced weights (a weight-standardised conv fails this:
  its standardisation sees every input channel);
* ``"channelwise"``: a module without parameterised children whose output has the input's shape,
  where changing one channel of the input changes only that channel of the output, and that,
  shrunk by slicing its per-channel tensors (and counts), computes exactly the kept channels.

A module that fails its check is traced through as before (and what the analysis cannot follow
inside it is kept). The checks run on copies, in eval mode, without gradients.
"""

from __future__ import annotations

import copy
from itertools import chain
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from lightning_sparsity.pruning.layers import COUNT_ATTRS, replace_tensor

LeafKind = Literal["conv", "linear", "channelwise"]


def _own_tensors(module: nn.Module) -> dict[str, Tensor]:
    return {
        n: t
        for n, t in chain(
            module.named_parameters(recurse=False), module.named_buffers(recurse=False)
        )
        if t is not None
    }


def shrink_channelwise(module: nn.Module, keep: Tensor, channels: int) -> nn.Module:
    """A copy of a per-channel module keeping channels ``keep``.

    Every own tensor whose first dimension has ``channels`` entries is sliced, and the counting
    attributes updated.
    """
    idx = keep.sort().values
    new = copy.deepcopy(module)
    for name, t in _own_tensors(module).items():
        if t.dim() >= 1 and t.shape[0] == channels and t.numel() > 1:
            replace_tensor(new, name, t.detach().index_select(0, idx.to(t.device)))
    for attr in COUNT_ATTRS:
        if getattr(new, attr, None) == channels and not isinstance(getattr(new, attr), bool):
            setattr(new, attr, int(idx.numel()))
    return new


def _same(a: Any, b: Any) -> bool:
    return (
        isinstance(a, Tensor)
        and isinstance(b, Tensor)
        and a.shape == b.shape
        and torch.allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(b.abs().max())))
    )


def _channelwise(module: nn.Module, x: Tensor) -> bool:
    channels = int(x.shape[1])
    if channels < 2:
        return False
    own = _own_tensors(module)
    if not all(t.numel() == 1 or (t.dim() >= 1 and t.shape[0] == channels) for t in own.values()):
        return False
    m = copy.deepcopy(module).eval()
    y = m(x)
    if not isinstance(y, Tensor) or y.shape != x.shape:
        return False
    c = channels // 2
    x2 = x.clone()
    x2[:, c] = x2[:, c] * 1.5 + 1.0
    y2 = m(x2)
    others = torch.ones(channels, dtype=torch.bool)
    others[c] = False
    if not torch.equal(y2[:, others], y[:, others]):
        return False
    keep = others.nonzero().flatten()
    small = shrink_channelwise(m, keep, channels)
    return _same(small(x[:, keep]), y[:, keep])


def _conv(module: _ConvNd, x: Tensor) -> bool:
    from lightning_sparsity.pruning.surgery import shrink

    m = copy.deepcopy(module).eval()
    c_in, c_out, g = m.in_channels, m.out_channels, m.groups
    if x.dim() < 3 or x.shape[1] != c_in or c_out < 2 or c_in < 2:
        return False
    y = m(x)
    if not isinstance(y, Tensor) or y.shape[1] != c_out:
        return False
    per_out = c_out // g
    if g == c_in:  # depthwise: input channel i goes with its outputs
        keep_in = torch.arange(1, c_in)
        keep_out = torch.arange(per_out, c_out)
        return _same(shrink(m, keep_out, keep_in)(x[:, keep_in]), y[:, keep_out])
    keep_out = torch.tensor([j for j in range(c_out) if j % per_out != 0 or per_out == 1])
    if per_out == 1:  # one output per group: nothing to drop without dropping the group
        keep_out = torch.arange(c_out)
    if keep_out.numel() < c_out and not _same(shrink(m, keep_out, None)(x), y[:, keep_out]):
        return False
    per_in = c_in // g
    if per_in < 2:
        return False
    drop = torch.tensor([j % per_in == 0 for j in range(c_in)])
    keep_in = (~drop).nonzero().flatten()
    x0 = x.clone()
    x0[:, drop] = 0
    return _same(shrink(m, None, keep_in)(x[:, keep_in]), m(x0))


def _linear(module: nn.Linear, x: Tensor) -> bool:
    from lightning_sparsity.pruning.surgery import shrink

    m = copy.deepcopy(module).eval()
    if x.shape[-1] != m.in_features or m.in_features < 2 or m.out_features < 2:
        return False
    y = m(x)
    keep_out = torch.arange(1, m.out_features)
    if not _same(shrink(m, keep_out, None)(x), y[..., 1:]):
        return False
    keep_in = torch.arange(1, m.in_features)
    x0 = x.clone()
    x0[..., 0] = 0
    return _same(shrink(m, None, keep_in)(x[..., 1:]), m(x0))


def leaf_kind(module: nn.Module, args: tuple[Any, ...]) -> LeafKind | None:
    """What layer ``module`` (outside ``torch.nn``) proves to be on its recorded inputs ``args``.

    ``None`` when it proves to be none (it is traced through).
    """
    if type(module).__module__.startswith("torch.nn"):
        return None  # torch's own layers have their rules
    if any(True for c in module.children() for _ in c.parameters()):
        return None
    x = args[0] if args else None
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        return None
    if any(isinstance(a, Tensor) for a in args[1:]):
        return None
    try:
        with torch.no_grad():
            if isinstance(module, _ConvNd):
                return "conv" if not module.transposed and _conv(module, x) else None
            if isinstance(module, nn.Linear):
                return "linear" if _linear(module, x) else None
            if not _own_tensors(module) and not isinstance(module, nn.Module):
                return None
            return "channelwise" if _channelwise(module, x) else None
    except Exception:  # the module does not survive the probe: it is no layer of ours
        return None
