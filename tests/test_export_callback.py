"""PrunedExport in a real Trainer: a tiny conv net whose filters are killed by hand while it trains,
exported to every format; each file's outputs equal the trained network's.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparsity import PrunedCheckpointMixin, PrunedExport, load_pruned
from lightning_sparsity.pruning.widths import describe_widths

DEAD1 = [0, 2, 3]  # conv1 filters killed (of 6)
DEAD2 = [1, 5]  # conv2 filters killed (of 8)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


class LitTiny(PrunedCheckpointMixin):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = TinyNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class PlainLit(LightningModule):  # no mixin
    def __init__(self) -> None:
        super().__init__()
        self.model = TinyNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    training_step = LitTiny.training_step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class KillFilters(Callback):
    """Zero the chosen filters (weights, bias, BatchNorm scale and shift) after every step."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        net = pl_module.model
        with torch.no_grad():
            for conv, bn, dead in ((net.conv1, net.bn1, DEAD1), (net.conv2, net.bn2, DEAD2)):
                for t in (conv.weight, conv.bias, bn.weight, bn.bias):
                    t[dead] = 0


class Snapshot(Callback):
    """Records the module right before the callbacks after it run ``on_train_end``."""

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        self.modules = dict(pl_module.named_modules())
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.training = pl_module.training


def loader(n: int = 16, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 12, 12, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    options: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "max_epochs": 1,
        "limit_train_batches": 3,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "accelerator": "cpu",
    }
    options.update(kwargs)
    return Trainer(callbacks=callbacks, **options)


X = torch.rand(5, 1, 12, 12)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One training run exporting every format (shared: the exports take a few seconds)."""
    tmp_path = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    module = LitTiny()
    snap = Snapshot()
    export = PrunedExport(dirpath=tmp_path / "out", formats=("ckpt", "pt", "pt2", "onnx"))
    trainer(tmp_path, [KillFilters(), snap, export]).fit(module, loader())
    module.eval()
    with torch.no_grad():
        expected = module(X)
    return {
        "module": module,
        "snap": snap,
        "export": export,
        "dir": tmp_path / "out",
        "y": expected,
    }


def test_writes_every_format_and_nothing_else(exported: dict[str, Any]) -> None:
    export = exported["export"]
    names = {"ckpt": "pruned.ckpt", "pt": "pruned.pt", "pt2": "pruned.pt2", "onnx": "pruned.onnx"}
    assert export.paths == {fmt: exported["dir"] / name for fmt, name in names.items()}
    assert sorted(p.name for p in exported["dir"].iterdir()) == sorted(names.values())  # no temp
    for fmt in ("ckpt", "pt"):  # no pickled class: weights_only opens them
        assert torch.serialization.get_unsafe_globals_in_checkpoint(export.paths[fmt]) == []


def test_the_trained_module_is_unchanged(exported: dict[str, Any]) -> None:
    module, snap = exported["module"], exported["snap"]
    assert dict(module.named_modules()) == snap.modules  # same objects, full width
    assert module.model.conv1.out_channels == 6
    for key, value in snap.state.items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=0, atol=0)
    assert snap.training  # the callback did not leave it in eval mode either


def test_ckpt_loads_with_load_from_checkpoint_and_equals_the_trained_network(
    exported: dict[str, Any],
) -> None:
    path = exported["export"].paths["ckpt"]
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["hyper_parameters"] == {"lr": 0.05}
    assert "pytorch-lightning_version" in ckpt
    assert ckpt["global_step"] == 3
    loaded = LitTiny.load_from_checkpoint(path).eval()
    net = loaded.model
    assert (net.conv1.out_channels, net.bn1.num_features, net.conv2.in_channels) == (3, 3, 3)
    assert (net.conv2.out_channels, net.bn2.num_features, net.fc.in_features) == (6, 6, 6 * 16)
    # exactly the killed filters' parameters are gone
    removed = 3 * (9 + 1 + 2) + 3 * 8 * 9 + 2 * (3 * 9 + 1 + 2) + 2 * 16 * 4
    assert n_params(exported["module"]) - n_params(loaded) == removed
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), exported["y"], rtol=1e-4, atol=1e-5)


def test_pt_pt2_and_onnx_equal_the_trained_network(exported: dict[str, Any]) -> None:
    paths, y = exported["export"].paths, exported["y"]
    net = load_pruned(paths["pt"], TinyNet()).eval()
    with torch.no_grad():
        torch.testing.assert_close(net(X), y, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            torch.export.load(paths["pt2"]).module()(X), y, rtol=1e-4, atol=1e-5
        )
    session = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": X.numpy()})  # batch 5: the exported batch was 2
    np.testing.assert_allclose(out, y.numpy(), rtol=1e-4, atol=1e-5)


def test_report_is_exposed(exported: dict[str, Any]) -> None:
    report = exported["export"].report
    assert report is not None
    assert "conv1" in str(report)
    assert isinstance(report.to_dict(), dict)


def test_loaded_checkpoint_fine_tunes_and_its_checkpoints_resume(
    exported: dict[str, Any], tmp_path: Path
) -> None:
    loaded = LitTiny.load_from_checkpoint(exported["export"].paths["ckpt"])
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ft", save_last=True)
    trainer(tmp_path, [ckpt_cb], enable_checkpointing=True).fit(loaded, loader())
    assert loaded.model.conv1.out_channels == 3
    assert loaded.global_step == 3
    last = tmp_path / "ft" / "last.ckpt"
    saved = torch.load(last, weights_only=False)["pruned_widths"]
    assert saved["modules"] == describe_widths(loaded)["modules"]
    # the exported input shapes carry over, so the fine-tuning checkpoint is checked on load too
    assert (
        saved["inputs"] == torch.load(exported["export"].paths["ckpt"])["pruned_widths"]["inputs"]
    )
    # resuming the interrupted fine-tuning into a freshly built, full-width module
    fresh = LitTiny()
    t = trainer(tmp_path, [], max_epochs=2)
    t.fit(fresh, loader(), ckpt_path=last)
    assert fresh.model.conv1.out_channels == 3
    assert t.global_step == 6


def test_logs_the_report_to_the_logger(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    export = PrunedExport(formats=("pt",))
    trainer(tmp_path, [KillFilters(), export], logger=logger).fit(LitTiny(), loader())
    assert export.paths["pt"] == tmp_path / "tb" / "version_0" / "pruned" / "pruned.pt"
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"tensors": 0})
    events.Reload()
    report = export.report
    expected = {
        "export/params": report.params_after,
        "export/params_before": report.params_before,
        "export/macs": report.macs_after,
        "export/macs_removed": report.macs_removed,
    }
    for tag, value in expected.items():
        (event,) = events.Scalars(tag)
        assert event.value == pytest.approx(value, rel=1e-6)
        assert event.step == 3
    assert report.params_after < report.params_before
    assert "export/report/text_summary" in events.Tags()["tensors"]


def test_example_inputs_given_or_from_example_input_array(tmp_path: Path) -> None:
    export = PrunedExport(
        dirpath=tmp_path, formats=("pt",), example_inputs=torch.rand(3, 1, 12, 12)
    )
    trainer(tmp_path, [KillFilters(), export]).fit(LitTiny(), loader())
    assert export.paths["pt"].is_file()
    module = LitTiny()
    module.example_input_array = torch.rand(2, 1, 12, 12)
    export = PrunedExport(dirpath=tmp_path / "b", formats=("pt",))
    trainer(tmp_path, [KillFilters(), export]).fit(module, loader())
    assert export.paths["pt"].is_file()


def test_no_example_inputs_is_a_clear_error(tmp_path: Path) -> None:
    class DictBatches(LitTiny):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self(batch["x"]), batch["y"])

    data = [{"x": torch.rand(4, 1, 12, 12), "y": torch.randint(0, 4, (4,))}] * 3
    with pytest.raises(RuntimeError, match=r"no example inputs.*example_inputs=torch.randn"):
        trainer(tmp_path, [PrunedExport(dirpath=tmp_path, formats=("pt",))]).fit(
            DictBatches(), DataLoader(data, batch_size=None)
        )
    assert list(tmp_path.glob("*.pt")) == []


def test_pruning_the_whole_lightning_module(tmp_path: Path) -> None:
    export = PrunedExport(dirpath=tmp_path, formats=("ckpt", "pt"), submodule="")
    module = LitTiny()
    trainer(tmp_path, [KillFilters(), export]).fit(module, loader())
    loaded = LitTiny.load_from_checkpoint(export.paths["ckpt"]).eval()
    assert loaded.model.conv2.out_channels == 6
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), module.eval()(X), rtol=1e-4, atol=1e-5)
    ckpt, pt = (torch.load(export.paths[f], weights_only=True) for f in ("ckpt", "pt"))
    assert ckpt["pruned_widths"] == pt["pruned_widths"]  # both describe the whole module


def test_module_without_mixin_warns_and_its_ckpt_loads_with_load_pruned(tmp_path: Path) -> None:
    export = PrunedExport(dirpath=tmp_path, formats=("ckpt",))
    module = PlainLit()
    with pytest.warns(UserWarning, match=r"PlainLit.*does not mix in `PrunedCheckpointMixin`"):
        trainer(tmp_path, [KillFilters(), export]).fit(module, loader())
    loaded = load_pruned(export.paths["ckpt"], PlainLit()).eval()
    assert loaded.model.conv1.out_channels == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), module.eval()(X), rtol=1e-4, atol=1e-5)


def test_nothing_to_prune_raises_or_exports_unchanged(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"allow_unchanged=True"):
        trainer(tmp_path, [PrunedExport(dirpath=tmp_path / "a", formats=("pt",))]).fit(
            LitTiny(), loader()
        )
    assert not (tmp_path / "a").exists()
    export = PrunedExport(dirpath=tmp_path / "b", formats=("pt",), allow_unchanged=True)
    with pytest.warns(UserWarning, match=r"expected at least one dead channel"):
        trainer(tmp_path, [export]).fit(LitTiny(), loader())
    assert load_pruned(export.paths["pt"], TinyNet()).conv1.out_channels == 6


class CountBatches(Callback):
    batches = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.batches += 1


def test_missing_onnx_fails_at_setup_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    counter = CountBatches()
    with pytest.raises(ModuleNotFoundError, match=r"formats=\('onnx',\).*\['onnxscript'\]"):
        trainer(tmp_path, [counter, PrunedExport(formats=("onnx",))]).fit(LitTiny(), loader())
    assert counter.batches == 0


def test_default_formats_need_no_onnx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain install has no ONNX packages: `PrunedExport()` still exports (.ckpt and .pt2)."""
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    monkeypatch.setitem(sys.modules, "onnx", None)
    export = PrunedExport(dirpath=tmp_path / "out")
    assert export.formats == ("ckpt", "pt2")
    trainer(tmp_path, [KillFilters(), export]).fit(LitTiny(), loader())
    assert sorted(export.paths) == ["ckpt", "pt2"]
    assert all(p.is_file() for p in export.paths.values())


def test_pruned_export_as_ckpt_path_says_how_to_fine_tune(
    exported: dict[str, Any], tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match=r"pruned export.*load_from_checkpoint\(path\)"):
        trainer(tmp_path, []).fit(LitTiny(), loader(), ckpt_path=exported["export"].paths["ckpt"])


def test_unknown_submodule_fails_at_setup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"submodule='net'.*children: \['model'\]"):
        trainer(tmp_path, [PrunedExport(submodule="net")]).fit(LitTiny(), loader())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"formats": ("tflite",)}, ValueError, r"formats among \['ckpt', 'pt', 'pt2', 'onnx'\]"),
        ({"formats": ()}, ValueError, r"expected at least one of"),
        ({"formats": "onnx"}, TypeError, r"HINT: `formats=\('onnx',\)`"),
        ({"formats": ("pt", "pt")}, ValueError, r"each format once"),
        ({"filename": "a/b"}, ValueError, r"without directories.*dirpath"),
        ({"filename": ""}, ValueError, r"non-empty file name"),
        ({"atol": -1.0}, ValueError, r"`atol` finite and >= 0, got -1.0"),
        ({"rtol": "0"}, TypeError, r"rtol='0'.*float"),
        ({"verify": 1}, TypeError, r"verify=1.*bool"),
        ({"allow_unchanged": "yes"}, TypeError, r"allow_unchanged='yes'.*bool"),
        ({"example_inputs": [1, 2]}, TypeError, r"argument 0 is a int"),
        ({"submodule": 3}, TypeError, r"submodule=3.*str or None"),
        ({"dirpath": 3}, TypeError, r"dirpath=3.*path or None"),
    ],
)
def test_misconfiguration(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        PrunedExport(**kwargs)


def test_main_job_prints_kept_widths_parameters_and_macs(tmp_path: Path) -> None:
    import importlib.util

    from lightning_sparsity import ClassificationModule

    spec = importlib.util.spec_from_file_location(
        "lenet5_main_job", Path(__file__).resolve().parents[1] / "examples" / "lenet5_mnist.py"
    )
    assert spec is not None
    assert spec.loader is not None
    main_job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main_job)

    class KillLeNet(Callback):
        def on_train_batch_end(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
            conv = pl_module.model.features[3]
            with torch.no_grad():
                conv.weight[10:] = 0
                conv.bias[10:] = 0

    export = PrunedExport(dirpath=tmp_path, formats=("pt",))
    data = DataLoader(
        TensorDataset(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))), batch_size=4
    )
    t = trainer(tmp_path, [KillLeNet(), export], limit_train_batches=2)
    t.fit(ClassificationModule("lenet5"), data)
    lines = main_job.export_summary(t)
    text = "\n".join(lines)
    assert "kept widths: features.0 20->20, features.3 50->10, classifier.1 500->500" in text
    assert f"parameters: 431,080 -> {export.report.params_after:,}" in text
    assert export.report.params_after == 431_080 - 40 * (20 * 25 + 1) - 40 * 16 * 500
    assert "MACs per example: 2,293,000 -> " in text
    assert f"pt: {export.paths['pt']}" in text
