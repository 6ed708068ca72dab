"""Mixed precision: unscaled gradients and the steps that GradScaler skips.

Under ``precision="16-mixed"`` Lightning's ``MixedPrecision`` plugin scales the loss, and before
``on_before_optimizer_step`` unscales the gradients, except for optimizers that unscale inside
their own ``step`` (``fused=True``: ``_step_supports_amp_scaling``), whose gradients reach the hook
still multiplied by the loss scale. A penalty gradient added there would end up divided by the
scale. [`unscaled_found_inf`][lightning_sparsity.callbacks._amp.unscaled_found_inf] makes every
optimizer's gradients unscaled (the public
``GradScaler.unscale_``, which the scaler then honours in its ``step``: a fused optimizer is given
``grad_scale=None``) and returns GradScaler's verdict on the step: a non-zero ``found_inf`` means
that ``scaler.step`` will skip it (dynamic loss scaling overflows on purpose now and then).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def grad_scaler(trainer: Any) -> torch.amp.GradScaler | None:
    """The Trainer's enabled GradScaler (``"16-mixed"``), else ``None``."""
    plugin = getattr(trainer, "precision_plugin", None)
    scaler = getattr(plugin, "scaler", None)
    if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled():
        return scaler
    return None


def _gradients(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def unscaled_found_inf(trainer: Any, optimizer: torch.optim.Optimizer) -> Tensor | None:
    """Unscale ``optimizer``'s gradients if they are still scaled; GradScaler's ``found_inf``.

    Returns ``None`` when no loss scaling is active (every step is taken), else a 0-dim tensor on
    the gradients' device, non-zero when the scaler will skip this step. No host synchronisation.
    """
    scaler = grad_scaler(trainer)
    if scaler is None:
        return None
    states = getattr(scaler, "_per_optimizer_states", None)
    if isinstance(states, dict):
        state = states.get(id(optimizer))  # .get: no entry is created
        stage = getattr(state.get("stage"), "name", None) if state else "READY"
        if stage == "READY":  # not unscaled yet (fused optimizers): unscale here, once
            scaler.unscale_(optimizer)
            state = states.get(id(optimizer))
        found = state.get("found_inf_per_device") if state else None
        if found:
            values = list(found.values())
            total = values[0].to(torch.float32)
            for v in values[1:]:
                total = total + v.to(total.device, torch.float32)
            return total
    elif getattr(optimizer, "_step_supports_amp_scaling", False):
        scaler.unscale_(optimizer)  # Lightning's own rule: it unscaled all the others
    # torch without the private bookkeeping read above: compute the verdict from the gradients
    grads = _gradients(optimizer)
    if not grads:
        return None
    norms = torch.stack([n.to(grads[0].device) for n in torch._foreach_norm(grads)])
    return (~torch.isfinite(norms)).any().to(torch.float32)


def step_skipped(found_inf: Tensor | None) -> bool:
    """Whether GradScaler skips the step (one host synchronisation; ``None``: never skipped)."""
    return found_inf is not None and bool(found_inf)
