"""FilterThresholding in a real Trainer: known kills, exact-zero channels, masks that stay put."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _shared import Net, make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparsity import FilterThresholding


class Tiny(pl.LightningModule):
    def __init__(self, optimizer: str = "sgd", lr: float = 0.0, attr: str = "model") -> None:
        super().__init__()
        self.attr = attr
        setattr(self, attr, Net())
        self.optimizer = optimizer
        self.lr = lr
        generator = torch.Generator().manual_seed(1)
        self.data = TensorDataset(
            torch.randn(32, 1, 8, 8, generator=generator),
            torch.randint(0, 3, (32,), generator=generator),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.attr)(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.parameters()
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.1, amsgrad=True)
        if self.optimizer == "rmsprop":
            return torch.optim.RMSprop(params, lr=self.lr, momentum=0.9, centered=True)
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=1e-4)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)


@torch.no_grad()
def set_norms(layer: nn.Module, norms: list[float]) -> None:
    """Give each filter of ``layer`` a random direction with the given L2 norm."""
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    for j, norm in enumerate(norms):
        direction = torch.randn_like(weight[j])
        weight[j] = direction / direction.norm() * norm


def test_absolute_threshold_known_answer(tmp_path: Path) -> None:
    model = Tiny()
    set_norms(model.model.conv1, [0.01, 5.0, 0.05, 2.0])
    set_norms(model.model.conv2, [1.0, 0.09, 3.0, 0.11, 0.5, 1e-4])
    cb = FilterThresholding(threshold=0.1)
    make_trainer(tmp_path, [cb]).fit(model)
    # the output layer is never thresholded
    assert set(cb.masks) == {"conv1", "conv2"}
    assert cb.masks["conv1"].tolist() == [False, True, False, True]
    assert cb.masks["conv2"].tolist() == [True, False, True, True, True, False]
    assert cb.rounds == 1


def test_layer_names_are_relative_to_the_module_without_a_model_attribute(tmp_path: Path) -> None:
    model = Tiny(attr="net")
    set_norms(model.net.conv1, [0.01, 5.0, 0.05, 2.0])
    cb = FilterThresholding(threshold=0.1, layers=["net.conv1"])
    make_trainer(tmp_path, [cb]).fit(model)
    assert cb.masks == {"net.conv1": cb.masks["net.conv1"]}
    assert cb.masks["net.conv1"].tolist() == [False, True, False, True]


def test_norm_of_the_threshold_is_selectable(tmp_path: Path) -> None:
    model = Tiny()
    with torch.no_grad():
        model.model.conv1.weight.zero_()
        model.model.conv1.weight[0, 0, 0, 0] = 0.2  # l2 0.2, mean_abs 0.2 / 9
        model.model.conv1.weight[1] = 0.05  # l2 0.15, mean_abs 0.05
        model.model.conv1.weight[2] = 1.0
        model.model.conv1.weight[3] = 1.0
    cb = FilterThresholding(threshold=0.03, norm="mean_abs", layers=["conv1"])
    make_trainer(tmp_path, [cb]).fit(model)
    assert cb.masks["conv1"].tolist() == [False, True, True, True]


def test_relative_threshold(tmp_path: Path) -> None:
    model = Tiny()
    set_norms(model.model.conv1, [0.01, 5.0, 0.05, 2.0])
    cb = FilterThresholding(threshold=0.5, relative=True, layers=["conv1"])
    make_trainer(tmp_path, [cb]).fit(model)
    assert cb.masks["conv1"].tolist() == [False, True, False, False]


class Probe(pl.Callback):
    """Placed after the thresholding callback: records its masks at each epoch end."""

    def __init__(self, thresholding: FilterThresholding) -> None:
        self.thresholding = thresholding
        self.live: list[dict[str, int]] = []
        self.rounds: list[int] = []
        self.at_start: dict[str, torch.Tensor] = {}
        self.weights_at_start: torch.Tensor | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_start = {k: v.clone() for k, v in self.thresholding.masks.items()}
        self.weights_at_start = pl_module.model.conv1.weight.detach().clone()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.live.append({k: int(v.sum()) for k, v in self.thresholding.masks.items()})
        self.rounds.append(self.thresholding.rounds)


def test_fraction_criterion_kills_the_lowest_live_filters_per_round(tmp_path: Path) -> None:
    model = Tiny()
    set_norms(model.model.conv2, [1.0, 0.2, 3.0, 0.4, 0.5, 0.1])
    cb = FilterThresholding(criterion="l2", fraction=0.5, layers=["conv2"])
    probe = Probe(cb)
    make_trainer(tmp_path, [cb, probe], max_epochs=3).fit(model)
    # 6 live -> floor(3.0) killed: 0.1, 0.2, 0.4; then floor(1.5) = 1: 0.5; then floor(1.0) = 1: 1.0
    assert [p["conv2"] for p in probe.live] == [3, 2, 1]
    assert cb.masks["conv2"].tolist() == [False, False, True, False, False, False]


def test_capped_l1_criterion_differs_from_l1(tmp_path: Path) -> None:
    # filter 0: one large weight (L1 1.3); filter 1: 36 weights of 1.2/36 (L1 1.2). L1 kills
    # filter 1; the capped term (cap 0.05: 0.05 vs 1.2) makes filter 0 the least significant.
    model = Tiny()
    with torch.no_grad():
        weight = model.model.conv2.weight
        weight.fill_(1.0)
        weight[0].zero_()
        weight[0, 0, 0, 0] = 1.3
        weight[1] = 1.2 / weight[1].numel()
    cb_l1 = FilterThresholding(criterion="l1", fraction=0.2, layers=["conv2"])
    make_trainer(tmp_path, [cb_l1]).fit(model)
    assert cb_l1.masks["conv2"].tolist() == [True, False, True, True, True, True]

    model = Tiny()
    with torch.no_grad():
        model.model.conv2.weight.fill_(1.0)
        model.model.conv2.weight[0].zero_()
        model.model.conv2.weight[0, 0, 0, 0] = 1.3
        model.model.conv2.weight[1] = 1.2 / model.model.conv2.weight[1].numel()
    cb_kumar = FilterThresholding(
        criterion="l1_capped_l1", fraction=0.2, cap=0.05, layers=["conv2"]
    )
    make_trainer(tmp_path, [cb_kumar]).fit(model)
    assert cb_kumar.masks["conv2"].tolist() == [False, True, True, True, True, True]


def test_callable_criterion_and_schedule(tmp_path: Path) -> None:
    model = Tiny()

    def by_index(weight: torch.Tensor) -> torch.Tensor:
        return torch.arange(weight.shape[0], dtype=torch.float)

    cb = FilterThresholding(
        criterion=by_index, fraction=0.3, every_n_epochs=2, start_epoch=1, layers=["conv2"]
    )
    probe = Probe(cb)
    make_trainer(tmp_path, [cb, probe], max_epochs=5).fit(model)
    # rounds at the ends of epochs 1 and 3: 6 -> 5 (floor 1.8) -> 4 (floor 1.5)
    assert probe.rounds == [0, 1, 1, 2, 2]
    assert [p["conv2"] for p in probe.live] == [6, 5, 5, 4, 4]
    assert cb.masks["conv2"].tolist() == [False, False, True, True, True, True]


def test_killed_channel_emits_exactly_zero_through_batchnorm(tmp_path: Path) -> None:
    model = Tiny(lr=0.1)
    with torch.no_grad():  # a non-trivial BatchNorm scale and shift, and a conv bias
        model.model.bn1.weight.fill_(1.5)
        model.model.bn1.bias.fill_(0.7)
        model.model.conv1.bias.fill_(0.3)
    # kill the 2 weakest conv1 filters after epoch 0, then train one more epoch
    cb = FilterThresholding(criterion="l2", fraction=0.5, max_rounds=1, layers=["conv1"])
    make_trainer(tmp_path, [cb], max_epochs=2).fit(model)
    dead = (~cb.masks["conv1"]).nonzero().flatten().tolist()
    live = cb.masks["conv1"].nonzero().flatten().tolist()
    assert len(dead) == 2
    net = model.model
    for param in (net.conv1.weight, net.conv1.bias, net.bn1.weight, net.bn1.bias):
        assert torch.count_nonzero(param.detach()[dead]) == 0
    outputs: list[torch.Tensor] = []
    net.bn1.register_forward_hook(lambda m, i, o: outputs.append(o.detach()))
    x = torch.randn(5, 1, 8, 8)
    for train in (True, False):
        net.train(train)
        net(x)
        channel = outputs[-1][:, dead]
        assert torch.equal(channel, torch.zeros_like(channel)), f"train={train}"
        assert outputs[-1][:, live].abs().sum() > 0


@pytest.mark.parametrize(
    ("optimizer", "accumulate"),
    [("sgd", 1), ("adam", 1), ("adamw", 1), ("rmsprop", 1), ("sgd", 2), ("adam", 2)],
)
def test_dead_filters_stay_dead_and_optimizer_state_is_zeroed(
    tmp_path: Path, optimizer: str, accumulate: int
) -> None:
    model = Tiny(optimizer=optimizer, lr=0.05)
    # one round kills half of each layer at the end of epoch 1, after optimizer state has built up
    cb = FilterThresholding(criterion="l2", fraction=0.5, start_epoch=1, max_rounds=1)
    trainer = make_trainer(
        tmp_path, [cb], max_epochs=4, limit_train_batches=4, accumulate_grad_batches=accumulate
    )
    trainer.fit(model)
    assert cb.rounds == 1
    net = model.model
    groups = {
        "conv1": [net.conv1.weight, net.conv1.bias, net.bn1.weight, net.bn1.bias],
        "conv2": [net.conv2.weight, net.conv2.bias],
    }
    state = trainer.optimizers[0].state
    checked = 0
    for name, params in groups.items():
        dead = (~cb.masks[name]).nonzero().flatten()
        assert dead.numel() == cb.masks[name].numel() // 2
        for param in params:
            assert torch.count_nonzero(param.detach()[dead]) == 0, name
            # the live filters did train
            assert torch.count_nonzero(param.detach()[cb.masks[name]]) > 0
            for key, value in state[param].items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    assert torch.count_nonzero(value[dead]) == 0, (name, key)
                    assert torch.count_nonzero(value[cb.masks[name]]) > 0, (name, key)
                    checked += 1
    assert checked >= 6


def test_min_filters_keeps_the_strongest_with_a_warning(tmp_path: Path) -> None:
    model = Tiny()
    set_norms(model.model.conv1, [0.01, 5.0, 0.05, 2.0])
    cb = FilterThresholding(threshold=100.0, min_filters=2, layers=["conv1"])
    with pytest.warns(UserWarning, match=r"'conv1' with 0 live filters; it keeps 2, the strongest"):
        make_trainer(tmp_path, [cb]).fit(model)
    assert cb.masks["conv1"].tolist() == [False, True, False, True]


def test_min_filters_never_revives_a_filter_the_threshold_killed(tmp_path: Path) -> None:
    """Norms [0.02, 1.0, 0.9, 0.8], threshold 0.85 kills 0 and 3; the criterion (scores
    [9, 1, 2, 3], half of the 2 live) would kill 1, below `min_filters=2`: it stops. Filter 0,
    the criterion's strongest, stays dead (the old rule revived it).
    """
    model = Tiny()
    set_norms(model.model.conv1, [0.02, 1.0, 0.9, 0.8])
    cb = FilterThresholding(
        threshold=0.85,
        criterion=lambda w: torch.tensor([9.0, 1.0, 2.0, 3.0]),
        fraction=0.5,
        min_filters=2,
        layers=["conv1"],
    )
    with pytest.warns(UserWarning, match=r"'conv1' with 1 live filters; it keeps 2"):
        make_trainer(tmp_path, [cb]).fit(model)
    assert cb.masks["conv1"].tolist() == [False, True, True, False]


def test_min_filters_spares_the_threshold_candidates_of_largest_norm(tmp_path: Path) -> None:
    model = Tiny()
    set_norms(model.model.conv1, [0.3, 0.1, 0.2, 5.0])
    cb = FilterThresholding(threshold=1.0, min_filters=3, layers=["conv1"])
    with pytest.warns(UserWarning, match=r"with 1 live filters; it keeps 3"):
        make_trainer(tmp_path, [cb]).fit(model)
    assert cb.masks["conv1"].tolist() == [True, False, True, True]


@pytest.mark.parametrize(
    ("round_to", "expected"), [(1, [0, 0, 0, 1]), (2, [1, 0, 0, 1]), (3, [1, 0, 1, 1])]
)
def test_round_to_spares_the_strongest_candidates_up_to_a_multiple(
    tmp_path: Path, round_to: int, expected: list[int]
) -> None:
    """Norms [0.3, 0.1, 0.2, 5.0], threshold 1.0: three candidates, one survivor; rounding to a
    multiple of 2 spares the strongest candidate (0.3), to 3 the two strongest.
    """
    model = Tiny()
    set_norms(model.model.conv1, [0.3, 0.1, 0.2, 5.0])
    cb = FilterThresholding(threshold=1.0, round_to=round_to, layers=["conv1"])
    make_trainer(tmp_path, [cb]).fit(model)
    assert cb.masks["conv1"].int().tolist() == expected


def test_round_to_below_one_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"`FilterThresholding\(round_to=0\)`: expected `round_to` >= 1"
    ):
        FilterThresholding(threshold=1.0, round_to=0)


def test_state_dict_round_trip_is_plain_data(tmp_path: Path) -> None:
    model = Tiny()
    set_norms(model.model.conv1, [0.01, 5.0, 0.05, 2.0])
    cb = FilterThresholding(threshold=0.1)
    make_trainer(tmp_path, [cb]).fit(model)
    torch.save(cb.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["masks"]["conv1"] == [False, True, False, True]
    other = FilterThresholding(threshold=0.1)
    other.load_state_dict(state)
    assert other.rounds == 1
    assert set(other.masks) == set(cb.masks)
    for name, mask in cb.masks.items():
        assert torch.equal(other.masks[name], mask)
        assert other.masks[name].dtype == torch.bool


def test_resume_from_checkpoint_restores_and_reapplies_masks(tmp_path: Path) -> None:
    model = Tiny()
    set_norms(model.model.conv1, [0.01, 5.0, 0.05, 2.0])
    cb = FilterThresholding(threshold=0.1, max_rounds=1)
    trainer = make_trainer(tmp_path, [cb])
    trainer.fit(model)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    # corrupt the dead filter in the checkpoint: the resumed run must zero it again
    checkpoint = torch.load(ckpt, weights_only=False)
    assert torch.count_nonzero(checkpoint["state_dict"]["model.conv1.weight"][0]) == 0
    checkpoint["state_dict"]["model.conv1.weight"][0] = 1.0
    torch.save(checkpoint, ckpt)

    resumed = FilterThresholding(threshold=0.1, max_rounds=1)
    probe = Probe(resumed)
    make_trainer(tmp_path, [resumed, probe], max_epochs=2).fit(Tiny(), ckpt_path=ckpt)
    assert probe.at_start["conv1"].tolist() == [False, True, False, True]
    assert probe.weights_at_start is not None
    assert torch.count_nonzero(probe.weights_at_start[[0, 2]]) == 0
    assert resumed.rounds == 1  # max_rounds reached before the resume: no new round


def test_nan_weights_raise_naming_the_layer(tmp_path: Path) -> None:
    model = Tiny()
    with torch.no_grad():
        model.model.conv2.weight[3, 0, 0, 0] = float("nan")
    cb = FilterThresholding(threshold=0.1, layers=["conv2"])
    with pytest.raises(RuntimeError, match=r"layer 'conv2' has NaN or inf weights"):
        make_trainer(tmp_path, [cb]).fit(model)


def test_naming_the_output_layer_warns_and_skips_it(tmp_path: Path) -> None:
    cb = FilterThresholding(threshold=0.1, layers=["conv1", "fc"])
    with pytest.warns(UserWarning, match=r"skipping the output layer\(s\) \['fc'\]"):
        make_trainer(tmp_path, [cb]).fit(Tiny())
    assert set(cb.masks) == {"conv1"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"threshold": -0.1},
            r"`FilterThresholding\(threshold=-0.1\)`: expected `threshold` finite",
        ),
        ({"threshold": 1.5, "relative": True}, r"expected `threshold` <= 1 with `relative=True`"),
        (
            {"criterion": "l1", "fraction": 1.0},
            r"`fraction` finite and >= 0 and < 1, got 1.0",
        ),
        (
            {"criterion": "l1", "fraction": -0.1},
            r"`fraction` finite and >= 0 and < 1, got -0.1",
        ),
        ({"threshold": 0.1, "norm": "linf"}, r"expected `norm` in \['l2', 'l1', 'mean_abs'\]"),
        ({"criterion": "taylor", "fraction": 0.1}, r"expected `criterion` in \['l1', 'l2', 'l1_"),
        ({"criterion": "l1"}, r"expected `criterion` and `fraction` together"),
        ({"fraction": 0.1}, r"expected `criterion` and `fraction` together"),
        ({}, r"expected a `threshold` or a `criterion`"),
        ({"threshold": 0.1, "min_filters": 0}, r"expected `min_filters` >= 1, got 0"),
        ({"threshold": 0.1, "every_n_epochs": 0}, r"expected `every_n_epochs` >= 1, got 0"),
        ({"threshold": 0.1, "start_epoch": -1}, r"expected `start_epoch` >= 0, got -1"),
        (
            {"criterion": "l1_capped_l1", "fraction": 0.1, "cap": 0.0},
            r"`cap` finite and > 0",
        ),
        ({"threshold": 0.1, "max_rounds": 0}, r"expected `max_rounds` >= 1, got 0"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FilterThresholding(**kwargs)


def test_bad_argument_types() -> None:
    with pytest.raises(TypeError, match="expected `threshold` to be a float, got str"):
        FilterThresholding(threshold="0.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected a name in .*, got int"):
        FilterThresholding(criterion=3, fraction=0.1)  # type: ignore[arg-type]


def test_bad_layer_and_min_filters_fail_at_setup(tmp_path: Path) -> None:
    cb = FilterThresholding(threshold=0.1, layers=["conv9"])
    with pytest.raises(ValueError, match=r"no module named 'conv9'.*Available.*'conv1'"):
        make_trainer(tmp_path, [cb]).fit(Tiny())
    cb = FilterThresholding(threshold=0.1, min_filters=5)
    with pytest.raises(ValueError, match=r"`min_filters` <= .* got 'conv1' with 4"):
        make_trainer(tmp_path, [cb]).fit(Tiny())


def test_callable_criterion_with_wrong_shape_fails(tmp_path: Path) -> None:
    cb = FilterThresholding(criterion=lambda w: torch.ones(2), fraction=0.5)
    with pytest.raises(ValueError, match="expected the criterion to return 4 scores"):
        make_trainer(tmp_path, [cb]).fit(Tiny())


def test_threshold_zero_kills_exactly_zero_filters_only(tmp_path: Path) -> None:
    """threshold=0 makes the exact zeros of a proximal map permanent; a tiny live filter stays."""
    model = Tiny()  # lr 0: the weights set here are the ones thresholded
    set_norms(model.model.conv1, [0.0, 1e-12, 1.0, 2.0])
    with torch.no_grad():
        model.model.conv1.weight[0] = 0.0
    cb = FilterThresholding(threshold=0.0)
    make_trainer(tmp_path, [cb]).fit(model)
    assert cb.masks["conv1"].tolist() == [False, True, True, True]
    assert all(cb.masks["conv2"].tolist())


def test_a_last_round_with_kills_at_the_very_end_warns(tmp_path: Path) -> None:
    """Filters killed at the end of the last epoch are exported untrained: say so."""
    model = Tiny()
    set_norms(model.model.conv1, [0.01, 5.0, 0.05, 2.0])
    with pytest.warns(UserWarning, match=r"last round killed 2 filters at the end of the last"):
        make_trainer(tmp_path, [FilterThresholding(threshold=0.1)]).fit(model)


def test_no_warning_when_training_follows_the_last_round(tmp_path: Path) -> None:
    model = Tiny()
    set_norms(model.model.conv1, [0.01, 5.0, 0.05, 2.0])
    thresholding = FilterThresholding(threshold=0.1, max_rounds=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*last round killed.*")
        make_trainer(tmp_path, [thresholding], max_epochs=2).fit(model)
    assert thresholding.rounds == 1
