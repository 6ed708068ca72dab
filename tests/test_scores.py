"""Known answers for the per-filter scores in ``lightning_sparsity.functional.scores``."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lightning_sparsity.functional.scores import (
    capped_l1,
    default_cap,
    filter_norms,
    l1_capped_l1_significance,
)


def _conv_weight() -> torch.Tensor:
    # two 1x2x2 filters: [3, -4, 0, 0] and [1, 1, 1, -1]
    return torch.tensor([[[[3.0, -4.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, -1.0]]]])


@pytest.mark.parametrize(
    ("norm", "expected"),
    [("l2", [5.0, 2.0]), ("l1", [7.0, 4.0]), ("mean_abs", [7.0 / 4, 1.0])],
)
def test_filter_norms_known_answers(norm: str, expected: list[float]) -> None:
    assert_close(filter_norms(_conv_weight(), norm), torch.tensor(expected))


def test_filter_norms_linear_rows_and_matches_torch() -> None:
    w = torch.randn(7, 13)
    assert_close(filter_norms(w, "l2"), w.norm(dim=1))
    assert_close(filter_norms(w, "l1"), w.abs().sum(dim=1))


def test_filter_norms_does_not_track_gradients() -> None:
    w = torch.randn(3, 4, requires_grad=True)
    assert not filter_norms(w).requires_grad


def test_capped_l1_known_answer() -> None:
    w = torch.tensor([[1.0, 0.1, 0.0, 0.0], [0.3, -0.3, 0.3, 0.3]])
    assert_close(capped_l1(w, 0.2), torch.tensor([0.3, 0.8]))
    # a cap above every weight is the plain L1 norm
    assert_close(capped_l1(w, 10.0), filter_norms(w, "l1"))


def test_significance_known_answer_and_ranking_differs_from_l1() -> None:
    # a filter with one large weight, one with four equal moderate weights, one tiny
    w = torch.tensor([[1.3, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3], [0.01, 0.0, 0.0, 0.0]])
    # L1 ranks filter 0 above filter 1 (1.3 > 1.2) ...
    assert_close(filter_norms(w, "l1"), torch.tensor([1.3, 1.2, 0.01]))
    # ... the capped term (cap 0.2: 0.2 vs 0.8) flips them
    score = l1_capped_l1_significance(w, cap=0.2)
    assert_close(score, torch.tensor([1.5, 2.0, 0.02]))
    assert_close(l1_capped_l1_significance(w, cap=0.2, alpha=0.5), torch.tensor([1.4, 1.6, 0.015]))


def test_significance_default_cap_is_mean_abs_of_live_filters() -> None:
    w = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]])
    # the dead third filter does not lower the cap: mean |w| of rows 0 and 1 = 2.0 / 4
    assert math.isclose(default_cap(w), 0.5)
    assert_close(l1_capped_l1_significance(w), torch.tensor([1.5, 2.0, 0.0]))
    assert default_cap(torch.zeros(2, 3)) == 0.0
    assert_close(l1_capped_l1_significance(torch.zeros(2, 3)), torch.zeros(2))


def test_significance_is_scale_equivariant_with_default_cap() -> None:
    w = torch.randn(6, 3, 3, 3)
    assert_close(l1_capped_l1_significance(3.0 * w), 3.0 * l1_capped_l1_significance(w))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"expected `norm` in \['l2', 'l1', 'mean_abs'\]"):
        filter_norms(torch.ones(2, 2), "linf")
    with pytest.raises(ValueError, match="expected `cap` > 0"):
        capped_l1(torch.ones(2, 2), 0.0)
    with pytest.raises(ValueError, match="expected `cap` > 0 or None"):
        l1_capped_l1_significance(torch.ones(2, 2), cap=-1.0)
    with pytest.raises(ValueError, match="expected `alpha` >= 0"):
        l1_capped_l1_significance(torch.ones(2, 2), alpha=-1.0)
    with pytest.raises(ValueError, match="got a scalar"):
        filter_norms(torch.tensor(1.0))
    with pytest.raises(TypeError, match="expected a Tensor"):
        filter_norms([[1.0]])  # type: ignore[arg-type]
