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

``scores.capped_l1`` (a per-filter score) and ``penalties.capped_l1`` (a penalty) share a name in
their modules; here the score is ``capped_l1_score``.
"""

from lightning_sparsity.functional.groups import (
    group_norms,
    group_shape,
    group_size,
    group_view,
    num_groups,
    reduce_dims,
)
from lightning_sparsity.functional.penalties import (
    bn_scale_l1,
    capped_l1,
    group_lasso,
    l1,
    l1_l2,
    penalty_and_grads,
)
from lightning_sparsity.functional.proximal import (
    group_hard_threshold,
    group_soft_threshold,
    hard_threshold,
    soft_threshold,
)
from lightning_sparsity.functional.scores import capped_l1 as capped_l1_score
from lightning_sparsity.functional.scores import (
    filter_norms,
    kill_weakest,
    l1_capped_l1_significance,
)

__all__ = [
    "bn_scale_l1",
    "capped_l1",
    "capped_l1_score",
    "filter_norms",
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
    "num_groups",
    "penalty_and_grads",
    "reduce_dims",
    "soft_threshold",
]
