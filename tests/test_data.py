"""Datamodules: where the data is read and written, the splits, the errors, the registry.

CIFAR-10 on generated files in torchvision's format, MNIST / Fashion-MNIST on the offline copy;
``data_dir`` holding unpacked files, archives or nothing, read-only or mistyped; no network.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torchvision import datasets

from lightning_sparsity.data import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    build_datamodule,
)

# the offline copy of the MNIST archives (its README.md): /work/shared/data beside the repository
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_MEAN = torch.tensor(CIFAR10DataModule.mean).view(3, 1, 1)
CIFAR_STD = torch.tensor(CIFAR10DataModule.std).view(3, 1, 1)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, Any]]:
    """A tiny CIFAR-10 in torchvision's on-disk format.

    5 training batches of 12 images, a test batch of 10. torchvision's loader runs unchanged, its
    integrity check included: the class's list of expected md5 sums is pointed at the generated
    files.
    """
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    raw: dict[str, Any] = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = 10 if name == "test_batch" else 12
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=n)]
        raw[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
    classes = ["airplane", "automobile", "bird", "cat", "deer"]
    classes += ["dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": classes, "num_cases_per_batch": 12, "num_vis": 3072}, f)
    monkeypatch.setattr(datasets.CIFAR10, "train_list", [[n, _md5(folder / n)] for n in names[:5]])
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", _md5(folder / names[5])]])
    meta = dict(datasets.CIFAR10.meta, md5=_md5(folder / "batches.meta"))
    monkeypatch.setattr(datasets.CIFAR10, "meta", meta)
    return folder.parent, raw


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def mnist_archives(tmp_path: Path) -> Path:
    """A torchvision root with MNIST's archives only (``MNIST/raw/*.gz``, from the offline copy)."""
    source = Path(os.environ.get("LIGHTNING_SPARSITY_DATA") or SHARED_DATA) / "MNIST" / "raw"
    if not source.is_dir():
        pytest.skip("no offline MNIST copy: set LIGHTNING_SPARSITY_DATA to a torchvision root")
    raw = tmp_path / "archives" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in source.glob("*.gz"):
        shutil.copyfile(gz, raw / gz.name)
    return tmp_path / "archives"


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` with its mode, size and modification time."""
    stats = {str(path.relative_to(root)): path.stat() for path in root.rglob("*")}
    return {name: (st.st_mode, st.st_size, st.st_mtime_ns) for name, st in sorted(stats.items())}


@contextmanager
def _read_only(root: Path) -> Iterator[None]:
    """``root`` and everything under it marked read-only (``r-x`` folders, ``r--`` files)."""
    paths = [root, *root.rglob("*")]
    for path in reversed(paths):  # the deepest first: a folder is closed after its content
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        yield
    finally:
        for path in paths:
            path.chmod(0o755 if path.is_dir() else 0o644)


def _expected_image(data: np.ndarray, index: int) -> torch.Tensor:
    image = torch.from_numpy(data[index].reshape(3, 32, 32)).float() / 255
    return (image - CIFAR_MEAN) / CIFAR_STD


def test_cifar10_split_normalisation_and_augmentation(cifar_root: tuple[Path, Any]) -> None:
    root, raw = cifar_root
    train_data = np.concatenate([raw[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = [label for i in range(1, 6) for label in raw[f"data_batch_{i}"][1]]
    dm = CIFAR10DataModule(data_dir=root, batch_size=8, num_workers=0, val_size=10, seed=3)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_set is not None
    assert dm.val_set is not None
    train_idx, val_idx = dm.train_set.indices, dm.val_set.indices  # type: ignore[attr-defined]
    assert len(train_idx) == 50
    assert len(val_idx) == 10
    assert sorted([*train_idx, *val_idx]) == list(range(60))

    # validation: not augmented, exactly the per-channel normalised pixels
    for position, index in enumerate(val_idx[:3]):
        image, label = dm.val_set[position]
        torch.testing.assert_close(image, _expected_image(train_data, index))
        assert label == train_labels[index]

    # training: a random crop of the 4-pixel zero-padded image and a random flip
    index = train_idx[0]
    plain = _expected_image(train_data, index)
    padded = torch.nn.functional.pad(plain * CIFAR_STD + CIFAR_MEAN, (4, 4, 4, 4))
    padded = (padded - CIFAR_MEAN) / CIFAR_STD
    candidates = [
        view[:, dy : dy + 32, dx : dx + 32]
        for view in (padded, padded.flip(-1))
        for dy in range(9)
        for dx in range(9)
    ]
    draws = [dm.train_set[0][0] for _ in range(8)]
    for draw in draws:
        assert any(torch.allclose(draw, c, atol=1e-5) for c in candidates)
    assert any(not torch.allclose(draw, plain) for draw in draws)

    batch, labels = next(iter(dm.train_dataloader()))
    assert batch.shape == (8, 3, 32, 32)
    assert labels.shape == (8,)


def test_cifar10_test_split_and_seeded_split(cifar_root: tuple[Path, Any]) -> None:
    root, raw = cifar_root
    dm = CIFAR10DataModule(data_dir=root, num_workers=0, val_size=10, seed=3)
    dm.setup("test")
    assert dm.test_set is not None
    assert len(dm.test_set) == 10
    image, label = dm.test_set[4]
    torch.testing.assert_close(image, _expected_image(raw["test_batch"][0], 4))
    assert label == raw["test_batch"][1][4]

    def split(seed: int) -> list[int]:
        other = CIFAR10DataModule(data_dir=root, num_workers=0, val_size=10, seed=seed)
        other.setup("fit")
        return list(other.val_set.indices)  # type: ignore[union-attr]

    assert split(3) == split(3)
    assert split(3) != split(4)


def test_cifar10_corrupted_and_offline_names_the_place(
    cifar_root: tuple[Path, Any], no_network: None
) -> None:
    root, _ = cifar_root
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"corrupt")
    dm = CIFAR10DataModule(data_dir=root, num_workers=0, val_size=10)
    with pytest.raises(RuntimeError, match=r"download failed \(URLError") as info:
        dm.prepare_data()
    assert str(root) in str(info.value)
    assert "cifar-10-batches-py/" in str(info.value)
    assert "failed torchvision's check" in str(info.value)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # no partial archive


def test_mnist_on_the_offline_copy(data_root: Path, tmp_path: Path) -> None:
    # data_root holds the unpacked files: it is used as is, nothing is written anywhere
    before = _snapshot(data_root)
    cache = tmp_path / "cache"
    dm = MNISTDataModule(data_dir=data_root, batch_size=500, num_workers=0, cache_dir=cache)
    assert dm.resolve_root() == data_root.resolve()
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) == 55_000  # type: ignore[arg-type]
    assert len(dm.val_set) == 5_000  # type: ignore[arg-type]
    assert len(dm.test_set) == 10_000  # type: ignore[arg-type]
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (500, 1, 28, 28)
    assert set(labels.tolist()) == set(range(10))
    # normalised with MNIST's statistics: about zero mean and unit std
    assert abs(images.mean().item()) < 0.1
    assert abs(images.std().item() - 1) < 0.1
    assert _snapshot(data_root) == before
    assert not cache.exists()


def test_fashion_mnist_on_the_offline_copy(data_root: Path) -> None:
    dm = build_datamodule("fashion_mnist", data_dir=data_root, batch_size=500, num_workers=0)
    assert isinstance(dm, FashionMNISTDataModule)
    dm.prepare_data()
    dm.setup("test")
    images, _ = next(iter(dm.test_dataloader()))
    assert images.shape == (500, 1, 28, 28)
    assert abs(images.mean().item()) < 0.1
    assert abs(images.std().item() - 1) < 0.1


@pytest.mark.parametrize("read_only", [True, False], ids=["read-only", "writable"])
def test_archives_are_unpacked_in_the_cache_never_in_data_dir(
    mnist_archives: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, read_only: bool
) -> None:
    root = mnist_archives
    cache = tmp_path / "cache"
    dm = MNISTDataModule(data_dir=root, cache_dir=cache, num_workers=0)
    with _read_only(root) if read_only else nullcontext(), caplog.at_level(logging.INFO):
        before = _snapshot(root)
        dm.prepare_data()
        dm.setup("test")
        resolved = dm.resolve_root()
        assert _snapshot(root) == before
    assert resolved == cache.resolve()
    assert len(dm.test_set) == 10_000  # type: ignore[arg-type]
    assert (cache / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()
    assert caplog.text.count("holds the MNIST archives but not the unpacked files") == 1
    assert str(cache) in caplog.text

    # a second datamodule finds the unpacked copy: nothing is copied again
    cached = _snapshot(cache)
    again = MNISTDataModule(data_dir=root, cache_dir=cache, num_workers=0)
    again.prepare_data()
    assert again.resolve_root() == cache.resolve()
    assert _snapshot(cache) == cached


def test_cache_dir_from_the_environment_and_archives_need_no_download(
    mnist_archives: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    env_cache = tmp_path / "env_cache"
    monkeypatch.setenv("LIGHTNING_SPARSITY_CACHE", str(env_cache))
    dm = MNISTDataModule(data_dir=mnist_archives, num_workers=0, download=False)
    dm.setup("test")  # unpacked from the archives: no network, download=False is no obstacle
    assert dm.resolve_root() == env_cache.resolve()
    assert len(dm.test_set) == 10_000  # type: ignore[arg-type]

    # the argument wins over the variable; without either, the home cache (not created here)
    explicit = MNISTDataModule(data_dir=tmp_path / "nothing", cache_dir=tmp_path / "arg")
    assert explicit._cache_root() == (tmp_path / "arg").resolve()
    monkeypatch.delenv("LIGHTNING_SPARSITY_CACHE")
    default = MNISTDataModule(data_dir=tmp_path / "nothing")
    assert default._cache_root() == Path("~/.cache/lightning_sparsity").expanduser().resolve()


@pytest.mark.parametrize("download", [False, True], ids=["download=False", "offline"])
def test_mistyped_data_dir_leaves_nothing_behind(
    tmp_path: Path, no_network: None, download: bool
) -> None:
    typo = tmp_path / "dta" / "mnist"
    cache = tmp_path / "cache"
    dm = MNISTDataModule(data_dir=typo, cache_dir=cache, num_workers=0, download=download)
    cause = (
        r"the download failed \(RuntimeError: Error downloading" if download else "`download=False`"
    )
    for step in (dm.prepare_data, lambda: dm.setup("fit"), lambda: dm.setup("test")):
        with pytest.raises(RuntimeError) as info:
            step()
        message = str(info.value)
        assert message.startswith(
            f"`MNISTDataModule(data_dir={str(typo)!r})`: the folder does not exist"
        )
        assert re.search(cause, message)
        assert "HINT: check the path for a typo" in message
        assert "MNIST/raw/*.gz" in message
        assert list(tmp_path.iterdir()) == []  # neither the typo's folders nor the cache


def test_cifar10_mistyped_data_dir_offline_leaves_nothing_behind(
    tmp_path: Path, no_network: None
) -> None:
    typo = tmp_path / "cifar_typo"
    dm = CIFAR10DataModule(data_dir=typo, cache_dir=tmp_path / "cache", num_workers=0)
    with pytest.raises(RuntimeError, match=r"does not exist and the download failed \(URLError"):
        dm.prepare_data()
    assert list(tmp_path.iterdir()) == []


def test_empty_data_dir_is_the_download_target_and_is_left_empty_offline(
    tmp_path: Path, no_network: None
) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    dm = MNISTDataModule(data_dir=empty, cache_dir=tmp_path / "cache", num_workers=0)
    assert dm.resolve_root() == empty.resolve()  # nothing there: downloaded into, not the cache
    with pytest.raises(RuntimeError, match=r"not found in .*download failed") as info:
        dm.prepare_data()
    assert str(empty / "MNIST" / "raw") in str(info.value)
    assert "typo" not in str(info.value)
    assert list(empty.iterdir()) == []  # MNIST/raw, made by torchvision, removed again
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("download", [False, True], ids=["download=False", "offline"])
def test_read_only_empty_data_dir_falls_back_to_the_cache(
    tmp_path: Path, no_network: None, caplog: pytest.LogCaptureFixture, download: bool
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    cache = tmp_path / "cache"
    dm = MNISTDataModule(data_dir=shared, cache_dir=cache, num_workers=0, download=download)
    with _read_only(shared), caplog.at_level(logging.INFO):
        assert dm.resolve_root() == cache.resolve()
        with pytest.raises(RuntimeError, match=r"is read-only and holds no MNIST files") as info:
            dm.prepare_data()
        assert list(shared.iterdir()) == []
    assert f"`MNISTDataModule(data_dir={str(shared)!r})`" in str(info.value)
    assert str(cache / "MNIST" / "raw") in str(info.value)
    assert caplog.text.count("is read-only and holds no MNIST files") == 1
    assert not cache.exists()  # the failed download into the cache left nothing either


def test_bad_data_dir_and_cache_dir_name_the_argument(mnist_archives: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    dm = MNISTDataModule(data_dir=a_file, num_workers=0)
    with pytest.raises(
        ValueError, match=r"`MNISTDataModule\(data_dir='.*notes.txt'\)`: expected a folder"
    ):
        dm.prepare_data()

    dm = MNISTDataModule(data_dir=mnist_archives, cache_dir=a_file, num_workers=0)
    with pytest.raises(
        RuntimeError, match=r"`MNISTDataModule\(cache_dir='.*notes.txt'\)`.*HINT: set `cache_dir`"
    ):
        dm.prepare_data()
    assert a_file.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archives", "notes.txt"]


def test_missing_data_without_network_says_where_and_how(tmp_path: Path, no_network: None) -> None:
    absent = tmp_path / "nowhere"
    dm = MNISTDataModule(data_dir=absent, num_workers=0)
    with pytest.raises(RuntimeError, match=r"download failed") as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(absent / "MNIST" / "raw") in message
    assert "--data.data_dir" in message
    assert "MNIST/raw/*.gz" in message

    offline = MNISTDataModule(data_dir=absent, num_workers=0, download=False)
    with pytest.raises(RuntimeError, match=r"download=False.*MNIST/raw/\*\.gz"):
        offline.setup("test")
    assert not absent.exists()


def test_registry_and_bad_arguments() -> None:
    assert isinstance(build_datamodule("MNIST"), MNISTDataModule)
    assert isinstance(build_datamodule("cifar-10"), CIFAR10DataModule)
    with pytest.raises(
        ValueError, match=r"expected one of \['mnist', 'fashion-mnist', 'cifar10'\], got 'imagenet'"
    ):
        build_datamodule("imagenet")
    with pytest.raises(ValueError, match=r"`MNISTDataModule\(batch_size=0\)`: expected"):
        MNISTDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"num_workers` >= 0"):
        MNISTDataModule(num_workers=-1)
    with pytest.raises(TypeError, match=r"val_size=0.5"):
        MNISTDataModule(val_size=0.5)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"not set up"):
        MNISTDataModule().train_dataloader()


def test_val_size_must_leave_training_data(cifar_root: tuple[Path, Any]) -> None:
    root, _ = cifar_root
    dm = CIFAR10DataModule(data_dir=root, num_workers=0, val_size=60)
    with pytest.raises(ValueError, match=r"val_size` < 60"):
        dm.setup("fit")
