"""The per-coordinate step size an optimizer just took, read from its state (plain torch).

A proximal map after an optimizer step must use the metric of that step: ``eta_i = lr / d_i``
with [`step_denominator`][lightning_sparsity.functional.optim.step_denominator]'s ``d`` (ICCAIRO
2019's proximal RMSProp).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: Optimizers whose per-coordinate step ``metric="auto"`` reads (subclasses included).
SUPPORTED_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.RMSprop,
    torch.optim.Adam,  # and AdamW, a subclass
    torch.optim.Adagrad,
)


def step_denominator(
    optimizer: torch.optim.Optimizer,
    group: dict[str, Any],
    state: dict[str, Any],
    out: Tensor | None = None,
) -> Tensor | None:
    """The ``d`` of the step the optimizer just took, read from its state after the step.

    ``d`` gives the per-coordinate step ``eta = lr / d`` (``None``: the plain ``lr``):

    * SGD (any momentum): ``None``.
    * RMSprop: ``sqrt(square_avg) + eps``; centered: ``sqrt(square_avg - grad_avg^2) + eps``.
    * Adam / AdamW: ``(1 - beta1^t) * (sqrt(v / (1 - beta2^t)) + eps)`` with ``v = exp_avg_sq``
      (``max_exp_avg_sq`` with amsgrad) and ``t`` the step count: Adam moved the weights by
      ``-lr * m / d`` with ``m = exp_avg``, i.e. the bias-corrected update
      ``lr * m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m / (1 - beta1^t)``; both corrections
      are in ``d``, so ``lr / d`` is exactly the step Adam took per unit of its gradient estimate
      (10x larger than without the first correction at ``t = 1``, 1.5x at ``t = 10``).
    * Adagrad: ``(sqrt(sum) + eps) * (1 + (t - 1) * lr_decay)``.

    ``out``: a tensor shaped like the parameter to write ``d`` into (else a new one).

    Raises:
        RuntimeError: the state the optimizer should hold after a step is missing.
    """

    def need(key: str) -> Tensor:
        if key not in state:
            raise RuntimeError(
                f"`ProximalSparsity`: `{type(optimizer).__name__}` holds no {key!r} state for a "
                "parameter it has just stepped, so its per-coordinate step size is unknown. "
                "HINT: use `ProximalSparsity(metric='lr')` to take the plain learning rate as the "
                "step."
            )
        return state[key]

    if isinstance(optimizer, torch.optim.RMSprop):
        if group.get("centered", False):
            ga = need("grad_avg")
            d = torch.addcmul(need("square_avg"), ga, ga, value=-1, out=out)
            return d.sqrt_().add_(group["eps"])
        return torch.sqrt(need("square_avg"), out=out).add_(group["eps"])
    if isinstance(optimizer, torch.optim.Adam):
        v = need("max_exp_avg_sq") if group.get("amsgrad", False) else need("exp_avg_sq")
        beta1, beta2 = group["betas"]
        t = float(need("step"))
        d = torch.div(v, 1 - beta2**t, out=out).sqrt_().add_(group["eps"])
        return d.mul_(1 - beta1**t)
    if isinstance(optimizer, torch.optim.Adagrad):
        decay = 1 + (float(need("step")) - 1) * group["lr_decay"]
        return torch.sqrt(need("sum"), out=out).add_(group["eps"]).mul_(decay)
    return None
