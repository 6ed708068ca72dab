"""Save a pruned model as tensors plus plain widths, and load it back into a freshly built model.

The file is a plain ``dict`` that ``torch.load(path, weights_only=True)`` opens (no pickled
classes, so no code runs on load)::

    {"format": "lightning_sparsity.pruned", "version": 1,
     "pruned_widths": {...},      # see lightning_sparsity.pruning.widths
     "state_dict": {name: tensor},
     "metadata": {...}}           # plain values given by the caller

The Lightning checkpoint written by [`PrunedExport`][lightning_sparsity.PrunedExport] carries the
same
``pruned_widths`` and ``state_dict`` keys, so [`load_pruned`][lightning_sparsity.load_pruned] reads
it too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_sparsity.pruning.widths import describe_inputs, describe_widths, reshape_to_widths

FILE_FORMAT = "lightning_sparsity.pruned"
FILE_VERSION = 1
WIDTHS_KEY = "pruned_widths"


def to_plain(value: Any, where: str) -> Any:
    """A copy of ``value`` that ``torch.load(weights_only=True)`` reads with no pickled class.

    Keeps None, bool, int, float, str, tensors (moved to the CPU), lists, tuples and dicts with
    string keys; subclasses of these (an ``AttributeDict``, an ``IntEnum``, ``numpy.float64``, a
    namedtuple) become the plain base type.

    Raises:
        TypeError: naming ``where`` and the key path of a value of any other type.

    Example::

        >>> to_plain({"lr": 0.1, "sizes": (3, 4)}, "metadata")
        {'lr': 0.1, 'sizes': (3, 4)}
    """
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, str):
        return str.__str__(value)  # the characters, without the subclass (a str Enum: its value)
    if isinstance(value, int):
        return int.__index__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, (list, tuple)):
        items = [to_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: expected string keys, got {key!r}")
            out[str.__str__(key)] = to_plain(item, f"{where}[{key!r}]")
        return out
    raise TypeError(
        f"{where}: expected plain data (None, bool, int, float, str, tensor, list, tuple, dict), "
        f"got `{type(value).__name__}`. HINT: store its repr() or its plain fields instead"
    )


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` as a plain dict of compact, detached CPU tensors.

    A clone never drags a sliced parent's whole storage into the file.
    """
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[Path], None],
    check: Callable[[Path], object] | None = None,
) -> Path:
    """Write a file so that ``path`` never holds a half-written or unchecked file.

    ``write`` fills a temporary file in the same directory, ``check`` (if given) reads it back and
    raises if it is wrong, then the file is flushed to disk and renamed onto ``path``
    (``os.replace``, atomic on POSIX and Windows). On any error the temporary file is removed and
    ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # the temporary keeps the suffix: some writers and readers (torch.export) insist on it
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        umask = os.umask(0)  # mkstemp made it 0600: give it the mode a plain open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # persist the rename; not possible on every platform
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return target


def save_pruned(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
) -> Path:
    """Write ``model``'s weights and layer widths to ``path`` (atomically).

    Args:
        model: a pruned model (typically from [`prune_model`][lightning_sparsity.prune_model]).
        path: the file to write; its directory is created if needed.
        metadata: optional plain data stored beside the weights (e.g. the size report's
            ``to_dict()``).
        example_inputs: optional inputs of ``model``; their shapes (batch 1) and dtypes are
            stored so that [`load_pruned`][lightning_sparsity.load_pruned] can check with a forward
            pass that the widths of
            coupled layers agree.

    Returns:
        The written path.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``metadata`` is not plain data.

    Example::

        >>> import tempfile, torch
        >>> from torch import nn
        >>> pruned = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 3))
        >>> path = save_pruned(pruned, tempfile.mkdtemp() + "/net.pt")
        >>> torch.load(path, weights_only=True)["pruned_widths"]["modules"]["0"]
        {'class': 'Linear', 'in_features': 4, 'out_features': 2}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`save_pruned(model=...)`: expected an nn.Module, got {type(model).__name__}"
        )
    meta = to_plain(dict(metadata or {}), "`save_pruned(metadata=...)`")
    payload = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        WIDTHS_KEY: describe_widths(
            model, None if example_inputs is None else describe_inputs(example_inputs)
        ),
        "state_dict": cpu_state_dict(model),
        "metadata": meta,
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read_checkpoint(path: str | os.PathLike[str], *, owner: str = "load_pruned") -> dict[str, Any]:
    """Open a pruned file or pruned Lightning checkpoint with ``weights_only=True``.

    Its layout is checked: a dict with ``pruned_widths`` and a ``state_dict`` of tensors.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is unreadable, truncated, holds pickled code, or is not a pruned
            checkpoint; the message names the path and what was expected.
    """
    where = f"`{owner}(path={str(path)!r})`"
    expected = (
        "a pruned model written by `save_pruned` or a checkpoint written by `PrunedExport` "
        f"(a dict with {WIDTHS_KEY!r} and 'state_dict')"
    )
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... per damage
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{where}: expected {expected}, but `torch.load(weights_only=True)` refused the file "
            f"({type(err).__name__}: {reason}). HINT: a truncated or foreign file, or one that "
            "would run pickled code; it was not executed"
        ) from err
    if not isinstance(obj, Mapping) or WIDTHS_KEY not in obj:
        got = (
            f"a dict with keys {sorted(map(str, obj))[:8]}"
            if isinstance(obj, Mapping)
            else (f"a {type(obj).__name__}")
        )
        hint = (
            " HINT: this looks like a plain state_dict; it has no widths, load it with "
            "`model.load_state_dict` into a model of the right widths"
            if isinstance(obj, Mapping)
            and obj
            and all(isinstance(v, torch.Tensor) for v in obj.values())
            else ""
        )
        raise ValueError(f"{where}: expected {expected}, got {got}.{hint}")
    if "format" in obj and (obj.get("format") != FILE_FORMAT or obj.get("version") != FILE_VERSION):
        raise ValueError(
            f"{where}: expected format {FILE_FORMAT!r} version {FILE_VERSION}, got "
            f"{obj.get('format')!r} version {obj.get('version')!r}"
        )
    if not isinstance(obj.get("state_dict"), Mapping):
        raise ValueError(f"{where}: expected {expected}, but it has no 'state_dict' mapping")
    return dict(obj)


def load_pruned(path: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Shrink a freshly built ``model`` to the widths saved in ``path`` and load the saved weights.

    ``model`` is of the original architecture; the result computes what the saved pruned model did.

    ``model`` is modified in place and returned, but only after every check passed: the file is
    opened with ``weights_only=True``, its format tag, that every saved module exists in ``model``
    with the saved class, that every width is a positive int no larger than ``model``'s, that groups
    divide channels, and that every tensor's shape and every key matches. On any error ``model``
    is left exactly as it was. Layers whose width changes are replaced by new modules of the same
    class, dtype and device, so references to the old layer objects no longer point into ``model``.

    Also reads the ``.ckpt`` written by [`PrunedExport`][lightning_sparsity.PrunedExport] into a
    freshly
    built LightningModule.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a pruned checkpoint, or its widths or tensors do not fit
            ``model`` (the message names the path, the module and the rule).
        TypeError: ``model`` is not an ``nn.Module``.

    Example::

        >>> import tempfile
        >>> from torch import nn
        >>> pruned = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 3))
        >>> path = save_pruned(pruned, tempfile.mkdtemp() + "/net.pt")
        >>> fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> load_pruned(path, fresh)[0]
        Linear(in_features=4, out_features=2, bias=True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`load_pruned(model=...)`: expected an nn.Module, got {type(model).__name__}"
        )
    checkpoint = read_checkpoint(path)
    state_dict = checkpoint["state_dict"]
    try:
        reshape_to_widths(model, checkpoint[WIDTHS_KEY], state_dict, strict=True)
    except ValueError as err:
        raise ValueError(
            f"`load_pruned(path={str(path)!r}, model={type(model).__name__})`: {err}. "
            "The model was not modified."
        ) from err
    model.load_state_dict(state_dict, strict=True)
    return model


def remove_stale_temporaries(dirpath: Path, filename: str) -> list[Path]:
    """Delete the temporary files of ``filename.*`` that a killed `atomic_write` left.

    Returns the deleted files (those in ``dirpath``).
    """
    if not dirpath.is_dir():
        return []
    stale = [p for p in dirpath.glob(f".{filename}.*.tmp*") if p.is_file()]
    for path in stale:
        path.unlink()
    return stale
