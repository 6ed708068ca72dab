"""The splitting method's sparse copies ``U`` in checkpoints (private, plain torch).

A checkpoint holds ``U`` as the model's weights (what will be exported) and the trained weights
``W`` in the callback's state; resuming puts ``W`` back and restores ``U``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_sparsity.selection import Target


def check_restored(restored: Mapping[str, Tensor], targets: list[Target], owner: str) -> None:
    """Raise unless ``restored`` holds one tensor shaped like each target's weight."""
    shapes = {t.name: tuple(t.param.shape) for t in targets}
    bad = {n: tuple(u.shape) for n, u in restored.items() if shapes.get(n) != tuple(u.shape)}
    if bad or set(restored) != set(shapes):
        raise RuntimeError(
            f"`{owner}`: the checkpoint's U holds layers {bad or sorted(restored)}, which do not "
            f"match the selected layers {shapes}. HINT: resume with the same model, `layers=` "
            "and granularities."
        )


@torch.no_grad()
def restore_copies(
    state: Mapping[str, Any] | None,
    targets: list[Target],
    initial: Callable[[Tensor], Tensor],
    owner: str,
) -> dict[str, Tensor]:
    """Put the saved ``W`` back into the weights and return ``U`` (saved, or ``initial(W)``)."""
    saved_u = (state or {}).get("U") or {}
    saved_w = (state or {}).get("W") or {}
    for saved in (saved_u, saved_w):
        if saved:
            check_restored(saved, targets, owner)
    copies = {}
    for t in targets:
        if t.name in saved_w:  # the checkpoint's state_dict held U
            t.param.copy_(saved_w[t.name])
        w = t.param.detach()
        u = saved_u.get(t.name)
        copies[t.name] = u.to(w.device, w.dtype).clone() if u is not None else initial(w)
    return copies


def copies_as_weights(
    checkpoint: dict[str, Any], copies: Mapping[str, Tensor], state_keys: Mapping[str, str]
) -> None:
    """Write each ``U`` over its weight in ``checkpoint["state_dict"]`` (same shape only)."""
    weights = checkpoint.get("state_dict")
    if not isinstance(weights, dict):
        return
    for name, u in copies.items():
        key = state_keys.get(name)
        if key in weights and weights[key].shape == u.shape:
            weights[key] = u.detach().to(weights[key].device, weights[key].dtype).clone()
