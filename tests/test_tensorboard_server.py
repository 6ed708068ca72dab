"""The real ``tensorboard`` server on a loopback port serves the curves the monitor logged."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparsity import FilterThresholding, SparsityMonitor


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(),
            nn.Linear(6 * 4 * 4, 3),
        )  # fmt: skip
        generator = torch.Generator().manual_seed(1)
        self.data = TensorDataset(
            torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 3, (16,))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)


class Counts(pl.Callback):
    def __init__(self, thresholding: FilterThresholding) -> None:
        self.thresholding = thresholding
        self.history: list[tuple[int, int]] = []  # (logged step, live filters of layer "2")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.history.append((trainer.global_step - 1, int(self.thresholding.masks["2"].sum())))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read().decode())


def wait_for(url: str, ready: Any, process: subprocess.Popen[bytes], timeout: float = 90) -> Any:
    """Poll ``url`` until ``ready(json)`` holds (TensorBoard loads event files in a thread)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"tensorboard exited with {process.returncode}")
        try:
            last = get_json(url)
            if ready(last):
                return last
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not ready after {timeout} s; last answer {last!r}")


def test_tensorboard_server_serves_the_filter_curves(tmp_path: Path) -> None:
    thresholding = FilterThresholding(criterion="l2", fraction=0.3)
    counts = Counts(thresholding)
    logger = TensorBoardLogger(tmp_path / "logs", name="tb", version=0)
    pl.Trainer(
        max_epochs=3,
        callbacks=[thresholding, SparsityMonitor(), counts],
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
    ).fit(Tiny())
    assert [live for _, live in counts.history] == [5, 4, 3]

    port = free_port()
    log = (tmp_path / "tensorboard.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "logs"),
            "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        run = "tb/version_0"
        query = urllib.parse.urlencode({"run": run, "tag": "sparsity/2/filters"})
        points = wait_for(
            f"{base}/data/plugin/scalars/scalars?{query}",
            lambda answer: isinstance(answer, list) and len(answer) == 4,
            process,
        )
        # [[wall_time, step, value], ...]: the point before training (6 filters), then each epoch
        assert [(step, value) for _, step, value in points] == [(0, 6.0), *counts.history]

        tags = set(get_json(f"{base}/data/plugin/scalars/tags")[run])
        assert {"sparsity/0/filters", "sparsity/filters", "sparsity/params"} <= tags
        layout = get_json(f"{base}/data/plugin/custom_scalars/layout")
        charts = {c["title"]: c["multiline"]["tag"] for c in layout["category"][0]["chart"]}
        assert charts["live filters per layer"] == ["sparsity/0/filters", "sparsity/2/filters"]
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
        log.close()
    assert process.poll() is not None
