"""save_pruned / load_pruned, the widths description, pruned Lightning checkpoints (mixin), and
the hostile files they must refuse. Pruned models are built by hand here: the same architecture
constructed with smaller widths, weights randomised (BatchNorm statistics included).
"""

from __future__ import annotations

import io
import os
import pickle
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from _shared import GroupedNet
from torch import nn

from lightning_sparsity import PrunedCheckpointMixin, load_pruned, save_pruned
from lightning_sparsity.checkpoint import save_pruned_checkpoint
from lightning_sparsity.pruning.serialization import atomic_write, read_checkpoint, to_plain
from lightning_sparsity.pruning.widths import describe_widths, reshape_to_widths


def randomise(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
    return model.eval()


def small() -> Net:
    return randomise(Net(c1=6, c2=8, hidden=10))  # type: ignore[return-value]


def snapshot(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    return dict(model.named_modules()), {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: tuple[dict[str, Any], dict[str, Any]]) -> None:
    modules, state = before
    assert dict(model.named_modules()) == modules  # the very same module objects
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(now[key], value, rtol=0, atol=0)


X = torch.rand(2, 3, 8, 8)


# ------------------------------------------------------------------------------- round trips
def test_round_trip_restores_widths_weights_and_outputs(tmp_path: Path) -> None:
    pruned = small()
    path = save_pruned(pruned, tmp_path / "net.pt")
    fresh = Net()
    classes = {name: type(m) for name, m in fresh.named_modules()}
    loaded = load_pruned(path, fresh)
    assert loaded is fresh  # shrunk in place and returned
    assert {name: type(m) for name, m in loaded.named_modules()} == classes
    assert describe_widths(loaded) == describe_widths(pruned)
    assert (loaded.conv1.out_channels, loaded.dw.groups, loaded.conv2.groups) == (6, 6, 2)
    assert loaded.ln.normalized_shape == (10,)
    for key, value in pruned.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(loaded.eval()(X), pruned(X), rtol=0, atol=0)
    assert sum(p.numel() for p in loaded.parameters()) == sum(
        p.numel() for p in pruned.parameters()
    )


def test_file_is_plain_data_for_weights_only(tmp_path: Path) -> None:
    path = save_pruned(small(), tmp_path / "net.pt", metadata={"report": {"params": 123}})
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    obj = torch.load(path, weights_only=True)
    assert (obj["format"], obj["version"], obj["metadata"]) == (
        "lightning_sparsity.pruned",
        1,
        {"report": {"params": 123}},
    )
    widths = obj["pruned_widths"]["modules"]
    assert widths["conv2"] == {"class": "Conv2d", "in_channels": 6, "out_channels": 8, "groups": 2}
    assert widths["fc1"] == {"class": "Linear", "in_features": 32, "out_features": 10}
    assert widths["bn1"] == {"class": "BatchNorm2d", "num_features": 6}
    assert widths["ln"] == {"class": "LayerNorm", "normalized_shape": [10]}

    def plain(v: Any) -> bool:
        if isinstance(v, dict):
            return type(v) is dict and all(type(k) is str and plain(x) for k, x in v.items())
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return type(v) in (str, int, float, bool, type(None), torch.Tensor)

    assert plain(obj)
    assert all(t.device.type == "cpu" for t in obj["state_dict"].values())


def test_sliced_views_are_saved_compactly(tmp_path: Path) -> None:
    big = nn.Linear(1000, 1000)
    small_layer = nn.Linear(1000, 2)
    small_layer.weight = nn.Parameter(big.weight.detach()[:2])  # a view into 1M floats
    path = save_pruned(nn.Sequential(small_layer), tmp_path / "net.pt")
    assert path.stat().st_size < 100_000


@pytest.mark.parametrize(
    ("build", "x"),
    [
        (
            lambda c: nn.Sequential(nn.Conv1d(2, c, 3), nn.BatchNorm1d(c), nn.PReLU(c)),
            torch.rand(2, 2, 9),
        ),
        (
            lambda c: nn.Sequential(
                nn.ConvTranspose2d(3, c, 3, groups=1), nn.GroupNorm(2, c), nn.Conv2d(c, 4, 1)
            ),
            torch.rand(2, 3, 5, 5),
        ),
        (
            lambda c: nn.Sequential(nn.Conv3d(1, c, 2), nn.InstanceNorm3d(c, affine=True)),
            torch.rand(2, 1, 4, 4, 4),
        ),
    ],
    ids=["conv1d-bn1d-prelu", "convtranspose-groupnorm", "conv3d-instancenorm"],
)
def test_other_layer_families_round_trip(tmp_path: Path, build: Any, x: torch.Tensor) -> None:
    pruned = randomise(build(4))
    path = save_pruned(pruned, tmp_path / "net.pt")
    loaded = load_pruned(path, build(8))
    assert describe_widths(loaded) == describe_widths(pruned)
    torch.testing.assert_close(loaded.eval()(x), pruned(x), rtol=0, atol=0)


def test_dtype_is_kept_and_unchanged_layers_are_not_replaced(tmp_path: Path) -> None:
    path = save_pruned(randomise(Net(c1=6, c2=8)).double(), tmp_path / "net.pt")
    fresh = Net().double()
    fc1, fc2 = fresh.fc1, fresh.fc2
    load_pruned(path, fresh)
    assert fresh.fc1 is not fc1
    assert fresh.fc1.in_features == 32
    assert fresh.fc2 is fc2  # its width is unchanged: the same object stays in place
    assert all(p.dtype == torch.float64 for p in fresh.parameters())


def test_metadata_must_be_plain(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"metadata=.*\['model'\].*Linear"):
        save_pruned(small(), tmp_path / "net.pt", metadata={"model": nn.Linear(2, 2)})
    assert list(tmp_path.iterdir()) == []
    assert to_plain({"t": (1, 2.5, "a", None)}, "m") == {"t": (1, 2.5, "a", None)}


# ------------------------------------------------------------------------------- hostile files
class Payload:
    """Unpickling this would create a marker file (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"pruned_widths": Payload(marker), "state_dict": {}}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    fresh = Net()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"evil\.pt.*expected a pruned model.*weights_only=True"):
        load_pruned(path, fresh)
    assert not marker.exists()
    assert_untouched(fresh, before)
    # control: the payload is live when unpickled unsafely
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_unreadable_files_name_the_path_and_what_was_expected(tmp_path: Path) -> None:
    good = save_pruned(small(), tmp_path / "good.pt").read_bytes()
    cases = {
        "random.pt": os.urandom(4096),
        "truncated.pt": good[: len(good) // 2],
        "empty.pt": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        fresh = Net()
        before = snapshot(fresh)
        with pytest.raises(ValueError, match=rf"{name}.*expected a pruned model written by"):
            load_pruned(tmp_path / name, fresh)
        assert_untouched(fresh, before)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_pruned(tmp_path / "missing.pt", Net())


def test_plain_state_dict_and_foreign_objects_are_refused(tmp_path: Path) -> None:
    torch.save(small().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match=r"sd\.pt.*expected a pruned model.*plain state_dict"):
        load_pruned(tmp_path / "sd.pt", Net())
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt.*got a list"):
        load_pruned(tmp_path / "list.pt", Net())
    torch.save(
        {"pruned_widths": {}, "state_dict": {}, "format": "other", "version": 1}, tmp_path / "o.pt"
    )
    with pytest.raises(ValueError, match=r"expected format 'lightning_sparsity.pruned'"):
        load_pruned(tmp_path / "o.pt", Net())


def _tampered(tmp_path: Path, edit: Any) -> Path:
    obj = torch.load(save_pruned(small(), tmp_path / "net.pt"), weights_only=True)
    edit(obj)
    torch.save(obj, tmp_path / "bad.pt")
    return tmp_path / "bad.pt"


def _set(path: str, value: Any) -> Any:
    def edit(obj: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        for key in parents:
            obj = obj[key]
        if value is KeyError:
            del obj[last]
        else:
            obj[last] = value

    return edit


M = "pruned_widths/modules"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _set(f"{M}/conv1/out_channels", 20),
            r"'conv1'.*`out_channels`.*<= the original 8, got 20",
        ),
        (_set(f"{M}/conv1/out_channels", 0), r"'conv1'.*positive int.*got 0"),
        (_set(f"{M}/conv1/out_channels", True), r"'conv1'.*positive int.*got True"),
        (_set(f"{M}/conv1/out_channels", 6.0), r"'conv1'.*positive int.*got 6.0"),
        (_set(f"{M}/dw/groups", 4), r"'dw'.*`groups`=4 must divide in_channels=6"),
        (_set(f"{M}/conv2/groups", 4), r"'conv2'.*`groups`.*<= the original 2, got 4"),
        (_set(f"{M}/ln/normalized_shape", [10, 1]), r"'ln'.*list of 1 positive ints"),
        (_set(f"{M}/fc1/in_features", KeyError), r"'fc1'.*lack \['in_features'\]"),
        (_set(f"{M}/conv1/class", "Linear"), r"'conv1': saved class 'Linear'.*`Conv2d`"),
        (_set(f"{M}/conv9", {"class": "Conv2d"}), r"module 'conv9'.*does not have.*'conv1'"),
        (_set("pruned_widths/format", "nope"), r"format 'lightning_sparsity.pruned_widths'"),
        (_set("pruned_widths/version", 99), r"version 99 is not supported"),
        (
            _set("state_dict/fc1.weight", torch.zeros(10, 33)),
            r"'fc1.weight'.*\[10, 33\].*\[10, 32\]",
        ),
        (_set("state_dict/bn2.bias", KeyError), r"missing \['bn2.bias'\]"),
        (_set("state_dict/extra.weight", torch.zeros(1)), r"unexpected \['extra.weight'\]"),
        (_set("state_dict/fc2.bias", [0.0] * 5), r"'fc2.bias' is a list, expected a tensor"),
        (_set("state_dict/fc2.bias", torch.zeros(5, dtype=torch.long)), r"'fc2.bias'.*dtype"),
    ],
)
def test_widths_or_tensors_that_do_not_fit_leave_the_model_untouched(
    tmp_path: Path, edit: Any, message: str
) -> None:
    path = _tampered(tmp_path, edit)
    fresh = Net()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=message) as info:
        load_pruned(path, fresh)
    assert "bad.pt" in str(info.value)
    assert "not modified" in str(info.value)
    assert_untouched(fresh, before)


def test_widths_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = save_pruned(small(), tmp_path / "net.pt")
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    before = snapshot(other)
    with pytest.raises(
        ValueError, match=r"module 'conv1'.*`Sequential` does not have.*freshly built"
    ):
        load_pruned(path, other)
    assert_untouched(other, before)


def test_type_errors() -> None:
    with pytest.raises(TypeError, match=r"save_pruned\(model=...\).*nn.Module, got dict"):
        save_pruned({}, "x.pt")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"load_pruned\(model=...\).*nn.Module, got str"):
        load_pruned("x.pt", "model")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- atomic writes
def test_atomic_write_never_leaves_half_files(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def failing_write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing_write)

    def failing_check(tmp: Path) -> None:
        raise RuntimeError("wrong outputs")

    with pytest.raises(RuntimeError, match="wrong outputs"):
        atomic_write(target, lambda tmp: tmp.write_bytes(b"new"), failing_check)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"), lambda tmp: None)
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


# ------------------------------------------------------------------------------- Lightning ckpt
class LitNet(PrunedCheckpointMixin):
    def __init__(self, c1: int = 8, lr: float = 0.1, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = Net(c1=c1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def test_pruned_checkpoint_loads_with_load_from_checkpoint(tmp_path: Path) -> None:
    lit = LitNet(c1=8, lr=0.5)
    lit.model = small()  # the pruned network, same names and classes
    path = save_pruned_checkpoint(lit, tmp_path / "pruned.ckpt", epoch=3, global_step=30)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["hyper_parameters"] == {"c1": 8, "lr": 0.5, "backbone": None}
    assert (ckpt["epoch"], ckpt["global_step"]) == (3, 30)
    assert "pytorch-lightning_version" in ckpt
    assert ckpt["pruned_widths"]["modules"]["model.conv1"]["out_channels"] == 6
    assert all(key.startswith("model.") for key in ckpt["state_dict"])

    loaded = LitNet.load_from_checkpoint(path)
    assert loaded.hparams.lr == 0.5
    assert describe_widths(loaded) == describe_widths(lit)
    torch.testing.assert_close(loaded.eval()(X), lit.eval()(X), rtol=0, atol=0)
    # the same file also loads into a plain, freshly built module without Lightning's loader
    torch.testing.assert_close(load_pruned(path, LitNet()).eval()(X), lit(X), rtol=0, atol=0)


def test_mixin_saves_widths_and_loads_unpruned_checkpoints(tmp_path: Path) -> None:
    lit = LitNet()
    checkpoint: dict[str, Any] = {"state_dict": lit.state_dict()}
    lit.on_save_checkpoint(checkpoint)
    assert checkpoint["pruned_widths"]["modules"]["model.conv1"]["out_channels"] == 8
    other = LitNet()
    other.on_load_checkpoint({"state_dict": lit.state_dict()})  # no widths: nothing to do
    assert other.model.conv1.out_channels == 8


def test_mixin_refuses_widths_that_do_not_fit(tmp_path: Path) -> None:
    lit = LitNet(c1=8)
    lit.model = small()
    path = save_pruned_checkpoint(lit, tmp_path / "pruned.ckpt")
    with pytest.raises(ValueError, match=r"load_from_checkpoint.*'model.conv1'.*<= the original 4"):
        LitNet.load_from_checkpoint(path, c1=4)  # built narrower than the saved widths


@pytest.mark.filterwarnings("ignore:Attribute 'backbone' is an instance of `nn.Module`")
def test_non_plain_hyperparameters_are_left_out_with_a_warning(tmp_path: Path) -> None:
    lit = LitNet(backbone=nn.Linear(2, 2))
    lit.model = small()
    with pytest.warns(UserWarning, match=r"\['backbone'\] are not plain.*load_from_checkpoint"):
        path = save_pruned_checkpoint(lit, tmp_path / "pruned.ckpt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    assert "backbone" not in torch.load(path, weights_only=True)["hyper_parameters"]
    loaded = LitNet.load_from_checkpoint(path, backbone=nn.Linear(2, 2))
    torch.testing.assert_close(loaded.eval()(X), lit.eval()(X), rtol=0, atol=0)


def test_read_checkpoint_accepts_a_buffered_valid_file(tmp_path: Path) -> None:
    path = save_pruned(small(), tmp_path / "net.pt")
    assert read_checkpoint(path)["pruned_widths"]["modules"]["dw"]["groups"] == 6
    assert isinstance(torch.load(io.BytesIO(path.read_bytes()), weights_only=True), dict)


def test_reshape_needs_nothing_when_widths_are_equal() -> None:
    net = randomise(Net())
    before = snapshot(net)
    reshape_to_widths(net, describe_widths(net), net.state_dict())
    assert_untouched(net, before)


def Net(c1: int = 8, c2: int = 12, hidden: int = 16, groups: int = 2) -> nn.Module:
    """The shared grouped net, with a LayerNorm between the Linear layers."""
    return GroupedNet(c1, c2, hidden, groups, layer_norm=True)


def test_written_files_get_the_mode_a_plain_open_gives(tmp_path: Path) -> None:
    """Mkstemp makes 0600 files; Lightning's checkpoints are 0644 under the usual umask."""
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "f.pt", lambda tmp: tmp.write_bytes(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
