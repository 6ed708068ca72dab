"""Hostile and broken files against the two loaders: ``load_pruned`` and
``MyModule.load_from_checkpoint`` (``PrunedCheckpointMixin``).

Every case is one parametrized test id, so ``pytest --collect-only -q`` counts the bad files tried.

* Code-carrying pickles (``__reduce__`` -> ``os.system``, ``exec``, ``eval``, ``subprocess``,
  ``Path.touch``, hand-written protocol-0 opcodes, legacy and zip ``torch.save`` formats; the
  payload at the top level or hidden in the widths, the weights or the metadata): refused with a
  clear error, and the marker file the payload would create is absent. A control proves each
  payload is live when unpickled unsafely. The loaders pass ``weights_only=True`` explicitly, so
  the refusal also holds with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in the environment.
* Truncated files (cut at several offsets), garbage, empty files, directories: clear errors naming
  the path.
* Widths that do not fit (too wide, zero, negative, missing, wrong type, wrong class, unknown
  module, groups not dividing), tensors that do not fit, a checkpoint of another model: clear
  errors, and the model passed in keeps its module objects and every tensor bit for bit.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _shared import GroupedNet as Net
from torch import nn

from lightning_sparsity import PrunedCheckpointMixin, build_model, load_pruned, save_pruned
from lightning_sparsity.checkpoint import save_pruned_checkpoint


class LitNet(PrunedCheckpointMixin):
    def __init__(self, c1: int = 8, c2: int = 12, hidden: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = Net(c1, c2, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class OtherLit(PrunedCheckpointMixin):
    """Another model: same hyper-parameter names, different layers."""

    def __init__(self, c1: int = 8, c2: int = 12, hidden: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(
            nn.Conv2d(3, c1, 3), nn.ReLU(), nn.Flatten(), nn.Linear(c1 * 36, 5)
        )


def pruned_net() -> Net:
    """A 'pruned' Net: the same architecture built narrower, random weights and statistics."""
    net = Net(c1=6, c2=8, hidden=10)
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
    return net.eval()


def snapshot(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    return dict(model.named_modules()), {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """Nothing half-built: the very same module objects (so the same types) and every tensor."""
    modules, state = before
    now_modules = dict(model.named_modules())
    assert now_modules.keys() == modules.keys()
    for name, module in modules.items():
        assert now_modules[name] is module, name
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(now[key], value, rtol=0, atol=0, equal_nan=True)


@pytest.fixture(autouse=True)
def _no_code_execution_marker(tmp_path: Path) -> Any:
    """Every test here: whatever happened, no payload ran."""
    yield
    assert not list(tmp_path.glob("MARKER*")), "a pickled payload ran"


# ================================================================== code-carrying pickles
class Payload:
    """Unpickling this object calls ``func(*args)``."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


def _payloads(marker: Path) -> dict[str, Any]:
    m = str(marker)
    return {
        "os.system": Payload(os.system, f"touch '{m}'"),
        "exec": Payload(exec, f"open({m!r}, 'w').close()"),
        "eval": Payload(eval, f"open({m!r}, 'w').close()"),
        "subprocess": Payload(subprocess.call, ["touch", m]),
        "Path.touch": Payload(Path.touch, marker),
    }


def _protocol0_system(marker: Path) -> bytes:
    """A hand-written pickle (opcodes, no Python class needed): ``posix.system('touch marker')``."""
    return b"cposix\nsystem\n(V" + f"touch '{marker}'".encode() + b"\ntR."


def _good_pruned_file(path: Path) -> dict[str, Any]:
    save_pruned(pruned_net(), path)
    return torch.load(path, weights_only=True)


def _good_ckpt(path: Path, net: Net | None = None) -> dict[str, Any]:
    module = LitNet(6, 8, 10)
    module.model = net if net is not None else pruned_net()
    save_pruned_checkpoint(module, path)
    return torch.load(path, weights_only=True)


PLACES = ("top", "widths", "state_dict", "metadata")
FUNCS = ("os.system", "exec", "eval", "subprocess", "Path.touch")


def _write_evil(tmp_path: Path, kind: str, func: str, place: str, legacy: bool) -> Path:
    marker = tmp_path / f"MARKER_{func}"
    payload = _payloads(marker)[func]
    path = tmp_path / f"evil_{kind}.bin"
    if kind == "pt":
        base, meta_key, prefix = _good_pruned_file(tmp_path / "good.pt"), "metadata", ""
    else:
        base, meta_key, prefix = _good_ckpt(tmp_path / "g.ckpt"), "pruned_metadata", "model."
    if place == "top":
        obj: Any = payload
    elif place == "widths":
        obj = base
        obj["pruned_widths"]["modules"][f"{prefix}conv1"]["out_channels"] = payload
    elif place == "state_dict":
        obj = base
        obj["state_dict"][next(iter(obj["state_dict"]))] = payload
    else:
        obj = base
        obj[meta_key] = {"note": payload}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def _live(path: Path, tmp_path: Path) -> bool:
    """Control: the file's payload really runs when unpickled unsafely."""
    before = set(tmp_path.glob("MARKER*"))
    with open(path, "rb") as f:
        head = f.read(2)
    try:
        if head == b"cp":  # raw protocol-0 pickle
            pickle.loads(path.read_bytes())
        else:
            torch.load(path, weights_only=False)
    except Exception:
        pass  # the payload ran during unpickling; the object it returned need not fit
    created = set(tmp_path.glob("MARKER*")) - before
    for marker in created:
        marker.unlink()
    return bool(created)


EVIL_CASES = [
    (kind, func, place, legacy)
    for kind in ("pt", "ckpt")
    for func in FUNCS
    for place in PLACES
    for legacy in (False, True)
    if place == "top" or func == "os.system" or legacy is False
]


@pytest.mark.parametrize("force_unsafe_env", [False, True], ids=["env-default", "env-force-unsafe"])
@pytest.mark.parametrize(("kind", "func", "place", "legacy"), EVIL_CASES)
def test_code_carrying_pickle_is_refused_and_never_runs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    func: str,
    place: str,
    legacy: bool,
    force_unsafe_env: bool,
) -> None:
    path = _write_evil(tmp_path, kind, func, place, legacy)
    assert _live(path, tmp_path), "control: the payload must run when loaded unsafely"
    if force_unsafe_env:  # torch then defaults to weights_only=False unless the caller says True
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    fresh = Net()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"evil_.*weights_only=True.*not executed"):
        load_pruned(path, fresh)
    assert_untouched(fresh, before)
    with pytest.raises(ValueError, match=r"evil_.*weights_only=True.*not executed"):
        LitNet.load_from_checkpoint(path)
    assert not list(tmp_path.glob("MARKER*"))


@pytest.mark.parametrize("force_unsafe_env", [False, True], ids=["env-default", "env-force-unsafe"])
def test_hand_written_opcode_pickle_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force_unsafe_env: bool
) -> None:
    path = tmp_path / "evil_raw.pkl"
    path.write_bytes(_protocol0_system(tmp_path / "MARKER_raw"))
    assert _live(path, tmp_path)
    if force_unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    fresh = Net()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"evil_raw\.pkl.*weights_only=True"):
        load_pruned(path, fresh)
    assert_untouched(fresh, before)
    with pytest.raises(ValueError, match=r"evil_raw\.pkl.*weights_only=True"):
        LitNet.load_from_checkpoint(path)


def test_resume_with_ckpt_path_refuses_a_payload(tmp_path: Path) -> None:
    """``Trainer.fit(ckpt_path=...)`` is Lightning's loader: with torch's default
    (``weights_only=True`` since torch 2.6) it refuses the payload too.
    """
    import lightning.pytorch as pl

    path = _write_evil(tmp_path, "ckpt", "os.system", "top", legacy=False)

    class Boring(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 2)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layer(batch).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    loader = torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=2)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer.fit(Boring(), loader, ckpt_path=path, weights_only=True)


# ================================================================== truncated and garbage files
CUTS = ("0", "1", "8", "64", "25%", "50%", "75%", "-22", "-1")


def _cut(data: bytes, cut: str) -> bytes:
    if cut.endswith("%"):
        return data[: len(data) * int(cut[:-1]) // 100]
    n = int(cut)
    return data[:n]


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("kind", ["pt", "ckpt", "pt-legacy"])
def test_truncated_files_are_refused_clearly(tmp_path: Path, kind: str, cut: str) -> None:
    good = tmp_path / "good.bin"
    if kind == "ckpt":
        _good_ckpt(good)
    else:
        obj = _good_pruned_file(good)
        if kind == "pt-legacy":
            torch.save(obj, good, _use_new_zipfile_serialization=False)
    data = good.read_bytes()
    path = tmp_path / "truncated.bin"
    path.write_bytes(_cut(data, cut))
    assert path.stat().st_size < len(data)
    fresh = Net()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"truncated\.bin.*expected a pruned model"):
        load_pruned(path, fresh)
    assert_untouched(fresh, before)
    with pytest.raises(ValueError, match=r"truncated\.bin.*weights_only=True"):
        LitNet.load_from_checkpoint(path)


GARBAGE: dict[str, Callable[[Path], Path]] = {
    "random-bytes": lambda p: _write(p / "x.pt", os.urandom(2048)),
    "zip-magic-then-noise": lambda p: _write(p / "x.pt", b"PK\x03\x04" + os.urandom(512)),
    "text": lambda p: _write(p / "x.pt", b"model weights, trust me\n"),
    "json": lambda p: _write(p / "x.pt", b'{"pruned_widths": {}, "state_dict": {}}'),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_files_are_refused_clearly(tmp_path: Path, name: str) -> None:
    path = GARBAGE[name](tmp_path)
    fresh = Net()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"x\.pt.*expected a pruned model"):
        load_pruned(path, fresh)
    assert_untouched(fresh, before)
    with pytest.raises(ValueError, match=r"x\.pt.*weights_only=True"):
        LitNet.load_from_checkpoint(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    fresh = Net()
    before = snapshot(fresh)
    with pytest.raises(FileNotFoundError, match=r"nothere\.pt"):
        load_pruned(tmp_path / "nothere.pt", fresh)
    with pytest.raises(FileNotFoundError, match=r"no such file"):
        load_pruned(tmp_path, fresh)  # a directory is not a file
    assert_untouched(fresh, before)


# ================================================================== widths that do not fit
def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(obj: dict[str, Any]) -> None:
        target = obj
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _delete(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def edit(obj: dict[str, Any]) -> None:
        target = obj
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return edit


def _shrink_tensor(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(obj: dict[str, Any]) -> None:
        obj["state_dict"][key] = obj["state_dict"][key][:-1].clone()

    return edit


def _retype_tensor(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(obj: dict[str, Any]) -> None:
        obj["state_dict"][key] = obj["state_dict"][key].round().long()

    return edit


def _foreign_widths(obj: dict[str, Any]) -> None:
    """The widths and weights of another architecture (a pruned LeNet-5)."""
    lenet = build_model("lenet5")
    lenet.features[0] = nn.Conv2d(1, 7, 5)
    lenet.features[3] = nn.Conv2d(7, 50, 5)
    with tempfile.TemporaryDirectory() as tmp:
        foreign = torch.load(save_pruned(lenet, Path(tmp) / "lenet.pt"), weights_only=True)
    obj["pruned_widths"], obj["state_dict"] = foreign["pruned_widths"], foreign["state_dict"]


W = ("pruned_widths", "modules")
MISFITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "width-larger-than-model": _set((*W, "conv1", "out_channels"), 9),
    "width-zero": _set((*W, "conv1", "out_channels"), 0),
    "width-negative": _set((*W, "conv1", "out_channels"), -6),
    "width-missing": _delete((*W, "conv1", "out_channels")),
    "width-float": _set((*W, "conv1", "out_channels"), 6.0),
    "width-string": _set((*W, "conv1", "out_channels"), "6"),
    "width-bool": _set((*W, "fc1", "out_features"), True),
    "width-none": _set((*W, "fc1", "out_features"), None),
    "bn-width-negative": _set((*W, "bn1", "num_features"), -1),
    "groups-not-dividing": _set((*W, "conv2", "out_channels"), 7),
    "groups-zero": _set((*W, "conv2", "groups"), 0),
    "entry-not-a-dict": _set((*W, "conv1"), [6, 3]),
    "class-changed": _set((*W, "conv1", "class"), "Linear"),
    "unknown-module": _set((*W, "conv9"), {"class": "Conv2d", "in_channels": 3}),
    "modules-missing": _delete(W),
    "widths-format-wrong": _set(("pruned_widths", "format"), "something.else"),
    "widths-version-future": _set(("pruned_widths", "version"), 99),
    "widths-not-a-dict": _set(("pruned_widths",), [1, 2, 3]),
    "state-dict-missing": _delete(("state_dict",)),
    "tensor-shape-wrong": _shrink_tensor("conv1.weight"),
    "bn-stat-shape-wrong": _shrink_tensor("bn2.running_var"),
    "tensor-missing": _delete(("state_dict", "fc1.bias")),
    "tensor-extra": _set(("state_dict", "fc3.weight"), torch.zeros(2, 2)),
    "tensor-not-a-tensor": _set(("state_dict", "fc1.bias"), [0.0] * 10),
    "tensor-int-dtype": _retype_tensor("fc2.weight"),
    "another-architecture": _foreign_widths,
}


@pytest.mark.parametrize("kind", ["pt", "ckpt"])
@pytest.mark.parametrize("name", sorted(MISFITS))
def test_widths_or_tensors_that_do_not_fit_leave_the_model_untouched(
    tmp_path: Path, name: str, kind: str
) -> None:
    if kind == "pt":
        obj = _good_pruned_file(tmp_path / "good.bin")
    else:
        obj = _good_ckpt(tmp_path / "good.bin")
        obj["state_dict"] = {k.removeprefix("model."): v for k, v in obj["state_dict"].items()}
        obj["pruned_widths"]["modules"] = {
            k.removeprefix("model."): v
            for k, v in obj["pruned_widths"]["modules"].items()
            if k.startswith("model.")
        }
    MISFITS[name](obj)
    path = tmp_path / "bad.bin"
    torch.save(obj, path)
    fresh = Net()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"bad\.bin"):
        load_pruned(path, fresh)
    assert_untouched(fresh, before)
    # the same damage inside a Lightning checkpoint, through the mixin
    if "state_dict" in obj:
        obj["state_dict"] = {f"model.{k}": v for k, v in obj["state_dict"].items()}
    widths = obj.get("pruned_widths")
    if isinstance(widths, dict) and isinstance(widths.get("modules"), dict):
        widths["modules"] = {f"model.{k}": v for k, v in widths["modules"].items()}
    obj["hyper_parameters"] = {"c1": 8, "c2": 12, "hidden": 16}
    obj["pytorch-lightning_version"] = "2.6.0"
    torch.save(obj, path)
    lit = LitNet()
    before = snapshot(lit)
    try:  # the hook load_from_checkpoint runs before loading the weights
        lit.on_load_checkpoint(torch.load(path, weights_only=True))
    except ValueError:
        assert_untouched(lit, before)
    # either the hook or Lightning's strict load_state_dict refuses; no module is returned
    with pytest.raises((ValueError, RuntimeError)):
        LitNet.load_from_checkpoint(path)


def test_pruned_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lit.ckpt"
    _good_ckpt(path)
    with pytest.raises(ValueError, match=r"does not have|do not fit"):
        OtherLit.load_from_checkpoint(path)
    other = OtherLit()
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"lit\.ckpt"):
        load_pruned(path, other)
    assert_untouched(other, before)
    # a pruned file of a 10-class LeNet into a ResNet-20 and a VGG-16
    save_pruned(build_model("lenet5"), tmp_path / "lenet.pt")
    for name in ("resnet20", "vgg16"):
        model = build_model(name)
        before = snapshot(model)
        with pytest.raises(ValueError, match=r"lenet\.pt.*does not have|lenet\.pt"):
            load_pruned(tmp_path / "lenet.pt", model)
        assert_untouched(model, before)


def test_a_good_file_still_loads(tmp_path: Path) -> None:
    """The control of this file: the undamaged files load and compute what was saved."""
    x = torch.rand(2, 3, 8, 8)
    pruned = pruned_net()
    save_pruned(pruned, tmp_path / "good.pt")
    loaded = load_pruned(tmp_path / "good.pt", Net()).eval()
    torch.testing.assert_close(loaded(x), pruned(x))
    _good_ckpt(tmp_path / "good.ckpt", pruned)
    lit = LitNet.load_from_checkpoint(tmp_path / "good.ckpt").eval()
    torch.testing.assert_close(lit(x), pruned(x))
    assert copy.deepcopy(lit).model.conv1.out_channels == 6


def test_widths_that_disagree_between_coupled_layers_are_refused(tmp_path: Path) -> None:
    # saved with example inputs (as PrunedExport does): loading runs a forward pass that catches
    # widths which fit each layer alone but not each other
    save_pruned(pruned_net(), tmp_path / "good.pt", example_inputs=torch.rand(2, 3, 8, 8))
    obj = torch.load(tmp_path / "good.pt", weights_only=True)
    assert obj["pruned_widths"]["inputs"]["specs"] == [{"shape": [1, 3, 8, 8], "dtype": "float32"}]
    assert load_pruned(tmp_path / "good.pt", Net())(torch.rand(2, 3, 8, 8)).shape == (2, 5)
    obj["pruned_widths"]["modules"]["conv1"]["out_channels"] = 5  # bn1 and dw keep 6
    for key in ("conv1.weight", "conv1.bias"):
        obj["state_dict"][key] = obj["state_dict"][key][:5].clone()
    torch.save(obj, tmp_path / "bad.pt")
    fresh = Net()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="do not fit together"):
        load_pruned(tmp_path / "bad.pt", fresh)
    assert_untouched(fresh, before)  # the replaced layers were put back
