"""The sparsity callbacks under every precision, optimizer flavour, accumulation and clipping.

The known answers: a callback that adds a penalty's gradient must move the weights exactly as the
same penalty written into the loss does (Lightning and GradScaler then handle the scaling, the
fused kernels and the skipped steps themselves); a proximal callback must equal the map written
by hand from each optimizer's documented update, applied after the steps that really happened.
``"16-mixed"`` runs on the CPU with Lightning's ``MixedPrecision`` plugin and a real
``GradScaler`` (the Trainer flag alone turns into bf16 on the CPU); the batches in ``POISON``
return an infinite loss there, so GradScaler skips their step, batch 0 before any optimizer state
exists.

Fused SGD runs without momentum: torch 2.14's fused CPU SGD creates its momentum buffer from
uninitialised memory when GradScaler skips the very first step (garbage weights with or without
these callbacks), a PyTorch bug outside this library.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _shared import Net, dataset, make_optimizer, make_trainer
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_sparsity import (
    FilterThresholding,
    ProximalSparsity,
    PrunedExport,
    SparsityRegularizer,
    VariableSplitting,
)

PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
OPTIMIZERS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("sgd", {}),
    ("sgd", {"fused": True, "momentum": 0.0}),
    ("adam", {"foreach": True}),
    ("adam", {"fused": True}),
    ("adamw", {"fused": True}),
    ("rmsprop", {"foreach": False}),
)
POISON = (0, 3)  # under 16-mixed: an inf loss, so GradScaler skips the step
BATCHES = 6


def precision_options(precision: str) -> dict[str, Any]:
    if precision == "16-mixed":
        scaler = torch.amp.GradScaler("cpu")
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
    return {"precision": precision}


class Module(pl.LightningModule):
    """Net with an optional loss term, inf losses on chosen batches and a hook after each batch
    (the LightningModule's ``on_train_batch_end`` runs after every callback's).
    """

    def __init__(
        self,
        optimizer: str,
        opt_kwargs: dict[str, Any],
        lr: float = 0.05,
        poison: tuple[int, ...] = (),
        extra_loss: Callable[[nn.Module], Tensor] | None = None,
        after_batch: Callable[[Module, int], None] | None = None,
        zero_data: bool = False,
    ) -> None:
        super().__init__()
        self.model = Net()
        self.optimizer_name, self.opt_kwargs, self.lr = optimizer, opt_kwargs, lr
        self.poison, self.extra_loss, self.after_batch = poison, extra_loss, after_batch
        self.zero_data = zero_data
        self.unchanged_on_poison: list[bool] = []
        self._before: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        out = self(x)
        loss = (out * 0).sum() if self.zero_data else F.cross_entropy(out, y)
        if batch_idx in self.poison:
            loss = loss * math.inf
        if self.extra_loss is not None:
            with torch.autocast("cpu", enabled=False):
                loss = loss + self.extra_loss(self.model)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._before = [p.detach().clone() for p in self.parameters()]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx in self.poison:
            same = all(torch.equal(a, p) for a, p in zip(self._before, self.parameters()))
            self.unchanged_on_poison.append(same)
        if self.after_batch is not None:
            self.after_batch(self, batch_idx)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(dataset(BATCHES * 8), batch_size=8)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.optimizer_name, self.parameters(), self.lr, **self.opt_kwargs)


def run(
    tmp_path: Path,
    precision: str,
    optimizer: tuple[str, dict[str, Any]],
    callbacks: list[pl.Callback],
    accumulate: int = 1,
    clip: float | None = None,
    **module_kwargs: Any,
) -> Module:
    torch.manual_seed(0)
    poison = POISON if precision == "16-mixed" else ()
    module = Module(optimizer[0], optimizer[1], poison=poison, **module_kwargs)
    trainer = make_trainer(
        tmp_path,
        callbacks,
        limit_train_batches=BATCHES,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        **precision_options(precision),
    )
    trainer.fit(module)
    if poison:  # the poisoned steps really were skipped, the callbacks' work included
        assert module.unchanged_on_poison == [True] * len(poison)
    return module


CASES = [(p, o, 1, None) for p in PRECISIONS for o in OPTIMIZERS] + [
    ("16-mixed", ("sgd", {}), 2, 0.5),
    ("16-mixed", ("adam", {"foreach": False}), 2, 0.5),
    ("bf16-mixed", ("adam", {"fused": True}), 2, None),
    ("32-true", ("rmsprop", {}), 3, 0.5),
]


def case_id(case: tuple[Any, ...]) -> str:
    precision, (name, kwargs), accumulate, clip = case
    flags = "-".join(f"{k}" for k, v in kwargs.items() if v)
    return f"{precision}-{name}{'-' + flags if flags else ''}-acc{accumulate}-clip{clip}"


def assert_same_weights(a: nn.Module, b: nn.Module, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Every parameter but conv1's bias, which feeds a BatchNorm: its gradient is 0 up to rounding,
    and Adam's normalised step turns that rounding noise into lr-sized moves.
    """
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        if not name.endswith("conv1.bias"):
            torch.testing.assert_close(
                x, y, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
            )


def conv_weights(model: nn.Module) -> list[Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def group_lasso_by_hand(model: nn.Module) -> Tensor:
    """Sum over the conv filters of ||W_o||_2 (the output layer fc is skipped at "filter")."""
    return sum(w.flatten(1).norm(dim=1).sum() for w in conv_weights(model)[:2])  # type: ignore[return-value]


def l1_by_hand(model: nn.Module) -> Tensor:
    return sum(w.abs().sum() for w in conv_weights(model))  # type: ignore[return-value]


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_regularizer_equals_the_penalty_in_the_loss(tmp_path: Path, case: tuple[Any, ...]) -> None:
    precision, optimizer, accumulate, clip = case
    strength = 1e-2
    with_callback = run(
        tmp_path / "cb",
        precision,
        optimizer,
        [SparsityRegularizer("group_lasso", strength)],
        accumulate,
        clip,
    )
    reference = run(
        tmp_path / "ref",
        precision,
        optimizer,
        [],
        accumulate,
        clip,
        extra_loss=lambda m: strength * group_lasso_by_hand(m),
    )
    assert_same_weights(with_callback, reference)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_fused_and_plain_move_the_weights_alike(tmp_path: Path, precision: str, name: str) -> None:
    """No data gradient: plain SGD moves every weight by exactly lr * lambda (the fused bug moved
    it by lr * lambda / loss scale); Adam fused and plain agree.
    """
    runs = []
    for fused in (False, True):
        module = run(
            tmp_path / str(fused),
            precision,
            (name, {"fused": fused, **({"momentum": 0.0} if name == "sgd" else {})}),
            [SparsityRegularizer("l1", 1.0, granularity="weight")],
            zero_data=True,
            lr=0.01,
        )
        runs.append(module)
    torch.manual_seed(0)
    start = Net()
    steps = BATCHES - (len(POISON) if precision == "16-mixed" else 0)
    for plain, fused, w0 in zip(
        conv_weights(runs[0].model), conv_weights(runs[1].model), conv_weights(start)
    ):
        torch.testing.assert_close(plain, fused, rtol=1e-6, atol=1e-7)
        if name == "sgd":  # |w| shrinks by lr * lambda per step until it crosses 0
            far = w0.abs() > 0.01 * steps + 1e-3
            moved = (w0 - plain)[far] * w0[far].sign()
            torch.testing.assert_close(moved, torch.full_like(moved, 0.01 * steps))


def filter_conv_penalty(model: nn.Module, u: list[Tensor], lam: float, beta: float) -> Tensor:
    total = torch.zeros(())
    for w, uu in zip(conv_weights(model)[:2], u):
        groups = w.flatten(1)
        total = total + lam * math.sqrt(groups.shape[1]) * groups.norm(dim=1).sum()
        total = total + beta / 2 * (w - uu).square().sum()
    return total


@pytest.mark.parametrize(
    "case", CASES[::2] + CASES[-4:], ids=[case_id(c) for c in CASES[::2] + CASES[-4:]]
)
def test_splitting_equals_the_method_written_by_hand(tmp_path: Path, case: tuple[Any, ...]) -> None:
    precision, optimizer, accumulate, clip = case
    lam, beta = 2e-3, 1.0
    threshold = math.sqrt(2 * lam / beta)
    split = VariableSplitting(lam, beta=beta, final_projection=False)
    with_callback = run(tmp_path / "cb", precision, optimizer, [split], accumulate, clip)

    u: list[Tensor] = []

    def project(module: Module) -> None:
        u[:] = [w.detach() * (w.detach().abs() > threshold) for w in conv_weights(module.model)[:2]]

    def after(module: Module, batch_idx: int) -> None:
        stepped = (batch_idx + 1) % accumulate == 0 or batch_idx + 1 == BATCHES
        if stepped and batch_idx not in module.poison:
            project(module)

    torch.manual_seed(0)
    project(Module("sgd", {}))  # U from the initial weights (same seed as `run`)
    reference = run(
        tmp_path / "ref",
        precision,
        optimizer,
        [],
        accumulate,
        clip,
        extra_loss=lambda m: filter_conv_penalty(m, u, lam, beta),
        after_batch=after,
    )
    assert_same_weights(with_callback, reference)
    for name, ref_u in zip(("conv1", "conv2"), u):
        torch.testing.assert_close(split.U[name], ref_u, rtol=1e-5, atol=1e-6)


def eta_by_hand(optimizer: torch.optim.Optimizer, p: Tensor) -> Tensor | float:
    """The per-coordinate step of the update just taken, from each optimizer's documented rule:
    SGD ``w -= lr g``; RMSprop ``w -= lr g / (sqrt(v) + eps)``; Adam(W)
    ``w -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``, i.e. ``eta`` per unit of ``m``.
    """
    group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
    state = optimizer.state[p]
    lr = group["lr"]
    if isinstance(optimizer, torch.optim.RMSprop):
        return lr / (state["square_avg"].sqrt() + group["eps"])
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        b1, b2 = group["betas"]
        t = float(state["step"])
        return lr / (1 - b1**t) / ((state["exp_avg_sq"] / (1 - b2**t)).sqrt() + group["eps"])
    return lr


PROX_OPTIMIZERS = (
    ("sgd", {}),
    ("sgd", {"fused": True, "momentum": 0.0}),
    ("adam", {}),
    ("adam", {"fused": True}),
    ("adamw", {"fused": True}),
    ("rmsprop", {}),
)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("optimizer", PROX_OPTIMIZERS, ids=lambda o: f"{o[0]}{o[1]}")
def test_proximal_equals_the_map_written_by_hand(
    tmp_path: Path, precision: str, optimizer: tuple[str, dict[str, Any]]
) -> None:
    lam = 1.0 if optimizer[0] == "sgd" else 1e-2
    prox = ProximalSparsity(lam, penalty="l1", granularity="weight")
    with_callback = run(tmp_path / "cb", precision, optimizer, [prox], lr=0.01)

    def after(module: Module, batch_idx: int) -> None:
        if batch_idx in module.poison:
            return
        opt = module.trainer.optimizers[0]
        with torch.no_grad():
            for w in conv_weights(module.model):
                eta = eta_by_hand(opt, w)
                w.copy_(w.sign() * (w.abs() - eta * lam).clamp_min(0))

    reference = run(tmp_path / "ref", precision, optimizer, [], after_batch=after, lr=0.01)
    zeros = 0
    for a, b in zip(conv_weights(with_callback.model), conv_weights(reference.model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        zeros += int((a == 0).sum())
    assert zeros > 0  # the map did something


@pytest.mark.parametrize("fused", [False, True])
def test_proximal_with_accumulation_and_clipping_under_fp16(tmp_path: Path, fused: bool) -> None:
    """Two batches per step, clipped: the map follows the steps (odd batches) that happened."""
    lam = 1e-2
    optimizer = ("adam", {"fused": fused})
    clip = None if fused else 0.5  # Lightning refuses clipping with a fused optimizer under AMP
    prox = ProximalSparsity(lam, penalty="l1", granularity="weight")
    with_callback = run(tmp_path / "cb", "16-mixed", optimizer, [prox], 2, clip, lr=0.01)

    def after(module: Module, batch_idx: int) -> None:
        # POISON = (0, 3): the steps at batches 1 (0 + 1) and 3 (2 + 3) are skipped
        if batch_idx % 2 == 0 or batch_idx in (1, 3):
            return
        opt = module.trainer.optimizers[0]
        with torch.no_grad():
            for w in conv_weights(module.model):
                w.copy_(w.sign() * (w.abs() - eta_by_hand(opt, w) * lam).clamp_min(0))

    reference = run(
        tmp_path / "ref", "16-mixed", optimizer, [], 2, clip, after_batch=after, lr=0.01
    )
    for a, b in zip(conv_weights(with_callback.model), conv_weights(reference.model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_skipped_steps_log_no_penalty(tmp_path: Path) -> None:
    reg = SparsityRegularizer("l1", 1e-3, granularity="weight", log_every_n_steps=1)
    torch.manual_seed(0)
    module = Module("adam", {"fused": True}, poison=POISON)
    logged: list[int] = []
    log = module.log

    def spy(name: str, *args: Any, **kwargs: Any) -> None:
        if name == "sparsity/penalty/l1":
            logged.append(module.trainer.fit_loop.epoch_loop.batch_idx)
        log(name, *args, **kwargs)

    module.log = spy  # type: ignore[method-assign]
    trainer = make_trainer(
        tmp_path, [reg], limit_train_batches=BATCHES, **precision_options("16-mixed")
    )
    trainer.fit(module)
    assert logged == [b for b in range(BATCHES) if b not in POISON]


def test_thresholding_and_export_under_fp16_with_a_fused_optimizer(tmp_path: Path) -> None:
    thresholding = FilterThresholding(criterion="l1", fraction=0.5)
    export = PrunedExport(dirpath=tmp_path / "export", formats=("pt",))
    module = run(tmp_path, "16-mixed", ("adam", {"fused": True}), [export, thresholding], lr=0.01)
    # one round at the end of epoch 0 is also the last: the masks hold, the export is smaller
    dead = {name: (~mask).nonzero().flatten() for name, mask in thresholding.masks.items()}
    assert any(d.numel() for d in dead.values())
    optimizer = module.trainer.optimizers[0]
    for name, idx in dead.items():
        layer = module.model.get_submodule(name)
        assert torch.count_nonzero(layer.weight[idx]) == 0
        for value in optimizer.state[layer.weight].values():
            if value.dim():
                assert torch.count_nonzero(value[idx]) == 0
    assert export.report.params_after < export.report.params_before


class NaNAt(pl.Callback):
    """Sets one weight of conv1 to NaN before training batch ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        if idx == self.at:
            with torch.no_grad():
                pl_module.model.conv1.weight[0, 0, 0, 0] = math.nan


@pytest.mark.parametrize(
    ("callback", "message"),
    [
        (lambda: SparsityRegularizer("l1", 1e-3, granularity="weight"), "penalty 'l1' is NaN"),
        (lambda: VariableSplitting(1e-3, beta=1.0), "the group term is NaN"),
        (lambda: ProximalSparsity(1e-3, penalty="l1", granularity="weight"), "stepped weight"),
    ],
)
@pytest.mark.parametrize("fused", [False, True])
def test_nan_guard_still_stops_a_real_nan_under_fp16(
    tmp_path: Path, callback: Callable[[], pl.Callback], message: str, fused: bool
) -> None:
    """GradScaler would skip every step of a NaN network forever: the guard still stops it."""
    with pytest.raises(RuntimeError, match=message):
        run(tmp_path, "16-mixed", ("adam", {"fused": fused}), [NaNAt(2), callback()])
