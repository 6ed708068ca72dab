"""Scratch tensors reused from step to step.

Per-step maths thus allocates no weight-sized temporaries (on the CPU every large allocation may
cost page faults).
"""

from __future__ import annotations

import torch
from torch import Tensor


class Workspace:
    """One uninitialised tensor per key, re-allocated only when the shape, dtype or device change.

    Example::

        >>> ws = Workspace()
        >>> a = ws.get("conv1", torch.zeros(2, 3))
        >>> a is ws.get("conv1", torch.ones(2, 3))
        True
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, key: str, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """An uninitialised tensor shaped like ``like`` (same device; ``dtype`` or ``like``'s)."""
        dtype = like.dtype if dtype is None else dtype
        buf = self._buffers.get(key)
        if buf is None or (buf.shape, buf.dtype, buf.device) != (like.shape, dtype, like.device):
            buf = self._buffers[key] = torch.empty(like.shape, dtype=dtype, device=like.device)
        return buf

    def clear(self) -> None:
        """Free every tensor."""
        self._buffers.clear()
