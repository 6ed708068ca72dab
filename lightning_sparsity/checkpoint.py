"""Pruned Lightning checkpoints: a loading mixin, and the writer of such a checkpoint.

The mixin reshapes a LightningModule to the widths stored in a checkpoint before Lightning loads the
weights.

Lightning calls ``LightningModule.on_load_checkpoint(checkpoint)`` after building the module from
its hyper-parameters and *before* ``load_state_dict``; that is the one place where a freshly built,
full-width module can be shrunk so that the pruned weights fit (a ``Callback.on_load_checkpoint``
runs too late).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_sparsity.pruning.serialization import (
    WIDTHS_KEY,
    atomic_write,
    cpu_state_dict,
    read_checkpoint,
    to_plain,
)
from lightning_sparsity.pruning.widths import describe_widths, reshape_to_widths


class PrunedCheckpointMixin(pl.LightningModule):
    """Let ``MyModule.load_from_checkpoint(path)`` load a physically pruned checkpoint.

    Put it first among the bases: ``class MyModule(PrunedCheckpointMixin, pl.LightningModule)``
    (or mix it into a subclass of your module). If you override ``on_load_checkpoint`` or
    ``on_save_checkpoint`` yourself, call ``super()`` in them.

    - ``on_load_checkpoint``: when the checkpoint holds ``"pruned_widths"``, checks them against
      this freshly built module (every module exists with the saved class, widths positive and no
      larger than the module's, tensor shapes match) and replaces the layers whose width differs by
      new ones of the same class, dtype and device. Lightning then loads the weights
      (``strict=True`` by default). A checkpoint without widths loads as usual.
    - ``on_save_checkpoint``: stores the current widths, so the checkpoints written while
      fine-tuning a pruned module (``ModelCheckpoint``) load the same way, and
      ``Trainer.fit(MyModule(...), ckpt_path=...)`` resumes such a fine-tuning run.

    The checkpoint written by [`PrunedExport`][lightning_sparsity.PrunedExport] holds no optimizer
    state
    (the pruned shapes differ from the trained ones): fine-tune it with
    ``trainer.fit(MyModule.load_from_checkpoint(path))``, not with ``ckpt_path=``.

    Raises:
        ValueError: from ``load_from_checkpoint``, when the stored widths do not fit the module;
            the module is then unchanged.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> class Net(PrunedCheckpointMixin):
        ...     def __init__(self, hidden: int = 8):
        ...         super().__init__()
        ...         self.save_hyperparameters()
        ...         self.model = nn.Sequential(nn.Linear(4, hidden), nn.Linear(hidden, 2))
        ...     def forward(self, x):
        ...         return self.model(x)
        >>> net = Net()
        >>> net.model[0] = nn.Linear(4, 3); net.model[1] = nn.Linear(3, 2)  # pruned by hand
        >>> import tempfile; path = tempfile.mkdtemp() + "/pruned.ckpt"
        >>> _ = save_pruned_checkpoint(net, path)
        >>> Net.load_from_checkpoint(path).model[0]
        Linear(in_features=4, out_features=3, bias=True)
    """

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Lightning's ``load_from_checkpoint``, with ``torch.load(weights_only=True)`` by default.

        Only ``weights_only=False`` passed explicitly (for a file you trust) turns the protection
        off: the environment variable ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot. A file that
        ``torch.load`` refuses (pickled code, truncated, not a checkpoint) raises a ValueError
        naming it; no code from it ran.
        """
        safe = True if weights_only is None else weights_only
        try:
            return super().load_from_checkpoint(
                checkpoint_path,
                map_location=map_location,
                hparams_file=hparams_file,
                strict=strict,
                weights_only=safe,
                **kwargs,
            )
        except Exception as err:
            if not _raised_by_torch_load(err):
                raise
            text = str(err).strip()
            reason = (text.splitlines()[-1] if "Weights only" in text else text.split("\n")[0])[
                :300
            ]
            raise ValueError(
                f"`{cls.__name__}.load_from_checkpoint({str(checkpoint_path)!r})`: "
                f"`torch.load(weights_only={safe})` refused the file ({type(err).__name__}: "
                f"{reason or 'empty'}). HINT: a truncated or foreign file, or one that would run "
                "pickled code; it was not executed"
            ) from err

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also store the module's widths, so that loading can reshape a fresh module."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[WIDTHS_KEY] = describe_widths(self, getattr(self, "_pruned_inputs", None))

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Reshape this module to the checkpoint's pruned widths before Lightning loads weights."""
        widths = checkpoint.get(WIDTHS_KEY)
        trainer = getattr(self, "_trainer", None)
        fitting = getattr(getattr(trainer, "state", None), "fn", None) == "fit"
        if widths is not None and fitting and "optimizer_states" not in checkpoint:
            raise RuntimeError(
                f"`Trainer.fit(ckpt_path=...)` was given a pruned export of "
                f"`{type(self).__name__}`, which holds the pruned weights but no optimizer or loop "
                "state to resume (the trained moments do not fit the smaller shapes). HINT: "
                f"`module = {type(self).__name__}.load_from_checkpoint(path)`, then "
                "`trainer.fit(module)` to fine-tune it"
            )
        if widths is not None and not isinstance(checkpoint.get("state_dict"), dict):
            raise ValueError(
                f"`{type(self).__name__}.load_from_checkpoint`: the checkpoint has pruned widths "
                "but no 'state_dict' dict of tensors. The module was not modified. HINT: a "
                "damaged or hand-edited file; export it again"
            )
        if widths is not None:
            try:
                reshape_to_widths(self, widths, checkpoint.get("state_dict", {}), strict=False)
                if isinstance(widths, dict) and widths.get("inputs") is not None:
                    self._pruned_inputs = widths["inputs"]
            except ValueError as err:
                raise ValueError(
                    f"`{type(self).__name__}.load_from_checkpoint`: the checkpoint's pruned widths "
                    f"do not fit this module: {err}. The module was not modified. HINT: build it "
                    "with the hyper-parameters of the model that was pruned"
                ) from err
        super().on_load_checkpoint(checkpoint)


def _raised_by_torch_load(err: BaseException) -> bool:
    """Whether ``err`` came out of ``torch.load`` (reading the file).

    That is, not out of building or loading the module afterwards.
    """
    serialization = os.path.join("torch", "serialization.py")
    return any(
        frame.f_code.co_filename.endswith(serialization)
        for frame, _ in traceback.walk_tb(err.__traceback__)
    )


def _plain_hparams(module: pl.LightningModule) -> dict[str, Any]:
    plain: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in dict(module.hparams).items():
        try:
            plain[key] = to_plain(value, key)
        except TypeError:
            dropped.append(key)
    if dropped:
        rank_zero_warn(
            f"Pruned checkpoint: hyper-parameters {dropped} are not plain data (e.g. an nn.Module) "
            "and were left out so that `torch.load(weights_only=True)` opens the file. Pass them "
            f"again when loading: `{type(module).__name__}.load_from_checkpoint(path, "
            f"{dropped[0]}=...)`. HINT: `self.save_hyperparameters(ignore={dropped!r})` silences "
            "this."
        )
    return plain


def pruned_checkpoint(
    module: pl.LightningModule,
    *,
    epoch: int = 0,
    global_step: int = 0,
    metadata: dict[str, Any] | None = None,
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Lightning checkpoint dict for a pruned ``module``.

    It holds ``state_dict`` (CPU tensors), ``hyper_parameters`` (plain ones only),
    ``pytorch-lightning_version``, ``epoch``, ``global_step``, ``pruned_widths`` and
    ``pruned_metadata``; no optimizer or loop state and no pickled class. The module's own
    ``on_save_checkpoint`` is not called (it may need a Trainer). ``inputs``
    ([`describe_inputs`][lightning_sparsity.pruning.widths.describe_inputs]) lets loading check with
    a forward
    pass that coupled widths agree.
    """
    checkpoint: dict[str, Any] = {
        "epoch": int(epoch),
        "global_step": int(global_step),
        "pytorch-lightning_version": pl.__version__,
        "state_dict": cpu_state_dict(module),
        WIDTHS_KEY: describe_widths(module, inputs),
        "pruned_metadata": to_plain(dict(metadata or {}), "metadata"),
    }
    if module.hparams:
        checkpoint[module.CHECKPOINT_HYPER_PARAMS_KEY] = _plain_hparams(module)
        # Lightning's own checkpoints store this too: the name of a single dict/Namespace argument
        # given to `save_hyperparameters`, which `load_from_checkpoint` needs to rebuild the call.
        hparams_name = getattr(module, "_hparams_name", None)
        if isinstance(hparams_name, str):
            checkpoint[module.CHECKPOINT_HYPER_PARAMS_NAME] = hparams_name
    return checkpoint


def save_pruned_checkpoint(
    module: pl.LightningModule,
    path: str | os.PathLike[str],
    *,
    epoch: int = 0,
    global_step: int = 0,
    metadata: dict[str, Any] | None = None,
    inputs: dict[str, Any] | None = None,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write [`pruned_checkpoint`][lightning_sparsity.checkpoint.pruned_checkpoint] atomically.

    It writes ``module``'s checkpoint to ``path``.

    That is done after checking that the temporary file opens with ``torch.load(weights_only=True)``
    as a pruned checkpoint.

    Load it with ``MyModule.load_from_checkpoint(path)`` (``MyModule`` mixes in
    [`PrunedCheckpointMixin`][lightning_sparsity.PrunedCheckpointMixin]) or ``load_pruned(path,
    MyModule(...))``.

    ``inputs``: see [`pruned_checkpoint`][lightning_sparsity.checkpoint.pruned_checkpoint];
    ``check``: a further check of the temporary file
    (e.g. reload it and compare outputs) before it replaces ``path``.

    Raises:
        TypeError: ``module`` is not a LightningModule, or ``metadata`` is not plain data.
    """
    if not isinstance(module, pl.LightningModule):
        raise TypeError(
            f"`save_pruned_checkpoint(module=...)`: expected a LightningModule, got "
            f"{type(module).__name__}. HINT: use `save_pruned` for a plain nn.Module"
        )
    checkpoint = pruned_checkpoint(
        module, epoch=epoch, global_step=global_step, metadata=metadata, inputs=inputs
    )

    def check_file(tmp: Path) -> None:
        read_checkpoint(tmp, owner="save_pruned_checkpoint")
        if check is not None:
            check(tmp)

    return atomic_write(path, lambda tmp: torch.save(checkpoint, tmp), check=check_file)
