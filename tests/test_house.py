"""The functional core on hand-built tensors, the deprecations, and the resume / first-batch checks
of issue 12 (a house the next maintainer can live in).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _shared import Net, dataset, make_trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_sparsity import (
    FilterThresholding,
    ProximalSparsity,
    PrunedExport,
    SparsityRegularizer,
)
from lightning_sparsity.functional import penalties as P
from lightning_sparsity.functional.proximal import group_hard_threshold, proximal_step_
from lightning_sparsity.functional.scores import capped_l1_norms, threshold_round
from lightning_sparsity.functional.splitting import sparse_copy_, splitting_grads_
from lightning_sparsity.pruning.masks import kill_filters
from lightning_sparsity.pruning.report import count_params, pruned_size
from lightning_sparsity.validation import check_choice, check_float, check_int


# ---------------------------------------------------------------- penalties as objects
@pytest.mark.parametrize(
    ("penalty", "granularity"),
    [
        (P.L1(), "weight"),
        (P.GroupLasso(), "filter"),
        (P.GroupLasso(scale_by_size=True), "channel"),
        (P.L1L2(), "filter"),
        (P.CappedL1(cap=1.5), "filter"),
        (P.FunctionPenalty(lambda w: (w**2).sum()), "filter"),
    ],
)
def test_penalty_objects_add_the_autograd_gradient(penalty: P.Penalty, granularity: str) -> None:
    w = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [0.5, -0.5, 1.0]])
    leaf = w.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(penalty.value(leaf, granularity), leaf)
    grad = torch.ones_like(w)
    values = penalty.add_grads_([w], [granularity], [grad], alpha=2.0)
    torch.testing.assert_close(grad, 1 + 2.0 * expected)
    torch.testing.assert_close(values[0], penalty.value(w, granularity))
    assert torch.equal(grad[1], torch.ones(3)) or granularity == "weight"  # a zero group: grad 0


def test_make_penalty_by_name_and_errors() -> None:
    assert isinstance(P.make_penalty("l1_l2"), P.L1L2)
    assert P.make_penalty("group_lasso", scale_by_size=True).scale_by_size  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"`make_penalty\(cap=None\)`: expected a `cap` >= 0"):
        P.make_penalty("capped_l1")
    with pytest.raises(TypeError, match=r"expected a name in .* or a callable"):
        P.make_penalty(3)  # type: ignore[arg-type]


# ---------------------------------------------------------------- proximal, splitting, scores
def test_proximal_step_in_the_metric_known_answer() -> None:
    # groups: rows; eta_i = lr / d_i. Row 0: sum z^2 d = 0.01*4 + 0.01*4 = 0.08 <= 2*0.1*1 -> 0
    # row 1: 0.01*100 + 0 = 1.0 > 0.2 -> kept (a large d makes a small weight count more)
    z = torch.tensor([[0.1, 0.1], [0.1, 0.0]])
    d = torch.tensor([[4.0, 4.0], [100.0, 1.0]])
    live = proximal_step_(z, 1.0, 0.1, denominator=d.clone())
    assert z.tolist() == [[0.0, 0.0], [0.10000000149011612, 0.0]]
    assert int(live) == 1  # type: ignore[arg-type]
    # constant metric: the textbook group hard threshold with t = sqrt(2 lr lambda)
    w = torch.randn(6, 4)
    expected = group_hard_threshold(w, (2 * 0.1 * 0.3) ** 0.5)
    proximal_step_(w, 0.3, 0.1)
    torch.testing.assert_close(w, expected)


def test_splitting_steps_known_answer() -> None:
    w, u = torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    g = torch.zeros(2, 2)
    group = splitting_grads_(
        [w], [u], ["filter"], [g], strength=1.0, beta=2.0, divide_by=2.0, scale_by_size=False
    )
    assert group.tolist() == [5.0]
    # (lambda * w / ||w|| + beta (w - u)) / 2 = ([0.6, 0.8] + [0, 8]) / 2
    torch.testing.assert_close(g, torch.tensor([[0.3, 4.4], [0.0, 0.0]]))
    copy = torch.empty(2, 2)
    assert sparse_copy_(w, copy, 3.5).tolist() == [[0.0, 4.0], [0.0, 0.0]]


def test_threshold_round_floor_and_order() -> None:
    w = torch.tensor([[1e-4, 0.0], [2.0, 0.0], [0.5, 0.0], [0.2, 0.0]])
    live = torch.ones(4, dtype=torch.bool)
    mask, wanted = threshold_round(w, live, threshold=1.0, min_filters=2)
    assert mask.tolist() == [False, True, True, False]
    assert wanted == 1
    mask, _ = threshold_round(w, live, criterion="l1", fraction=0.5)
    assert mask.tolist() == [False, True, True, False]


def test_deprecated_names_warn_and_still_work() -> None:
    w = torch.tensor([[1.0, 0.1]])
    from lightning_sparsity.functional.scores import capped_l1

    with pytest.warns(DeprecationWarning, match="capped_l1_norms"):
        old = capped_l1(w, 0.5)
    assert torch.equal(old, capped_l1_norms(w, 0.5))
    with pytest.warns(DeprecationWarning, match=r"`ProximalSparsity\(norm=...\)` is deprecated"):
        prox = ProximalSparsity(1e-3, norm="l1")
    assert prox.penalty == prox.norm == "l1"


def test_one_message_template() -> None:
    for call, text in [
        (lambda: check_float("x", owner="F", arg="a"), "`F(a='x')`: expected `a` to be a float"),
        (lambda: check_int(0, owner="F", arg="n", low=1), "`F(n=0)`: expected `n` >= 1, got 0."),
        (lambda: check_choice("z", ("a",), owner="F", arg="c"), "`F(c='z')`: expected `c` in"),
    ]:
        with pytest.raises((TypeError, ValueError)) as info:
            call()
        assert str(info.value).startswith(text)


def test_kill_filters_and_pruned_size() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2)
    ).eval()
    example = (torch.randn(2, 1, 8, 8),)
    before = count_params(net)
    params, _ = pruned_size(net, {"0": torch.tensor([0, 3])}, example)
    assert count_params(net) == before
    assert net[0].weight.abs().sum() > 0
    # two filters: 2 * (9 + 1) conv, 2 * 2 BN, 2 * 36 * 2 fc inputs
    assert before - params == 2 * 10 + 2 * 2 + 2 * 36 * 2
    kill_filters(net, {"0": [1]})
    assert net[1].bias[1] == 0
    assert net[0].weight[1].abs().sum() == 0
    with pytest.raises(ValueError, match="expected layer names"):
        kill_filters(net, {"conv9": [0]})


# ---------------------------------------------------------------- resume and first-batch checks
class Module(pl.LightningModule):
    def __init__(self, optimizer: str = "adam") -> None:
        super().__init__()
        self.model = Net()
        self.optimizer = optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(dataset(), batch_size=8)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return torch.optim.SGD(self.parameters(), lr=1e-2, momentum=0.9)


def test_resume_with_another_optimizer_names_the_mistake(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, [SparsityRegularizer("l1", 1e-4)])
    trainer.fit(Module("adam"))
    ckpt = tmp_path / "adam.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = make_trainer(tmp_path, [SparsityRegularizer("l1", 1e-4)], max_epochs=2)
    with pytest.raises(
        RuntimeError, match=r"`SGD` was restored .* lacks its settings .*'momentum'"
    ):
        resumed.fit(Module("sgd"), ckpt_path=ckpt)


def test_export_fails_at_the_first_batch_when_nothing_can_be_pruned(tmp_path: Path) -> None:
    class Opaque(Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))  # only the output layer

    seen: list[int] = []

    class Count(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            seen.append(1)

    export = PrunedExport(dirpath=tmp_path / "out")
    trainer = make_trainer(tmp_path, [export, Count(), FilterThresholding(threshold=1e-3)])
    with pytest.raises(ValueError, match=r"at least one Conv/Linear layer whose output channels"):
        trainer.fit(Opaque())
    assert not seen  # before any batch trained


def test_export_fails_at_the_first_batch_when_the_analysis_keeps_everything(
    tmp_path: Path,
) -> None:
    class Branchy(nn.Module):  # data-dependent control flow in the top-level forward
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 1, 3, 3))
            self.fc = nn.Linear(4 * 6 * 6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                x = -x
            return self.fc(nn.functional.conv2d(x, self.weight).flatten(1))

    class Opaque(Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential(Branchy(), nn.Linear(3, 3))

    trainer = make_trainer(tmp_path, [PrunedExport(dirpath=tmp_path / "out")])
    with pytest.raises(
        ValueError, match=r"every one inside a part kept whole \(`0`: torch.fx cannot trace it\)"
    ):
        trainer.fit(Opaque())
    assert trainer.global_step == 0  # before any optimizer step
