"""Known answers for groups, penalties and proximal maps; gradients against torch.autograd."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_sparsity.functional.groups import (
    GRANULARITIES,
    group_norms,
    group_shape,
    group_size,
    group_view,
)
from lightning_sparsity.functional.penalties import (
    PENALTIES,
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


def two_filters() -> torch.Tensor:
    """A Conv2d weight [2, 1, 2, 2] with filter norms 3 and 4 (and L1 norms 6 and 4)."""
    w = torch.zeros(2, 1, 2, 2)
    w[0] = 1.5
    w[1, 0, 1, 1] = -4.0
    return w


# ---------------------------------------------------------------- groups


def test_group_view_layouts() -> None:
    w = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.equal(group_view(w, "filter")[1], w[1].flatten())
    assert torch.equal(group_view(w, "channel")[2], w[:, 2].flatten())
    assert torch.equal(group_view(w, "kernel")[1 * 3 + 2], w[1, 2].flatten())
    assert group_view(w, "weight").shape == (24, 1)
    lin = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(group_view(lin, "channel")[1], lin[:, 1])
    assert torch.equal(group_view(lin, "filter")[1], lin[1])


@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 5), (4, 3, 2, 2), (4, 3, 2, 2, 2)])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_group_norms_match_group_view(shape: tuple[int, ...], granularity: str) -> None:
    if granularity == "kernel" and len(shape) == 2:
        pytest.skip("kernel is undefined for Linear (tested below)")
    w = torch.randn(shape)
    expected = group_view(w, granularity).norm(dim=1)
    torch.testing.assert_close(group_norms(w, granularity), expected)
    torch.testing.assert_close(
        group_norms(w, granularity, p=1), group_view(w, granularity).abs().sum(1)
    )
    keep = group_norms(w, granularity, keepdim=True)
    assert keep.shape == group_shape(w, granularity)
    assert group_size(w, granularity) * expected.numel() == w.numel()


def test_group_norms_known_answer_and_zero_gradient() -> None:
    w = two_filters()
    assert group_norms(w).tolist() == [3.0, 4.0]
    z = torch.zeros(3, 2, 3, 3, requires_grad=True)
    group_norms(z).sum().backward()
    assert z.grad is not None
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_group_misconfiguration() -> None:
    with pytest.raises(
        ValueError, match=r"granularity='filters'.*one of \['filter'.*singular 'filter'"
    ):
        group_norms(torch.ones(2, 2), "filters")
    with pytest.raises(ValueError, match=r"kernel.*Linear weight"):
        group_norms(torch.ones(2, 2), "kernel")
    with pytest.raises(ValueError, match=r"expected a Conv1d/2d/3d weight.*bn_scale_l1"):
        group_view(torch.ones(3), "filter")
    with pytest.raises(TypeError, match="expected `granularity` to be a str"):
        group_norms(torch.ones(2, 2), 1)  # type: ignore[arg-type]


# ---------------------------------------------------------------- penalties


def test_penalty_known_answers() -> None:
    w = two_filters()
    assert l1(w).item() == 10.0
    assert group_lasso(w).item() == 7.0
    assert group_lasso(w, scale_by_size=True).item() == pytest.approx(7.0 * 2.0)  # sqrt(4) = 2
    assert l1_l2(w).item() == pytest.approx(7.0 / 5.0)
    # weight granularity: plain l1 / l2 of the entries: (4 * 1.5 + 4) / sqrt(4 * 2.25 + 16)
    assert l1_l2(w, "weight").item() == pytest.approx(10.0 / 5.0)
    # L1 norms of the filters are 6 and 4
    assert capped_l1(w, cap=5.0).item() == 9.0
    assert capped_l1(w, cap=100.0).item() == 10.0
    assert capped_l1(w, cap=1.0, granularity="weight").item() == 5.0  # min(1.5,1)*4 + min(4,1)
    assert bn_scale_l1(torch.tensor([1.0, -2.0, 0.0])).item() == 3.0
    assert set(PENALTIES) == {"l1", "group_lasso", "l1_l2", "capped_l1", "bn_scale_l1"}


@pytest.mark.parametrize("fn", [l1, group_lasso, l1_l2, lambda w: capped_l1(w, 1.0)])
def test_penalties_finite_at_exact_zeros(fn) -> None:  # type: ignore[no-untyped-def]
    for w0 in (
        torch.zeros(3, 2, 2, 2),
        torch.cat([torch.zeros(1, 2, 2, 2), torch.ones(2, 2, 2, 2)]),
    ):
        w = w0.clone().requires_grad_(True)
        value = fn(w)
        value.backward()
        assert torch.isfinite(value)
        assert w.grad is not None
        assert torch.isfinite(w.grad).all()
        assert torch.equal(w.grad[0], torch.zeros_like(w.grad[0]))  # the zero group gets gradient 0
    assert l1_l2(torch.zeros(3, 4)).item() == 0.0


def _autograd(name: str, w: torch.Tensor, granularity: str, **options: object) -> torch.Tensor:
    w = w.clone().requires_grad_(True)
    kwargs = {} if name in ("l1", "bn_scale_l1") else {"granularity": granularity}
    (grad,) = torch.autograd.grad(PENALTIES[name](w, **kwargs, **options), w)
    return grad


CASES = [
    ("l1", {}),
    ("group_lasso", {}),
    ("group_lasso", {"scale_by_size": True}),
    ("l1_l2", {}),
    ("capped_l1", {"cap": 2.5}),
]


@pytest.mark.parametrize(("name", "options"), CASES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fused_gradients_equal_autograd(name: str, options: dict, granularity: str) -> None:
    weights = [torch.randn(5, 3, 3, 3), torch.randn(4, 5, 3), torch.randn(6, 4, 2, 2, 2)]
    if granularity != "kernel":
        weights.append(torch.randn(7, 6))
    weights[0][1] = 0.0  # an all-zero filter
    weights[1][:, 2] = 0.0  # an all-zero channel
    weights.append(torch.zeros(3, 2, 2, 2))  # an all-zero layer
    values, grads = penalty_and_grads(name, weights, granularity, **options)
    for w, value, grad in zip(weights, values, grads):
        kwargs = {} if name == "l1" else {"granularity": granularity}
        expected = PENALTIES[name](w, **kwargs, **options)
        torch.testing.assert_close(value, expected)
        torch.testing.assert_close(grad, _autograd(name, w, granularity, **options))
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize(("name", "options"), CASES)
def test_fused_gradients_accumulate_in_place(name: str, options: dict) -> None:
    weights = [torch.randn(5, 3, 3, 3), torch.randn(7, 6)]
    weights[0][2] = 0.0
    out = [torch.randn_like(w) for w in weights]
    before = [o.clone() for o in out]
    scratch = [torch.empty_like(w) for w in weights]
    values, grads = penalty_and_grads(
        name, weights, "filter", out=out, alpha=0.25, scratch=scratch, **options
    )
    assert all(g is o for g, o in zip(grads, out))  # accumulated in place
    ref_values, ref_grads = penalty_and_grads(name, weights, "filter", **options)
    torch.testing.assert_close(values, ref_values)
    for o, b, g in zip(out, before, ref_grads):
        torch.testing.assert_close(o, b + 0.25 * g)


def test_fused_mixed_granularities_and_errors() -> None:
    conv, lin = torch.randn(4, 3, 3, 3), torch.randn(5, 36)
    values, grads = penalty_and_grads("group_lasso", [conv, lin], ["filter", "channel"])
    torch.testing.assert_close(values[1], group_lasso(lin, "channel"))
    torch.testing.assert_close(grads[1], _autograd("group_lasso", lin, "channel"))
    with pytest.raises(ValueError, match="expected `penalty` in"):
        penalty_and_grads("l0", [conv])
    with pytest.raises(ValueError, match="`cap` finite and >= 0, got -1"):
        capped_l1(conv, cap=-1.0)
    with pytest.raises(ValueError, match="1-D scale"):
        bn_scale_l1(conv)


# ---------------------------------------------------------------- proximal maps


def test_elementwise_maps() -> None:
    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    assert soft_threshold(x, 1.0).tolist() == [-2.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert hard_threshold(x, 1.0).tolist() == [-3.0, 0.0, 0.0, 0.0, 0.0, 2.0]
    t = torch.tensor([0.0, 1.0, 0.0, 0.1, 2.0, 0.5])  # per-coordinate thresholds
    expected = torch.tensor([-3.0, 0.0, 0.0, 0.4, 0.0, 1.5])
    torch.testing.assert_close(soft_threshold(x, t), expected)
    assert hard_threshold(x, t).tolist() == [-3.0, 0.0, 0.0, 0.5, 0.0, 2.0]


def test_group_maps_scalar_threshold() -> None:
    w = torch.zeros(2, 1, 2, 2)
    w[0, 0, 0, 0] = 0.01
    w[1] = 2.5  # norm 5
    hard = group_hard_threshold(w, 0.1)
    assert torch.equal(hard[0], torch.zeros_like(w[0]))
    assert torch.equal(hard[1], w[1])
    soft = group_soft_threshold(w, 1.0)
    assert torch.equal(soft[0], torch.zeros_like(w[0]))
    torch.testing.assert_close(soft[1], w[1] * 0.8)  # norm 5 -> 4
    # "weight" granularity is the element-wise map; a constant tensor equals the float
    torch.testing.assert_close(group_soft_threshold(w, 0.5, "weight"), soft_threshold(w, 0.5))
    torch.testing.assert_close(group_hard_threshold(w, 0.5, "weight"), hard_threshold(w, 0.5))
    full = torch.full_like(w, 1.0)
    torch.testing.assert_close(group_soft_threshold(w, full), soft)
    torch.testing.assert_close(group_hard_threshold(w, full * 0.1), hard)


def test_group_hard_per_coordinate_rule() -> None:
    """Keep z_g iff sum_i z_i^2 / (2 eta_i) > lambda, with t = sqrt(2 eta lambda)."""
    lam = 0.5
    z = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.2, 0.0]])
    eta = torch.tensor([[0.4, 4.0], [4.0, 4.0], [1e-3, 1.0]])
    # scores: 1/0.8 + 1/8 = 1.375 > 0.5 keep; 1/8 + 1/8 = 0.25 drop; 0.04/0.002 = 20 keep
    out = group_hard_threshold(z, (2 * eta * lam).sqrt(), "filter")
    assert out.tolist() == [[1.0, 1.0], [0.0, 0.0], z[2].tolist()]
    by_definition = ((z.square() / (2 * eta)).sum(1, keepdim=True) > lam) * z
    assert torch.equal(out, by_definition)
    # a zero threshold on a nonzero coordinate always keeps its group
    assert torch.equal(group_hard_threshold(z, torch.tensor([[0.0, 9.0]]).expand(3, 2)), z)


def _prox_reference(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """argmin_w sum (w - z)^2 / (2 t) + ||w||_2 for one group, by bisection in float64."""
    z64, t64 = z.double(), t.double()
    if (z64 / t64.clamp_min(1e-300)).norm() <= 1:
        return torch.zeros_like(z)
    lo, hi = 0.0, z64.norm().item()
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (z64 / (mid + t64)).square().sum() > 1 else (lo, mid)
    return (z64 * lo / (lo + t64)).to(z.dtype)


def test_group_soft_per_coordinate_is_the_metric_prox() -> None:
    torch.manual_seed(1)
    for trial in range(40):
        z = torch.randn(6, 5) * torch.rand(6, 1) * 3
        t = torch.rand(6, 5) ** (30 if trial % 2 else 2) * 2  # thresholds over many decades
        if trial % 3 == 0:
            t[:, 0] = 0.0
        out = group_soft_threshold(z, t, "filter")
        assert torch.isfinite(out).all()
        expected = torch.stack([_prox_reference(z[g], t[g]) for g in range(6)])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
        # optimality of the kept groups: (w - z) / t + w / ||w|| = 0
        kept = out.norm(dim=1) > 0
        w = out[kept]
        residual = (w - z[kept]) + t[kept] * w / w.norm(dim=1, keepdim=True)
        torch.testing.assert_close(residual, torch.zeros_like(residual), atol=1e-5, rtol=0)


def test_group_soft_per_coordinate_zeroes_by_the_scaled_norm() -> None:
    z = torch.tensor([[0.3, 0.4], [3.0, 4.0]])
    t = torch.tensor([[1.0, 1.0], [10.0, 1.0]])
    out = group_soft_threshold(z, t, "filter")
    assert torch.equal(out[0], torch.zeros(2))  # ||z / t|| = 0.5 <= 1
    assert (out[1] != 0).all()
    assert out[1].norm() < 5
    assert math.isclose(float(group_soft_threshold(z, t, "weight")[1, 1]), 3.0)
