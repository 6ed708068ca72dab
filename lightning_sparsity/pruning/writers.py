"""Write a pruned network to files, each checked before it is in place (no Lightning import).

The Lightning checkpoint format (``"ckpt"``) is written by
[`PrunedExport`][lightning_sparsity.PrunedExport]; the others are here.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_sparsity.pruning.deploy import (
    assert_outputs_close,
    run_outputs,
    save_onnx,
    save_pt2,
)
from lightning_sparsity.pruning.serialization import load_pruned, save_pruned
from lightning_sparsity.validation import fail

#: An export format.
Format = Literal["ckpt", "pt", "pt2", "onnx"]
#: format -> file suffix. "ckpt": Lightning checkpoint of the whole pruned LightningModule;
#: "pt": `save_pruned` file of the pruned network; "pt2": torch.export program; "onnx": ONNX.
FORMATS: dict[str, str] = {"ckpt": ".ckpt", "pt": ".pt", "pt2": ".pt2", "onnx": ".onnx"}


def check_formats(formats: Any, *, owner: str) -> tuple[str, ...]:
    """A non-empty tuple of distinct `FORMATS` keys (a list is accepted).

    Example::

        >>> check_formats(["ckpt", "pt2"], owner="PrunedExport")
        ('ckpt', 'pt2')
    """
    if isinstance(formats, str) or not isinstance(formats, list | tuple):
        fail(
            owner,
            "formats",
            formats,
            "a tuple or list of format names",
            got=type(formats).__name__,
            hint=f"`formats=({formats!r},)`",
            error=TypeError,
        )
    formats = tuple(formats)
    if not formats:
        fail(
            owner,
            "formats",
            formats,
            f"at least one of {list(FORMATS)}",
            got="none",
            hint="remove the callback to export nothing",
        )
    for fmt in formats:
        if fmt not in FORMATS:
            fail(owner, "formats", formats, f"formats among {list(FORMATS)}", got=repr(fmt))
    if len(set(formats)) != len(formats):
        fail(owner, "formats", formats, "each format once")
    return formats


def check_destination(dirpath: Any, filename: Any, *, owner: str) -> None:
    """Raise unless ``dirpath`` is a path or ``None`` and ``filename`` a bare file name."""
    if dirpath is not None and not isinstance(dirpath, str | os.PathLike):
        fail(
            owner,
            "dirpath",
            dirpath,
            "a path or None",
            got=type(dirpath).__name__,
            error=TypeError,
        )
    if not isinstance(filename, str):
        fail(
            owner,
            "filename",
            filename,
            "a str",
            got=type(filename).__name__,
            error=TypeError,
        )
    if not filename or os.sep in filename or "/" in filename:
        fail(
            owner,
            "filename",
            filename,
            "a non-empty file name without directories",
            hint="put the directory in `dirpath`.",
        )


def write_network(
    fmt: str,
    pruned: nn.Module,
    network: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    *,
    metadata: dict[str, Any],
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    dynamic_batch: bool = True,
    owner: str = "PrunedExport",
) -> Path:
    """Write ``pruned`` as ``"pt"``, ``"pt2"`` or ``"onnx"`` at ``path``, atomically.

    With ``verify``, the file is reloaded (``"pt"``: into a copy of the full-width ``network``;
    ``"pt2"``/``"onnx"``: by their own runtimes) and its outputs compared with ``pruned``'s.
    """
    options: dict[str, Any] = {
        "dynamic_batch": dynamic_batch,
        "verify": verify,
        "rtol": rtol,
        "atol": atol,
    }
    if fmt == "pt2":
        return save_pt2(pruned, example, path, **options)
    if fmt == "onnx":
        return save_onnx(pruned, example, path, **options)
    written = save_pruned(pruned, path, metadata=metadata, example_inputs=example)
    if verify:
        loaded = load_pruned(path, copy.deepcopy(network)).eval()
        check_outputs(pruned, loaded, example, path, rtol=rtol, atol=atol, owner=owner)
    return written


def check_outputs(
    expected: nn.Module | Sequence[torch.Tensor],
    got: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    *,
    rtol: float,
    atol: float,
    owner: str,
) -> None:
    """Raise unless ``got``'s outputs on ``example`` equal ``expected``'s (a module or outputs)."""
    want = run_outputs(expected, example) if isinstance(expected, nn.Module) else list(expected)
    assert_outputs_close(
        want,
        run_outputs(got, example),
        what=f"`{owner}` reloading {str(path)!r}",
        rtol=rtol,
        atol=atol,
    )
