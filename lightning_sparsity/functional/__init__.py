"""Pure tensor maths: groups, penalties, proximal maps and filter scores. No Lightning import.

Flat re-exports, as ``torchmetrics.functional``::

    >>> import torch
    >>> from lightning_sparsity.functional import group_soft_threshold, l1_l2
    >>> w = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    >>> float(l1_l2(w, "filter"))
    1.0
    >>> group_soft_threshold(w, 1.0, "filter")
    tensor([[2.4000, 3.2000],
            [0.0000, 0.0000]])

``capped_l1`` is the penalty (each group's L1 norm capped); the per-filter score that caps each
weight is ``capped_l1_norms`` (also importable under its former flat name ``capped_l1_score``).
"""

from lightning_sparsity.functional.groups import (
    GRANULARITIES,
    Granularity,
    group_norms,
    group_shape,
    group_size,
    group_view,
    num_groups,
    reduce_dims,
)
from lightning_sparsity.functional.optim import step_denominator
from lightning_sparsity.functional.penalties import (
    L1,
    L1L2,
    PENALTY_CLASSES,
    BNScaleL1,
    CappedL1,
    FunctionPenalty,
    GroupLasso,
    Penalty,
    bn_scale_l1,
    capped_l1,
    group_lasso,
    l1,
    l1_l2,
    make_penalty,
    penalty_and_grads,
)
from lightning_sparsity.functional.proximal import (
    group_hard_threshold,
    group_soft_threshold,
    hard_threshold,
    proximal_step_,
    soft_threshold,
)
from lightning_sparsity.functional.scores import (
    capped_l1_norms,
    filter_norms,
    filter_scores,
    kill_weakest,
    l1_capped_l1_significance,
    spare_to_multiple,
    threshold_round,
)
from lightning_sparsity.functional.splitting import (
    sparse_copy_,
    splitting_grads_,
    splitting_threshold,
    splitting_value,
)

#: Former flat name of `capped_l1_norms`.
capped_l1_score = capped_l1_norms

__all__ = [
    "GRANULARITIES",
    "L1",
    "L1L2",
    "PENALTY_CLASSES",
    "BNScaleL1",
    "CappedL1",
    "FunctionPenalty",
    "Granularity",
    "GroupLasso",
    "Penalty",
    "bn_scale_l1",
    "capped_l1",
    "capped_l1_norms",
    "capped_l1_score",
    "filter_norms",
    "filter_scores",
    "group_hard_threshold",
    "group_lasso",
    "group_norms",
    "group_shape",
    "group_size",
    "group_soft_threshold",
    "group_view",
    "hard_threshold",
    "kill_weakest",
    "l1",
    "l1_capped_l1_significance",
    "l1_l2",
    "make_penalty",
    "num_groups",
    "penalty_and_grads",
    "proximal_step_",
    "reduce_dims",
    "soft_threshold",
    "spare_to_multiple",
    "sparse_copy_",
    "splitting_grads_",
    "splitting_threshold",
    "splitting_value",
    "step_denominator",
    "threshold_round",
]
