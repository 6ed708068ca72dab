"""SparsityMonitor in a real Trainer, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _shared import Net
from _shared import make_trainer as shared_trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparsity import FilterThresholding, LeNet5Caffe, SparsityMonitor

LAYERS = ("conv1", "conv2")


class Tiny(pl.LightningModule):
    def __init__(
        self, network: nn.Module | None = None, shape: tuple[int, ...] = (1, 8, 8)
    ) -> None:
        super().__init__()
        self.model = network if network is not None else Net()
        generator = torch.Generator().manual_seed(1)
        self.data = TensorDataset(
            torch.randn(32, *shape, generator=generator), torch.randint(0, 3, (32,))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)


class MaskProbe(pl.Callback):
    """After the thresholding and monitor callbacks: the masks and global step at each epoch end."""

    def __init__(self, thresholding: FilterThresholding) -> None:
        self.thresholding = thresholding
        self.history: list[tuple[int, dict[str, torch.Tensor]]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        masks = {k: v.clone() for k, v in self.thresholding.masks.items()}
        self.history.append((trainer.global_step, masks))


def make_trainer(tmp_path: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """The shared Trainer, three epochs, the default logger, logging every step."""
    options: dict[str, Any] = {"max_epochs": 3, "logger": True, "log_every_n_steps": 1}
    return shared_trainer(tmp_path, callbacks, **{**options, **kwargs})


def expected_size(c1: int, c2: int) -> tuple[int, int]:
    """Params and MACs (one 1x8x8 sample) of Net pruned to widths c1, c2, by hand."""
    params = c1 * (9 + 1) + 2 * c1 + c2 * (c1 * 9 + 1) + 3 * (c2 * 16 + 1)
    macs = c1 * 9 * 36 + c2 * c1 * 9 * 16 + 3 * c2 * 16
    return params, macs


def read_events(log_dir: str) -> EventAccumulator:
    accumulator = EventAccumulator(
        log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}
    )
    accumulator.Reload()
    return accumulator


def scalar_series(accumulator: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def run_with_tensorboard(tmp_path: Path, **monitor_kwargs: Any) -> tuple[str, MaskProbe]:
    thresholding = FilterThresholding(criterion="l2", fraction=0.3)
    probe = MaskProbe(thresholding)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    callbacks = [thresholding, SparsityMonitor(**monitor_kwargs), probe]
    make_trainer(tmp_path, callbacks, logger=logger).fit(Tiny())
    return logger.log_dir, probe


def test_tensorboard_scalars_match_the_masks(tmp_path: Path) -> None:
    log_dir, probe = run_with_tensorboard(tmp_path)
    events = read_events(log_dir)
    sparsity_tags = {tag for tag in events.Tags()["scalars"] if tag.startswith("sparsity/")}
    assert sparsity_tags == {
        "sparsity/conv1/filters",
        "sparsity/conv1/density",
        "sparsity/conv2/filters",
        "sparsity/conv2/density",
        "sparsity/filters",
        "sparsity/params",
        "sparsity/macs",
    }
    # 3 rounds of floor(0.3 * live): conv1 4 -> 3 -> 3 -> 3, conv2 6 -> 5 -> 4 -> 3
    counts = [{k: int(m.sum()) for k, m in masks.items()} for _, masks in probe.history]
    assert counts == [
        {"conv1": 3, "conv2": 5},
        {"conv1": 3, "conv2": 4},
        {"conv1": 3, "conv2": 3},
    ]
    # epoch-end points sit at Lightning's step index for epoch metrics: global_step - 1
    assert [step for step, _ in probe.history] == [2, 4, 6]
    # and a first point before training, at step 0, with every filter live
    assert sorted(scalar_series(events, "sparsity/filters")) == [0, 1, 3, 5]
    assert scalar_series(events, "sparsity/filters")[0] == 4 + 6
    for global_step, masks in probe.history:
        step = global_step - 1
        for name, mask in masks.items():
            filters = scalar_series(events, f"sparsity/{name}/filters")
            density = scalar_series(events, f"sparsity/{name}/density")
            assert filters[step] == int(mask.sum())
            # dead filters are exactly zero, live ones have no zero weight
            assert density[step] == pytest.approx(float(mask.sum()) / mask.numel())
        c1, c2 = int(masks["conv1"].sum()), int(masks["conv2"].sum())
        assert scalar_series(events, "sparsity/filters")[step] == c1 + c2
        params, macs = expected_size(c1, c2)
        assert scalar_series(events, "sparsity/params")[step] == params
        assert scalar_series(events, "sparsity/macs")[step] == macs


def test_custom_scalars_layout_and_histograms_are_in_the_file(tmp_path: Path) -> None:
    log_dir, probe = run_with_tensorboard(tmp_path)
    events = read_events(log_dir)
    assert "custom_scalars__config__" in events.Tags()["tensors"]
    (event,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())
    charts = {chart.title: list(chart.multiline.tag) for chart in layout.category[0].chart}
    assert layout.category[0].title == "sparsity"
    assert charts["live filters per layer"] == ["sparsity/conv1/filters", "sparsity/conv2/filters"]
    assert charts["weight density per layer"] == [
        "sparsity/conv1/density",
        "sparsity/conv2/density",
    ]
    assert charts["pruned params"] == ["sparsity/params"]
    assert charts["pruned MACs"] == ["sparsity/macs"]
    for name in LAYERS:
        histograms = events.Histograms(f"sparsity/{name}/filter_norms")
        assert [h.step for h in histograms] == [step - 1 for step, _ in probe.history]
        last_mask = probe.history[-1][1][name]
        assert histograms[-1].histogram_value.num == last_mask.numel()
        assert histograms[-1].histogram_value.min == 0.0  # the dead filters


def test_no_histograms_when_disabled(tmp_path: Path) -> None:
    log_dir, _ = run_with_tensorboard(tmp_path, histograms=False)
    assert read_events(log_dir).Tags()["histograms"] == []


def test_log_every_n_steps_adds_step_points(tmp_path: Path) -> None:
    thresholding = FilterThresholding(criterion="l2", fraction=0.3)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    callbacks = [thresholding, SparsityMonitor(log_every_n_steps=3, histograms=False)]
    make_trainer(tmp_path, callbacks, logger=logger, limit_train_batches=4).fit(Tiny())
    filters = scalar_series(read_events(logger.log_dir), "sparsity/conv2/filters")
    # the start (step 0), optimizer steps 3, 6, 9 from the step logging, the ends of epochs
    # (steps 4, 8, 12) from the epoch logging; all at Lightning's index, step - 1
    assert sorted(filters) == [0, 2, 3, 5, 7, 8, 11]
    # conv2: 6 live during epoch 0, 5 after its end (step 4), 4 after step 8, 3 after step 12
    assert [filters[s] for s in sorted(filters)] == [6, 6, 5, 5, 4, 4, 3]


def test_csv_logger_gets_the_scalars(tmp_path: Path) -> None:
    thresholding = FilterThresholding(criterion="l2", fraction=0.3)
    probe = MaskProbe(thresholding)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    make_trainer(tmp_path, [thresholding, SparsityMonitor(), probe], logger=logger).fit(Tiny())
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("sparsity/filters")]
    start, rows = rows[0], rows[1:]  # the point before training: every filter live
    assert (int(start["step"]), float(start["sparsity/filters"])) == (0, 4 + 6)
    assert [int(row["step"]) for row in rows] == [step - 1 for step, _ in probe.history]
    for row, (_, masks) in zip(rows, probe.history, strict=True):
        assert float(row["sparsity/conv2/filters"]) == int(masks["conv2"].sum())
        assert float(row["sparsity/filters"]) == sum(int(m.sum()) for m in masks.values())
        assert (
            float(row["sparsity/params"])
            == expected_size(int(masks["conv1"].sum()), int(masks["conv2"].sum()))[0]
        )


def test_lenet_reference_counts(tmp_path: Path) -> None:
    """REFERENCES.md: dense LeNet-5-Caffe has 431,080 params and 2.293M MACs; with conv1 cut to 5
    filters, 26*5 + (25*5+1)*50 + 801*500 + 10*500 + 10 params and 14400*5 + 1600*5*50 + 800*500 +
    10*500 MACs.
    """
    network = LeNet5Caffe()
    with torch.no_grad():
        network.features[0].weight[5:] = 0.0
        network.features[0].bias[5:] = 0.0
    module = Tiny(network, shape=(1, 28, 28))
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.0)  # type: ignore[method-assign]
    monitor = SparsityMonitor(example_inputs=torch.zeros(1, 1, 28, 28), histograms=False)
    trainer = make_trainer(
        tmp_path, [monitor], max_epochs=1, limit_train_batches=1, logger=CSVLogger(tmp_path)
    )
    trainer.fit(module)
    metrics = trainer.callback_metrics
    assert metrics["sparsity/features.0/filters"] == 5
    assert metrics["sparsity/features.3/filters"] == 50
    assert metrics["sparsity/classifier.1/filters"] == 500
    assert "sparsity/classifier.3/filters" not in metrics  # the output layer
    assert metrics["sparsity/params"] == 26 * 5 + (25 * 5 + 1) * 50 + 801 * 500 + 10 * 500 + 10
    assert metrics["sparsity/macs"] == 14400 * 5 + 1600 * 5 * 50 + 800 * 500 + 10 * 500

    dense = SparsityMonitor(example_inputs=torch.zeros(1, 1, 28, 28), histograms=False)
    trainer = make_trainer(
        tmp_path, [dense], max_epochs=1, limit_train_batches=1, logger=CSVLogger(tmp_path)
    )
    trainer.fit(Tiny(LeNet5Caffe(), shape=(1, 28, 28)))
    assert trainer.callback_metrics["sparsity/params"] == 431_080
    assert trainer.callback_metrics["sparsity/macs"] == 2_293_000


def test_tolerance_counts_small_filters_as_dead(tmp_path: Path) -> None:
    network = Net()
    with torch.no_grad():
        network.conv2.weight[:2] = 1e-4  # norm 1e-4 * 6 = 6e-4
    module = Tiny(network)
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.0)  # type: ignore[method-assign]
    strict = SparsityMonitor(histograms=False)
    loose = SparsityMonitor(tolerance=1e-3, histograms=False)
    trainer = make_trainer(tmp_path, [strict], max_epochs=1, logger=CSVLogger(tmp_path))
    trainer.fit(module)
    assert trainer.callback_metrics["sparsity/conv2/filters"] == 6
    trainer = make_trainer(tmp_path, [loose], max_epochs=1, logger=CSVLogger(tmp_path))
    trainer.fit(module)
    assert trainer.callback_metrics["sparsity/conv2/filters"] == 4
    assert trainer.callback_metrics["sparsity/params"] == expected_size(4, 4)[0]


def test_without_a_logger_setup_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"the Trainer has no logger \(`logger=False`\)"):
        make_trainer(tmp_path, [SparsityMonitor()], logger=False).fit(Tiny())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tolerance": -1e-3}, ValueError, r"expected `tolerance` finite and >= 0, got -0.001"),
        ({"log_every_n_steps": -1}, ValueError, r"expected `log_every_n_steps` >= 0, got -1"),
        ({"norm": "linf"}, ValueError, r"expected `norm` in \['l2', 'l1', 'mean_abs'\]"),
        ({"example_inputs": [1, 2]}, TypeError, r"expected a tensor or a tuple of tensors"),
        ({"tolerance": "0"}, TypeError, r"expected `tolerance` to be a float"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        SparsityMonitor(**kwargs)


def test_unknown_layer_fails_at_setup(tmp_path: Path) -> None:
    monitor = SparsityMonitor(layers=["conv7"])
    with pytest.raises(ValueError, match=r"no module named 'conv7'.*Available.*'conv1'"):
        make_trainer(tmp_path, [monitor], logger=CSVLogger(tmp_path)).fit(Tiny())
