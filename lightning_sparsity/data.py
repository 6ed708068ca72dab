"""LightningDataModules for MNIST, Fashion-MNIST and CIFAR-10 over torchvision's own datasets.

This is the only module of the package that imports torchvision.

Where the data is read, and what is written (torchvision unpacks archives next to them, e.g.
``<root>/MNIST/raw/*.gz`` into ``<root>/MNIST/raw/``):

* ``data_dir`` holds the unpacked files: it is used as is.
* ``data_dir`` holds the archives but not the unpacked files (a shared offline copy, like
  torchvision's ``MNIST/raw/*.gz``): ``data_dir`` is never written, writable or not. The archives
  are copied to ``cache_dir`` and unpacked there; no network is needed, even with
  ``download=False``.
* ``data_dir`` holds none of the dataset's files: it is where the dataset is downloaded to
  (``download=True``), its folders created by the download. When it is read-only, the download
  goes to ``cache_dir`` instead.

``cache_dir`` is the argument, else ``$LIGHTNING_SPARSITY_CACHE``, else
``~/.cache/lightning_sparsity``. Folders are created only when a file is written: a mistyped
``data_dir`` with ``download=False``, or whose download fails (no network), leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms
from torchvision.datasets.utils import check_integrity

from lightning_sparsity.validation import check_int, fail

DEFAULT_CACHE_DIR = "~/.cache/lightning_sparsity"
CACHE_DIR_ENV = "LIGHTNING_SPARSITY_CACHE"
"""Environment variable read for ``cache_dir`` when the argument is not given."""


def _is_writable(path: Path) -> bool:
    """Whether files can be created at ``path`` (or at its nearest existing ancestor).

    The permission bits are read as well as ``os.access``: root passes ``os.access`` on a directory
    marked read-only (``r-x``), and such a directory is a shared copy that must not be written.
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return os.access(existing, os.W_OK) and bool(existing.stat().st_mode & 0o222)


def _first_missing(path: Path) -> Path | None:
    """The outermost folder (or file) of ``path`` that does not exist; None when it exists."""
    missing = None
    while not path.exists() and path != path.parent:
        missing, path = path, path.parent
    return missing


def _remove(paths: list[Path]) -> None:
    """Remove what a failed download created (each path did not exist before it)."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)


class VisionDataModule(pl.LightningDataModule):
    """Base class: a torchvision dataset, a seeded train/val split of it, and its test set.

    Subclasses set the dataset class, the normalisation and the augmentation.

    Args:
        data_dir: torchvision root (the folder that holds ``MNIST/``, ``cifar-10-batches-py/``...).
        batch_size: samples per batch for every split.
        num_workers: DataLoader worker processes.
        val_size: samples of the training set held out for validation.
        seed: seed of the train/val split.
        download: download the dataset when neither its files nor its archives are under
            ``data_dir`` (archives are unpacked without it).
        cache_dir: where archives found in ``data_dir`` are copied to be unpacked, and where a
            read-only ``data_dir`` that holds nothing is downloaded to. None:
            ``$LIGHTNING_SPARSITY_CACHE``, else ``~/.cache/lightning_sparsity``.

    ``data_dir`` is never written when it holds the dataset, unpacked or as archives; see the
    module's documentation for the whole rule.

    Raises:
        ValueError: a size below its minimum, a ``val_size`` not smaller than the training set,
            a ``data_dir`` that is a file.
        TypeError: a size that is not an int.
        RuntimeError: the dataset is neither under ``data_dir`` nor downloadable, or the archives
            cannot be copied to ``cache_dir`` (the message says where it was looked for and how
            to provide it).
    """

    dataset_class: ClassVar[type[Dataset[Any]]]
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]
    num_classes: ClassVar[int] = 10
    dims: ClassVar[tuple[int, int, int]]

    def __init__(
        self,
        data_dir: str | Path = "./data",
        batch_size: int = 128,
        num_workers: int = 2,
        val_size: int = 5000,
        seed: int = 42,
        download: bool = True,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        self.download = download
        self.cache_dir = cache_dir
        for arg, value, low in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("val_size", val_size, 1),
        ):
            check_int(value, owner=type(self).__name__, arg=arg, low=low)
        self.save_hyperparameters()
        self.train_set: Dataset[Any] | None = None
        self.val_set: Dataset[Any] | None = None
        self.test_set: Dataset[Any] | None = None
        self._announced: Path | None = None
        self._why_cache = ""  # why the root in use is the cache, for the error messages

    # -- what a subclass describes -------------------------------------------------------------
    def _required_files(self, root: Path) -> list[Path]:
        """Files torchvision reads without writing anything."""
        raise NotImplementedError

    def _archives(self, root: Path) -> dict[Path, str]:
        """Archives (with their md5) that torchvision unpacks next to themselves."""
        raise NotImplementedError

    def _write_dir(self, root: Path) -> Path:
        """The folder torchvision writes into when it unpacks or downloads."""
        raise NotImplementedError

    def _layout_hint(self) -> str:
        raise NotImplementedError

    def train_transform(self) -> Any:
        """The transform of the training split (the evaluation one unless a subclass augments)."""
        return self.eval_transform()

    def eval_transform(self) -> Any:
        """The transform of the validation and test splits: to a tensor, normalised."""
        return transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        )

    # -- where the data is ---------------------------------------------------------------------
    def _ready(self, root: Path) -> bool:
        return all(path.is_file() for path in self._required_files(root))

    def _archives_intact(self, root: Path) -> bool:
        """Every archive is there with its md5: torchvision unpacks them without a network."""
        return all(check_integrity(str(path), md5) for path, md5 in self._archives(root).items())

    def _data_root(self) -> Path:
        root = Path(self.data_dir).expanduser().resolve()
        if root.exists() and not root.is_dir():
            raise ValueError(
                f"`{type(self).__name__}(data_dir={str(self.data_dir)!r})`: expected a folder (a "
                "torchvision root), got a file. HINT: point `data_dir` to the folder that holds "
                f"{self._layout_hint()}, or to a new folder to download the dataset into."
            )
        return root

    def _cache_root(self) -> Path:
        """The cache folder, resolved (not created).

        ``cache_dir``, else ``$LIGHTNING_SPARSITY_CACHE``, else ``~/.cache/lightning_sparsity``.
        """
        value = self.cache_dir
        if value is None or str(value) == "":
            value = os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR
        return Path(value).expanduser().resolve()

    def resolve_root(self) -> Path:
        """The torchvision root to use; never writes into ``data_dir``.

        ``data_dir`` when it holds the unpacked files, or nothing of the dataset and is writable
        (the download target); else the cache, where archives found in ``data_dir`` are copied
        first.
        """
        name = type(self).__name__
        root = self._data_root()
        if self._ready(root):
            return root
        cache = self._cache_root()
        if cache == root:  # the cache is ours to write
            return root
        archives = [path for path in self._archives(root) if path.is_file()]
        if archives:
            if not self._ready(cache):
                self._copy_archives(root, cache, archives)
            self._why_cache = (
                f"`data_dir` holds the archives, not the unpacked files: they are unpacked in "
                f"their copy in `cache_dir={str(cache)!r}`"
            )
            message = (
                f"{name}: `{root}` holds the {self.dataset_class.__name__} archives but not the "
                f"unpacked files; torchvision unpacks next to the archives, so `data_dir` is left "
                f"as it is and a copy in `{cache}` is used (set `cache_dir` or "
                f"${CACHE_DIR_ENV} to change the place)."
            )
        elif _is_writable(self._write_dir(root)):
            return root  # nothing there: the download target
        else:
            self._why_cache = (
                f"`data_dir` is read-only and holds no {self.dataset_class.__name__} files: "
                f"`cache_dir={str(cache)!r}` is used instead"
            )
            message = (
                f"{name}: `{root}` is read-only and holds no {self.dataset_class.__name__} "
                f"files: using `{cache}` (set `cache_dir` or ${CACHE_DIR_ENV} to change it)."
            )
        if self._announced != cache:
            rank_zero_info(message)
        self._announced = cache
        return cache

    def _copy_archives(self, root: Path, cache: Path, archives: list[Path]) -> None:
        for src in archives:
            dest = cache / src.relative_to(root)
            if dest.is_file() and dest.stat().st_size == src.stat().st_size:
                continue
            created = _first_missing(dest.parent)
            partial = dest.with_name(dest.name + ".part")
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, partial)  # copyfile: not the read-only mode bits
                partial.replace(dest)
            except OSError as err:
                _remove([partial] + ([created] if created is not None else []))
                raise RuntimeError(
                    f"`{type(self).__name__}(cache_dir={str(self.cache_dir)!r})`: the archives "
                    f"of `data_dir={str(self.data_dir)!r}` are unpacked in a copy in `{cache}`, "
                    f"and copying `{src.name}` there failed ({type(err).__name__}: {err}). HINT: "
                    f"set `cache_dir` (or ${CACHE_DIR_ENV}) to a writable folder, or point "
                    "`data_dir` to a root that holds the unpacked files."
                ) from err

    def _not_found(self, root: Path, err: Exception | None, fetched: bool) -> RuntimeError:
        """The error for a dataset that torchvision could not load.

        ``err`` is torchvision's error (None when it was not called); ``fetched`` says whether it
        was asked to download or unpack.
        """
        name = type(self).__name__
        given = Path(self.data_dir).expanduser().resolve()
        data = self.dataset_class.__name__
        if not given.exists():
            where = "the folder does not exist"
        elif self._ready(root):
            where = f"the {data} files in `{self._write_dir(root)}` failed torchvision's check"
        else:
            where = f"the {data} files were not found in `{self._write_dir(root)}`"
        if given.exists() and root != given:
            where += f" ({self._why_cache})"
        detail = ""
        if err is not None:
            detail = " ".join(str(err).split())
            detail = detail if len(detail) <= 300 else detail[:297] + "..."
            detail = f"{type(err).__name__}: {detail}"
        if not fetched:
            cause = "`download=False`" + (f" (torchvision: {detail})" if detail else "")
        elif self.download:
            cause = f"the download failed ({detail}); nothing was left behind"
        else:
            cause = f"`download=False` and unpacking the archives failed ({detail})"
        typo = "check the path for a typo; " if not given.exists() else ""
        return RuntimeError(
            f"`{name}(data_dir={str(self.data_dir)!r})`: {where} and {cause}. HINT: {typo}"
            "with network access keep `download=True`; offline, point `data_dir` "
            "(`--data.data_dir` with LightningCLI, `--data_dir` in the examples) to a torchvision "
            f"root that holds {self._layout_hint()} (looked for in `{self._write_dir(root)}`)."
        )

    def _dataset(self, root: Path, train: bool, transform: Any, download: bool) -> Any:
        if self._ready(root):
            fetch = download  # torchvision verifies; it downloads again only what is corrupt
        else:
            fetch = download or self._archives_intact(root)  # unpacking needs no network
            if not fetch:
                raise self._not_found(root, None, fetched=False)
        # what downloading or unpacking would create, removed again when it fails
        watched = [self._write_dir(root), *self._archives(root), *self._required_files(root)]
        created = {missing for path in watched if (missing := _first_missing(path)) is not None}
        try:
            return self.dataset_class(  # type: ignore[call-arg]
                str(root), train=train, transform=transform, download=fetch
            )
        except (RuntimeError, OSError) as err:  # URLError is an OSError
            if fetch:
                _remove(sorted(created, key=lambda path: len(path.parts)))
            raise self._not_found(root, err, fetched=fetch) from err

    # -- LightningDataModule hooks -------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download (or unpack) once, on local rank zero; torchvision verifies the files."""
        root = self.resolve_root()
        for train in (True, False):
            self._dataset(root, train=train, transform=None, download=self.download)

    def setup(self, stage: str) -> None:
        """Build the train/val split (``fit``, ``validate``) or the test set (``test``, ...)."""
        root = self.resolve_root()
        if stage in ("fit", "validate") and self.train_set is None:
            train_aug = self._dataset(root, True, self.train_transform(), self.download)
            train_eval = (
                train_aug
                if type(self).train_transform is VisionDataModule.train_transform
                else self._dataset(root, True, self.eval_transform(), download=False)
            )
            n = len(train_aug)
            if self.val_size >= n:
                fail(type(self).__name__, "val_size", self.val_size,
                     f"`val_size` < {n}, the size of the training set")  # fmt: skip
            generator = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(n, generator=generator).tolist()
            self.val_set = Subset(train_eval, order[: self.val_size])
            self.train_set = Subset(train_aug, order[self.val_size :])
        if stage in ("test", "predict") and self.test_set is None:
            self.test_set = self._dataset(root, False, self.eval_transform(), self.download)

    def _loader(self, dataset: Dataset[Any] | None, shuffle: bool) -> DataLoader[Any]:
        if dataset is None:
            raise RuntimeError(
                f"`{type(self).__name__}`: the dataset is not set up. HINT: call "
                "`setup('fit')` / `setup('test')` first, or pass the datamodule to the Trainer."
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader[Any]:
        """The training split, shuffled."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        """The validation split (held out of the training set)."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader[Any]:
        """The test set."""
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader[Any]:
        """The test set, for ``Trainer.predict``."""
        return self._loader(self.test_set, shuffle=False)


class _MNISTLike(VisionDataModule):
    dataset_class: ClassVar[type[datasets.MNIST]]
    dims = (1, 28, 28)

    def _raw(self, root: Path) -> Path:
        return root / self.dataset_class.__name__ / "raw"

    def _archives(self, root: Path) -> dict[Path, str]:
        return {self._raw(root) / name: md5 for name, md5 in self.dataset_class.resources}

    def _required_files(self, root: Path) -> list[Path]:
        return [path.with_suffix("") for path in self._archives(root)]

    def _write_dir(self, root: Path) -> Path:
        return self._raw(root)

    def _layout_hint(self) -> str:
        return f"`{self.dataset_class.__name__}/raw/*.gz`"


class MNISTDataModule(_MNISTLike):
    """MNIST (60k train, 10k test, 1x28x28), normalised with mean 0.1307 and std 0.3081.

    ``val_size`` training samples, drawn by a seeded permutation, validate.

    See [`VisionDataModule`][lightning_sparsity.data.VisionDataModule] for the arguments.

    Example::

        >>> dm = MNISTDataModule(data_dir="data", batch_size=64)
        >>> dm.num_classes, dm.dims
        (10, (1, 28, 28))
    """

    dataset_class = datasets.MNIST
    mean = (0.1307,)
    std = (0.3081,)


class FashionMNISTDataModule(_MNISTLike):
    """Fashion-MNIST (60k train, 10k test, 1x28x28), normalised with mean 0.2860 and std 0.3530.

    See [`VisionDataModule`][lightning_sparsity.data.VisionDataModule] for the arguments.
    """

    dataset_class = datasets.FashionMNIST
    mean = (0.2860,)
    std = (0.3530,)


class CIFAR10DataModule(VisionDataModule):
    """CIFAR-10 (50k train, 10k test, 3x32x32), normalised per channel.

    The training split is augmented with a random 32x32 crop of the 4-pixel zero-padded image and
    a horizontal flip; validation and test are not.

    See [`VisionDataModule`][lightning_sparsity.data.VisionDataModule] for the arguments.
    """

    dataset_class = datasets.CIFAR10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    dims = (3, 32, 32)

    def train_transform(self) -> Any:
        """Random crop of the 4-pixel zero-padded image, horizontal flip, normalisation."""
        return transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )

    def _required_files(self, root: Path) -> list[Path]:
        cls = datasets.CIFAR10
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return [root / cls.base_folder / name for name in names]

    def _archives(self, root: Path) -> dict[Path, str]:
        return {root / datasets.CIFAR10.filename: datasets.CIFAR10.tgz_md5}

    def _write_dir(self, root: Path) -> Path:
        return root

    def _layout_hint(self) -> str:
        return "`cifar-10-batches-py/` or `cifar-10-python.tar.gz`"


_DATAMODULES: dict[str, type[VisionDataModule]] = {
    "mnist": MNISTDataModule,
    "fashion-mnist": FashionMNISTDataModule,
    "cifar10": CIFAR10DataModule,
}


def build_datamodule(name: str, **kwargs: Any) -> VisionDataModule:
    """Build a datamodule by name: ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"``.

    Case, ``-`` and ``_`` are ignored; ``kwargs`` go to the datamodule.

    Raises:
        ValueError: an unknown name (the valid ones are listed).

    Example::

        >>> type(build_datamodule("FashionMNIST", batch_size=32)).__name__
        'FashionMNISTDataModule'
    """

    def norm(text: str) -> str:
        return text.lower().replace("-", "").replace("_", "")

    for key, cls in _DATAMODULES.items():
        if norm(str(name)) == norm(key):
            return cls(**kwargs)
    fail("build_datamodule", "name", name, f"one of {list(_DATAMODULES)}")
