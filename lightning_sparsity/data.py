"""LightningDataModules for MNIST, Fashion-MNIST and CIFAR-10 over torchvision's own datasets.

This is the only module of the package that imports torchvision.

A read-only ``data_dir`` (a shared offline copy) is handled: torchvision unpacks archives next to
them, so when ``data_dir`` holds the archives but is not unpacked and not writable, the archives
are copied to ``cache_dir`` and that copy is used.
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

DEFAULT_CACHE_DIR = "~/.cache/lightning_sparsity"


def _is_writable(path: Path) -> bool:
    """Whether files can be created at ``path`` (or at its nearest existing ancestor).

    The permission bits are read as well as ``os.access``: root passes ``os.access`` on a directory
    marked read-only (``r-x``), and such a directory is a shared copy that must not be written.
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return os.access(existing, os.W_OK) and bool(existing.stat().st_mode & 0o222)


class VisionDataModule(pl.LightningDataModule):
    """Base class: a torchvision dataset, a seeded train/val split of its training set, and the
    test set. Subclasses set the dataset class, the normalisation and the augmentation.

    Args:
        data_dir: torchvision root (the folder that holds ``MNIST/``, ``cifar-10-batches-py/``...).
        batch_size: samples per batch for every split.
        num_workers: DataLoader worker processes.
        val_size: samples of the training set held out for validation.
        seed: seed of the train/val split.
        download: download the dataset when it is not under ``data_dir``.
        cache_dir: where the archives of a read-only ``data_dir`` are copied to be unpacked.

    Raises:
        ValueError: a size below its minimum, a ``val_size`` not smaller than the training set.
        TypeError: a size that is not an int.
        RuntimeError: the dataset is neither under ``data_dir`` nor downloadable (the message
            says where it was looked for and how to provide it).
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
        cache_dir: str | Path = DEFAULT_CACHE_DIR,
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
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"`{type(self).__name__}({arg}={value!r})`: expected an int, "
                    f"got {type(value).__name__}."
                )
            if value < low:
                raise ValueError(
                    f"`{type(self).__name__}({arg}={value!r})`: expected `{arg}` >= {low}, "
                    f"got {value}."
                )
        self.save_hyperparameters()
        self.train_set: Dataset[Any] | None = None
        self.val_set: Dataset[Any] | None = None
        self.test_set: Dataset[Any] | None = None
        self._announced: Path | None = None

    # -- what a subclass describes -------------------------------------------------------------
    def _required_files(self, root: Path) -> list[Path]:
        """Files torchvision reads without writing anything."""
        raise NotImplementedError

    def _archives(self, root: Path) -> list[Path]:
        """Archives torchvision unpacks (next to themselves) when the files above are missing."""
        raise NotImplementedError

    def _write_dir(self, root: Path) -> Path:
        """The folder torchvision writes into when it unpacks or downloads."""
        raise NotImplementedError

    def _layout_hint(self) -> str:
        raise NotImplementedError

    def train_transform(self) -> Any:
        return self.eval_transform()

    def eval_transform(self) -> Any:
        return transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        )

    # -- where the data is ---------------------------------------------------------------------
    def _ready(self, root: Path) -> bool:
        return all(path.is_file() for path in self._required_files(root))

    def resolve_root(self) -> Path:
        """The torchvision root to use: ``data_dir``, or ``cache_dir`` when ``data_dir`` is
        read-only and not unpacked (its archives, if any, are copied there first)."""
        root = Path(self.data_dir).expanduser().resolve()
        if self._ready(root) or _is_writable(self._write_dir(root)):
            return root
        cache = Path(self.cache_dir).expanduser().resolve()
        archives = [path for path in self._archives(root) if path.is_file()]
        for src in archives:
            dest = cache / src.relative_to(root)
            if not dest.is_file() or dest.stat().st_size != src.stat().st_size:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)  # copyfile: not the read-only mode bits
        if self._announced == cache:
            pass
        elif archives:
            rank_zero_info(
                f"{type(self).__name__}: `{root}` is read-only and torchvision unpacks next to the "
                f"archives: using a copy of them in `{cache}` (set `cache_dir` to change it)."
            )
        else:
            rank_zero_info(
                f"{type(self).__name__}: `{root}` is read-only: using `{cache}` (set `cache_dir` "
                "to change it)."
            )
        self._announced = cache
        return cache

    def _not_found(self, root: Path, err: Exception | None) -> RuntimeError:
        name = type(self).__name__
        looked = f"`{self._write_dir(root)}`"
        given = Path(self.data_dir).expanduser().resolve()
        if root != given:
            looked += f" (`data_dir={str(given)!r}` is read-only, so its copy in `cache_dir`)"
        if err is None:
            cause = "`download=False`"
        else:
            detail = " ".join(str(err).split())
            detail = detail if len(detail) <= 300 else detail[:297] + "..."
            cause = f"the download failed ({type(err).__name__}: {detail})"
        return RuntimeError(
            f"`{name}(data_dir={str(self.data_dir)!r})`: the {self.dataset_class.__name__} files "
            f"were not found in {looked} and {cause}. HINT: with network access keep "
            "`download=True`; offline, point `data_dir` (`--data.data_dir` with LightningCLI, "
            f"`--data_dir` in the examples) to a torchvision root that holds {self._layout_hint()}."
        )

    def _dataset(self, root: Path, train: bool, transform: Any, download: bool) -> Any:
        if not download and not self._ready(root):
            raise self._not_found(root, None)
        try:
            return self.dataset_class(  # type: ignore[call-arg]
                str(root), train=train, transform=transform, download=download
            )
        except (RuntimeError, OSError) as err:  # URLError is an OSError
            raise self._not_found(root, err) from err

    # -- LightningDataModule hooks -------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download (or unpack) once, on local rank zero; torchvision verifies the files."""
        root = self.resolve_root()
        for train in (True, False):
            self._dataset(root, train=train, transform=None, download=self.download)

    def setup(self, stage: str) -> None:
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
                raise ValueError(
                    f"`{type(self).__name__}(val_size={self.val_size})`: expected `val_size` < "
                    f"{n}, the size of the training set."
                )
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
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.test_set, shuffle=False)


class _MNISTLike(VisionDataModule):
    dataset_class: ClassVar[type[datasets.MNIST]]
    dims = (1, 28, 28)

    def _raw(self, root: Path) -> Path:
        return root / self.dataset_class.__name__ / "raw"

    def _archives(self, root: Path) -> list[Path]:
        return [self._raw(root) / name for name, _ in self.dataset_class.resources]

    def _required_files(self, root: Path) -> list[Path]:
        return [path.with_suffix("") for path in self._archives(root)]

    def _write_dir(self, root: Path) -> Path:
        return self._raw(root)

    def _layout_hint(self) -> str:
        return f"`{self.dataset_class.__name__}/raw/*.gz`"


class MNISTDataModule(_MNISTLike):
    """MNIST (60k train, 10k test, 1x28x28), normalised with mean 0.1307 and std 0.3081;
    ``val_size`` training samples, drawn by a seeded permutation, validate.

    See :class:`VisionDataModule` for the arguments.

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

    See :class:`VisionDataModule` for the arguments.
    """

    dataset_class = datasets.FashionMNIST
    mean = (0.2860,)
    std = (0.3530,)


class CIFAR10DataModule(VisionDataModule):
    """CIFAR-10 (50k train, 10k test, 3x32x32), normalised per channel; the training split is
    augmented with a random 32x32 crop of the 4-pixel zero-padded image and a horizontal flip,
    validation and test are not.

    See :class:`VisionDataModule` for the arguments.
    """

    dataset_class = datasets.CIFAR10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    dims = (3, 32, 32)

    def train_transform(self) -> Any:
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

    def _archives(self, root: Path) -> list[Path]:
        return [root / datasets.CIFAR10.filename]

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
    """Build a datamodule by name: ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"``
    (case, ``-`` and ``_`` are ignored).

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
    raise ValueError(
        f"`build_datamodule(name={name!r})`: unknown dataset, expected one of {list(_DATAMODULES)}."
    )
