"""Shared fixtures: the offline MNIST / Fashion-MNIST copies, a scratch data cache, seeding."""

from __future__ import annotations

import gzip
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# the shared helpers (tests/_shared.py): importable by name under --import-mode=importlib
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _shared_data() -> Path | None:
    """The raw MNIST archives: $LIGHTNING_SPARSITY_DATA, else ../shared/data beside the repo."""
    for candidate in (os.environ.get("LIGHTNING_SPARSITY_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No test writes into the real ``~/.cache/lightning_sparsity``.

    ``$LIGHTNING_SPARSITY_CACHE`` (read by the datamodules when ``cache_dir`` is not given) points
    at a scratch folder for the whole session, subprocesses included.
    """
    cache = tmp_path_factory.mktemp("data_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LIGHTNING_SPARSITY_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable torchvision root holding MNIST and Fashion-MNIST, archives and unpacked files.

    The archives are copied from the offline copy and unpacked here, so the datamodules use the
    root as is.
    """
    source = _shared_data()
    if source is None:
        pytest.skip("no offline MNIST copy: set LIGHTNING_SPARSITY_DATA to a torchvision root")
    root = tmp_path_factory.mktemp("data")
    for name in ("MNIST", "FashionMNIST"):
        if (source / name).is_dir():
            shutil.copytree(source / name, root / name)
    # copytree keeps the source's read-only mode bits: make the copy writable for real
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    for archive in root.glob("*/raw/*.gz"):  # what torchvision's download=True would unpack
        with gzip.open(archive, "rb") as src, open(archive.with_suffix(""), "wb") as dest:
            shutil.copyfileobj(src, dest)
    return root


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
