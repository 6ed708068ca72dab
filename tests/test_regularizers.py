"""The regularizer, proximal and splitting callbacks in a real Trainer.

The gradient the optimizer sees is recorded inside ``optimizer.step`` (after Lightning's closure has
run backward, the ``on_before_optimizer_step`` hooks and gradient clipping) and compared with a
reference computed independently: the data gradient by autograd on the recorded weights and
batches, the penalty gradient by autograd on the single-tensor functional penalties.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparsity import ProximalSparsity, SparsityRegularizer, VariableSplitting
from lightning_sparsity.functional.penalties import PENALTIES

NUM_BATCHES = 4
BATCH = 8


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_BATCHES * BATCH, 1, 8, 8, generator=g)
    y = torch.randint(0, 5, (NUM_BATCHES * BATCH,), generator=g)
    return TensorDataset(x, y)


def make_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5)
    )


class Recorder:
    """Wraps an optimizer's ``step``: records the gradients and weights it sees, and which
    training batches contributed since the previous step.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.batches: list[int] = []
        self._since = 0

    def wrap(self, optimizer: torch.optim.Optimizer, names: dict[int, str]) -> None:
        original = optimizer.step

        def step(closure: Callable[[], Any] | None = None) -> Any:
            loss = closure() if closure is not None else None
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self.steps.append(
                {
                    "grads": {names[id(p)]: p.grad.detach().clone() for p in params},
                    "weights": {names[id(p)]: p.detach().clone() for p in params},
                    "batches": self.batches[self._since :],
                }
            )
            self._since = len(self.batches)
            original()
            self.steps[-1]["after"] = {names[id(p)]: p.detach().clone() for p in params}
            self.steps[-1]["state"] = {
                names[id(p)]: {
                    k: v.clone() if isinstance(v, Tensor) else v
                    for k, v in optimizer.state[p].items()
                }
                for p in params
            }
            return loss

        optimizer.step = step  # type: ignore[method-assign]


class Net(pl.LightningModule):
    def __init__(self, optimizer: str = "sgd", lr: float = 0.05) -> None:
        super().__init__()
        self.model = make_net()
        self.optimizer_name = optimizer
        self.lr = lr
        self.recorder = Recorder()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.recorder.batches.append(batch_idx)
        x, y = batch
        return F.cross_entropy(self(x), y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(dataset(), batch_size=BATCH, shuffle=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.model.parameters()
        opt: torch.optim.Optimizer
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        elif self.optimizer_name == "adam":
            opt = torch.optim.Adam(params, lr=self.lr)
        elif self.optimizer_name == "adamw":
            opt = torch.optim.AdamW(params, lr=self.lr, amsgrad=True)
        elif self.optimizer_name == "rmsprop":
            opt = torch.optim.RMSprop(params, lr=self.lr)
        elif self.optimizer_name == "rmsprop_centered":
            opt = torch.optim.RMSprop(params, lr=self.lr, centered=True, momentum=0.5)
        elif self.optimizer_name == "lbfgs":
            opt = torch.optim.LBFGS(params, lr=self.lr)
        else:
            raise AssertionError(self.optimizer_name)
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.recorder.wrap(opt, names)
        return opt


def fit(
    callbacks: list[pl.Callback], module: Net | None = None, tmp_path: Path | None = None, **kw: Any
) -> Net:
    module = module or Net()
    options: dict[str, Any] = {
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "default_root_dir": tmp_path,
    }
    options.update(kw)
    pl.Trainer(callbacks=callbacks, **options).fit(module)
    return module


def data_grads(step: dict[str, Any], accumulate: int, bf16: bool) -> dict[str, Tensor]:
    """Autograd of the mean-over-accumulation cross-entropy at the recorded weights."""
    net = make_net()
    net.load_state_dict(step["weights"])
    data = dataset()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for b in step["batches"]:
        x, y = data[b * BATCH : (b + 1) * BATCH]
        with ctx:
            loss = F.cross_entropy(net(x), y) / accumulate
        loss.backward()
    return {n: p.grad for n, p in net.named_parameters() if p.grad is not None}


def penalty_grad(name: str, weight: Tensor, **options: Any) -> Tensor:
    w = weight.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(PENALTIES[name](w, **options), w)
    return grad


# ---------------------------------------------------------------- SparsityRegularizer


@pytest.mark.parametrize(
    ("penalty", "options", "trainer_kw"),
    [
        ("group_lasso", {}, {}),
        ("l1_l2", {}, {"accumulate_grad_batches": 2}),
        ("capped_l1", {"cap": 1.0}, {"precision": "bf16-mixed"}),
        ("l1", {}, {"accumulate_grad_batches": 2, "precision": "bf16-mixed"}),
    ],
)
def test_optimizer_sees_data_plus_penalty_gradient(
    penalty: str, options: dict[str, Any], trainer_kw: dict[str, Any]
) -> None:
    strength = 0.3
    module = fit([SparsityRegularizer(penalty, strength, **options)], **trainer_kw)
    accumulate = trainer_kw.get("accumulate_grad_batches", 1)
    bf16 = trainer_kw.get("precision") == "bf16-mixed"
    steps = module.recorder.steps
    assert len(steps) == NUM_BATCHES // accumulate
    assert all(len(s["batches"]) == accumulate for s in steps)
    for step in steps:
        expected = data_grads(step, accumulate, bf16)
        for name in ("0.weight", "2.weight"):  # the convolutions, penalised
            w = step["weights"][name]
            assert w.dtype == torch.float32  # float32 master weights also under bf16-mixed
            kwargs = {} if penalty == "l1" else {"granularity": "filter", **options}
            expected[name] = expected[name] + strength * penalty_grad(penalty, w, **kwargs)
        # the output layer (5) is skipped at filter granularity; biases are never penalised
        for name, grad in step["grads"].items():
            tol = {"atol": 1e-2, "rtol": 1e-2} if bf16 else {"atol": 1e-6, "rtol": 1e-5}
            torch.testing.assert_close(grad, expected[name], **tol, msg=name)


def test_clipping_applies_after_the_penalty() -> None:
    strength, clip = 0.5, 0.05
    module = fit([SparsityRegularizer("group_lasso", strength)], gradient_clip_val=clip)
    for step in module.recorder.steps:
        total = data_grads(step, 1, False)
        for name in ("0.weight", "2.weight"):
            total[name] = total[name] + strength * penalty_grad(
                "group_lasso", step["weights"][name]
            )
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in total.values()]))
        assert norm > 2 * clip  # clipping is active
        scale = clip / (norm + 1e-6)
        for name, grad in step["grads"].items():
            torch.testing.assert_close(grad, total[name] * scale, atol=1e-6, rtol=1e-4, msg=name)
        seen = torch.linalg.vector_norm(torch.stack([g.norm() for g in step["grads"].values()]))
        assert math.isclose(float(seen), clip, rel_tol=1e-4)


def test_zero_strength_schedule_and_logging(tmp_path: Path) -> None:
    schedule_calls: list[int] = []

    def schedule(epoch: int) -> float:
        schedule_calls.append(epoch)
        return 0.0 if epoch == 0 else 0.1

    reg = SparsityRegularizer("l1_l2", schedule, granularity="channel")
    module = fit([reg], max_epochs=2, logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=1)
    assert 0 in schedule_calls
    assert 1 in schedule_calls
    first, later = module.recorder.steps[0], module.recorder.steps[-1]
    # (layer 0 has a single input channel: l1/l2 of one group is constant, its gradient 0)
    torch.testing.assert_close(first["grads"]["2.weight"], data_grads(first, 1, False)["2.weight"])
    assert not torch.allclose(later["grads"]["2.weight"], data_grads(later, 1, False)["2.weight"])
    logged = (Path(module.trainer.logger.log_dir) / "metrics.csv").read_text()  # type: ignore[union-attr]
    assert "sparsity/penalty/l1_l2" in logged


def test_penalty_method_and_callable_penalty() -> None:
    net_module = Net()
    reg = SparsityRegularizer("group_lasso", 0.5)
    expected = 0.5 * sum(
        PENALTIES["group_lasso"](net_module.model[i].weight)
        for i in (0, 2)  # type: ignore[index]
    )
    torch.testing.assert_close(reg.penalty(net_module), expected)
    # a callable penalty goes through autograd: weight -> 0.5 * sum(w^2) has gradient w
    module = fit([SparsityRegularizer(lambda w: 0.5 * w.square().sum(), 2.0, "weight")])
    step = module.recorder.steps[0]
    ref = data_grads(step, 1, False)
    for name in ("0.weight", "2.weight", "5.weight"):  # "weight" granularity keeps the output layer
        torch.testing.assert_close(step["grads"][name], ref[name] + 2.0 * step["weights"][name])


def test_penalty_in_the_loss_while_attached_raises() -> None:
    reg = SparsityRegularizer("l1", 0.1)

    class Double(Net):
        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            return super().training_step(batch, batch_idx) + reg.penalty(self)

    with pytest.raises(RuntimeError, match="count twice"):
        fit([reg], module=Double())


def test_nan_penalty_raises_naming_the_layer() -> None:
    class Poisoned(Net):
        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            if batch_idx == 1:
                with torch.no_grad():
                    self.model[2].weight[0, 0, 0, 0] = float("nan")  # type: ignore[index]

    # the NaN weight is in layer 2; back-propagation also spreads it into layer 0's gradient
    match = r"penalty 'group_lasso' is NaN or inf in layer\(s\) \['2'\]; the gradient .*'0', '2'"
    with pytest.raises(RuntimeError, match=match):
        fit([SparsityRegularizer("group_lasso", 0.1)], module=Poisoned())

    # a non-finite value only in the data gradient is caught too, before the optimizer step
    class BadGrad(Net):
        def on_after_backward(self) -> None:
            self.model[0].weight.grad[0, 0, 0, 0] = float("inf")  # type: ignore[index]

    bad = BadGrad()
    before = bad.model[0].weight.detach().clone()  # type: ignore[index]
    with pytest.raises(RuntimeError, match=r"the gradient is NaN or inf in layer\(s\) \['0'\]"):
        fit([SparsityRegularizer("l1", 0.1)], module=bad)
    assert torch.equal(bad.model[0].weight, before)  # type: ignore[index]


def test_regularizer_misconfiguration() -> None:
    with pytest.raises(
        ValueError, match=r"expected `penalty` in \['bn_scale_l1'.*ProximalSparsity"
    ):
        SparsityRegularizer("l0", 0.1)
    with pytest.raises(ValueError, match=r"expected `strength` finite and >= 0, got -0.1"):
        SparsityRegularizer("l1", -0.1)
    with pytest.raises(ValueError, match=r"expected `strength` finite and >= 0, got nan"):
        SparsityRegularizer("l1", float("nan"))
    with pytest.raises(TypeError, match=r"expected `strength` to be a float >= 0 or a schedule"):
        SparsityRegularizer("l1", "0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"granularity='filters'.*\['filter', 'channel'"):
        SparsityRegularizer("l1", 0.1, granularity="filters")
    with pytest.raises(ValueError, match=r"expected a `cap` >= 0"):
        SparsityRegularizer("capped_l1", 0.1)
    with pytest.raises(ValueError, match=r"expected `cap` only with penalty='capped_l1'"):
        SparsityRegularizer("l1", 0.1, cap=1.0)
    with pytest.raises(ValueError, match=r"layer '5' is a Linear layer.*no kh x kw"):
        fit([SparsityRegularizer("group_lasso", 0.1, granularity="kernel")])
    with pytest.raises(ValueError, match=r"no module named 'conv9'.*Available.*'0', '2', '5'"):
        fit([SparsityRegularizer("group_lasso", 0.1, layers=["conv9"])])
    with pytest.raises(ValueError, match=r"`log_every_n_steps` >= 0, got -1. HINT: 0 logs no step"):
        SparsityRegularizer("l1", 0.1, log_every_n_steps=-1)
    with pytest.raises(
        ValueError, match=r"schedule's value to be a finite float >= 0, got -1.0 at epoch 0"
    ):
        fit([SparsityRegularizer("l1", lambda epoch: -1.0)])


def test_bn_scale_l1_targets_the_batchnorm_scales() -> None:
    class BNNet(Net):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential(
                nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5)
            )

        def configure_optimizers(self) -> torch.optim.Optimizer:
            opt = torch.optim.SGD(self.model.parameters(), lr=0.0)
            self.recorder.wrap(opt, {id(p): n for n, p in self.model.named_parameters()})
            return opt

    with_reg = fit(
        [SparsityRegularizer("bn_scale_l1", 0.25)], module=BNNet(), limit_train_batches=1
    )
    torch.manual_seed(0)
    without = fit([], module=BNNet(), limit_train_batches=1)
    a, b = with_reg.recorder.steps[0]["grads"], without.recorder.steps[0]["grads"]
    gamma = with_reg.recorder.steps[0]["weights"]["1.weight"]
    torch.testing.assert_close(a["1.weight"], b["1.weight"] + 0.25 * gamma.sign())
    torch.testing.assert_close(a["0.weight"], b["0.weight"])


# ---------------------------------------------------------------- ProximalSparsity


class AfterBatch(pl.Callback):
    """Records the weights at every ``on_train_batch_end`` (placed after the tested callback)."""

    def __init__(self) -> None:
        self.weights: list[dict[str, Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.weights.append({n: p.detach().clone() for n, p in pl_module.model.named_parameters()})


def _eta(optimizer: str, lr: float, state: dict[str, Any]) -> Tensor | float:
    """The per-coordinate step size of the step just taken, written out per optimizer."""
    if optimizer == "sgd":
        return lr
    if optimizer == "rmsprop":
        return lr / (state["square_avg"].sqrt() + 1e-8)
    if optimizer == "rmsprop_centered":
        return lr / ((state["square_avg"] - state["grad_avg"] ** 2).sqrt() + 1e-8)
    # Adam's documented update: w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    v = state["max_exp_avg_sq"] if optimizer == "adamw" else state["exp_avg_sq"]
    t = float(state["step"])
    return lr / (1 - 0.9**t) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)


@pytest.mark.parametrize(
    ("make", "direction"),
    [
        (lambda p: torch.optim.Adam([p], lr=0.1), "exp_avg"),
        (lambda p: torch.optim.Adam([p], lr=0.1, fused=True), "exp_avg"),
        (lambda p: torch.optim.AdamW([p], lr=0.1, amsgrad=True, weight_decay=0.0), "exp_avg"),
        (lambda p: torch.optim.RMSprop([p], lr=0.1), "grad"),
        (lambda p: torch.optim.RMSprop([p], lr=0.1, centered=True), "grad"),
        (lambda p: torch.optim.Adagrad([p], lr=0.1, lr_decay=0.1), "grad"),
    ],
)
def test_step_denominator_is_the_step_the_optimizer_took(make: Any, direction: str) -> None:
    """Known answer from the optimizer itself: the weights moved by ``-lr / d * direction``
    (Adam's first moment, or the gradient), at steps 1, 2 and 10.
    """
    from lightning_sparsity.functional.optim import step_denominator

    p = torch.nn.Parameter(torch.randn(50))
    optimizer = make(p)
    for t in range(1, 11):
        p.grad = torch.randn(50)
        before = p.detach().clone()
        optimizer.step()
        if t not in (1, 2, 10):
            continue
        group = optimizer.param_groups[0]
        d = step_denominator(optimizer, group, optimizer.state[p])
        assert d is not None
        move = p.grad if direction == "grad" else optimizer.state[p]["exp_avg"]
        torch.testing.assert_close(-(p.detach() - before), group["lr"] / d * move)


def _dims(granularity: str) -> tuple[int, ...]:
    return {"filter": (1, 2, 3), "channel": (0, 2, 3), "weight": ()}[granularity]


def _expected_prox(z: Tensor, eta: Tensor | float, lam: float, norm: str, gran: str) -> Tensor:
    """The maps of REFERENCES.md written out (group soft with a scalar eta only)."""
    eta = torch.as_tensor(eta).expand_as(z)
    dims = _dims(gran)
    if norm == "l0":
        score = z.square() / (2 * eta)
        score = score.sum(dims, keepdim=True) if dims else score
        return z * (score > lam)
    if not dims:
        return z.sign() * (z.abs() - eta * lam).clamp_min(0)
    assert eta.unique().numel() == 1  # only the scalar form has a closed form here
    norms = torch.linalg.vector_norm(z, dim=dims, keepdim=True)
    return z * (1 - eta * lam / norms).clamp_min(0)


@pytest.mark.parametrize(
    ("optimizer", "lr", "norm", "gran", "lam"),
    [
        ("sgd", 0.05, "l1", "filter", 3.0),
        ("rmsprop", 1e-3, "l0", "filter", 0.2),
        ("adamw", 1e-3, "l0", "weight", 0.01),
        ("rmsprop_centered", 1e-3, "l1", "weight", 0.1),
        ("adam", 1e-3, "l0", "channel", 1.0),
    ],
)
def test_proximal_map_in_the_optimizer_metric(
    optimizer: str, lr: float, norm: str, gran: str, lam: float
) -> None:
    probe = AfterBatch()
    module = fit([ProximalSparsity(lam, norm, gran), probe], module=Net(optimizer, lr))
    zeroed = kept = 0
    for step, final in zip(module.recorder.steps, probe.weights):
        for name in ("0.weight", "2.weight"):
            z, state = step["after"][name], step["state"][name]
            expected = _expected_prox(z, _eta(optimizer, lr, state), lam, norm, gran)
            torch.testing.assert_close(final[name], expected, atol=1e-7, rtol=1e-5, msg=name)
            zeroed += int((expected == 0).sum()) - int((z == 0).sum())
            kept += int((expected != 0).sum())
        # the output layer (filter granularity) and the biases are untouched
        for name in ("5.weight", "0.bias") if gran == "filter" else ("0.bias",):
            assert torch.equal(final[name], step["after"][name])
    assert zeroed > 0
    assert kept > 0


def test_proximal_group_soft_per_coordinate_and_exact_zeros(tmp_path: Path) -> None:
    from lightning_sparsity.functional.proximal import group_soft_threshold

    probe = AfterBatch()
    module = fit(
        [ProximalSparsity(0.3, "l1", "filter"), probe],
        module=Net("rmsprop", 1e-3),
        logger=pl.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
    )
    for step, final in zip(module.recorder.steps, probe.weights):
        z = step["after"]["2.weight"]
        eta = _eta("rmsprop", 1e-3, step["state"]["2.weight"])
        assert isinstance(eta, Tensor)
        assert eta.std() > 0
        torch.testing.assert_close(final["2.weight"], group_soft_threshold(z, eta * 0.3))
    # filters set to exactly zero, the rest not
    norms = module.model[2].weight.flatten(1).norm(dim=1)  # type: ignore[index]
    assert 0 < int((norms == 0).sum()) < norms.numel()
    logged = (Path(module.trainer.logger.log_dir) / "metrics.csv").read_text()  # type: ignore[union-attr]
    assert "sparsity/proximal/nonzero_fraction" in logged


def test_proximal_runs_only_after_optimizer_steps() -> None:
    probe = AfterBatch()
    initial = make_net()
    module = Net("sgd", 0.05)
    module.model.load_state_dict(initial.state_dict())
    fit([ProximalSparsity(0.5, "l1", "weight"), probe], module=module, accumulate_grad_batches=2)
    assert len(module.recorder.steps) == 2
    # batch 0 and 2 do not step: the soft threshold (not idempotent) must not run there
    for name, w in initial.named_parameters():
        assert torch.equal(probe.weights[0][name], w.detach())
        assert torch.equal(probe.weights[2][name], probe.weights[1][name])
    assert not torch.equal(probe.weights[1]["0.weight"], initial[0].weight.detach())  # type: ignore[index]


def test_proximal_misconfiguration() -> None:
    with pytest.raises(ValueError, match=r"expected `penalty` in \['l0', 'l1'\], got 'l2'"):
        ProximalSparsity(0.1, "l2")
    with pytest.raises(ValueError, match=r"expected `metric` in \['auto', 'lr'\]"):
        ProximalSparsity(0.1, metric="adam")
    with pytest.raises(ValueError, match=r"`strength` finite and >= 0, got -1"):
        ProximalSparsity(-1)
    with pytest.raises(
        TypeError, match=r"step size is known: \['SGD', 'RMSprop', 'Adam'.*got `LBFGS`.*metric='lr'"
    ):
        fit([ProximalSparsity(0.1)], module=Net("lbfgs"))


# ---------------------------------------------------------------- VariableSplitting


@pytest.mark.parametrize("accumulate", [1, 2])
def test_splitting_gradient_and_u_update(accumulate: int) -> None:
    lam, beta, n = 0.01, 2.0, 10.0
    thr = math.sqrt(2 * lam / beta)  # 0.1: splits the initial weights
    split = VariableSplitting(lam, beta, linear_granularity="channel", divide_by=n)
    module = fit([split], accumulate_grad_batches=accumulate, max_epochs=2)
    assert len(module.recorder.steps) == 2 * NUM_BATCHES // accumulate
    for step in module.recorder.steps:
        expected = data_grads(step, accumulate, False)
        for name, gran in (("0.weight", "filter"), ("2.weight", "filter"), ("5.weight", "channel")):
            w = step["weights"][name]
            u = w * (w.abs() > thr)  # U from the weights after the previous step
            assert 0 < int((u == 0).sum()) < u.numel()
            gl = penalty_grad("group_lasso", w, granularity=gran, scale_by_size=True)
            expected[name] = expected[name] + (beta * (w - u) + lam * gl) / n
        for name, grad in step["grads"].items():
            torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)
    # final projection: W = U, whose small weights are exactly zero
    for name in ("0", "2", "5"):
        w = module.model.get_submodule(name).weight.detach()
        torch.testing.assert_close(split.U[name], w, rtol=0, atol=0)
        assert bool(((w == 0) | (w.abs() > thr)).all())
        assert int((w == 0).sum()) > 0


def test_splitting_beta_grows_on_schedule(tmp_path: Path) -> None:
    split = VariableSplitting(0.01, 1.0, beta_growth=2.0, growth_every_n_epochs=2)
    betas: list[float] = []

    class Probe(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            betas.append(split.beta)

    logger = pl.loggers.CSVLogger(tmp_path)
    fit([split, Probe()], max_epochs=5, limit_train_batches=1, logger=logger, log_every_n_steps=1)
    assert betas == [1.0, 1.0, 2.0, 2.0, 4.0]
    logged = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "sparsity/splitting/beta" in logged
    assert "sparsity/splitting/penalty" in logged
    assert split.growth_epoch == 4


def test_splitting_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    def split(beta: float = 1.0) -> VariableSplitting:
        return VariableSplitting(0.02, beta, beta_growth=1.5, growth_every_n_epochs=1)

    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = split()
    torch.manual_seed(0)
    fit([first, ckpt_cb], max_epochs=2, enable_checkpointing=True, tmp_path=tmp_path)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"][first.state_key]
    assert saved["beta"] == pytest.approx(1.5)
    assert saved["growth_epoch"] == 1
    assert set(saved["U"]) == {"0", "2"}  # the output layer is skipped at filter granularity
    for name, u in saved["U"].items():
        torch.testing.assert_close(u, first.U[name], rtol=0, atol=0)

    # resume with a different initial beta: the checkpoint's state wins
    resumed = split(beta=99.0)
    seen: dict[str, Any] = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            seen.update(beta=resumed.beta, U={k: v.clone() for k, v in resumed.U.items()})

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            seen["epoch_beta"] = resumed.beta

    torch.manual_seed(0)
    module = Net()
    pl.Trainer(
        callbacks=[resumed, Probe()],
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    ).fit(module, ckpt_path=tmp_path / "last.ckpt")
    assert seen["beta"] == pytest.approx(1.5)
    assert seen["epoch_beta"] == pytest.approx(2.25)  # grown once more at epoch 2, not from 99
    for name, u in saved["U"].items():
        torch.testing.assert_close(seen["U"][name], u, rtol=0, atol=0)

    # the resumed run ends where an uninterrupted 3-epoch run ends
    torch.manual_seed(0)
    straight = fit([split()], max_epochs=3)
    for (name, a), b in zip(module.named_parameters(), straight.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_splitting_misconfiguration() -> None:
    with pytest.raises(ValueError, match=r"expected `beta` finite and > 0"):
        VariableSplitting(0.1, beta=0.0)
    with pytest.raises(ValueError, match=r"expected `beta_growth` finite and >= 1"):
        VariableSplitting(0.1, beta=1.0, beta_growth=0.5)
    with pytest.raises(ValueError, match=r"`growth_every_n_epochs` >= 1, got 0"):
        VariableSplitting(0.1, beta=1.0, growth_every_n_epochs=0)
    with pytest.raises(ValueError, match=r"expected `divide_by` finite and > 0"):
        VariableSplitting(0.1, beta=1.0, divide_by=0)
    with pytest.raises(ValueError, match=r"expected `strength` finite and >= 0, got nan"):
        VariableSplitting(float("nan"), beta=1.0)
    with pytest.raises(ValueError, match=r"granularity='neuron'"):
        VariableSplitting(0.1, beta=1.0, linear_granularity="neuron")
