"""Export the physically pruned network at the end of training."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_sparsity.callbacks._order import OrderedCallback
from lightning_sparsity.callbacks._runtime import log_report, refuse_sharded_strategy
from lightning_sparsity.checkpoint import PrunedCheckpointMixin, save_pruned_checkpoint
from lightning_sparsity.pruning.deploy import as_args, missing_onnx_packages, run_outputs
from lightning_sparsity.pruning.serialization import load_pruned, remove_stale_temporaries
from lightning_sparsity.pruning.widths import describe_inputs
from lightning_sparsity.pruning.writers import (
    FORMATS,
    Format,
    check_destination,
    check_formats,
    check_outputs,
    write_network,
)
from lightning_sparsity.selection import batch_input, network_name, select_layers
from lightning_sparsity.validation import check_bool, check_float, fail

_OWNER = "PrunedExport"


class PrunedExport(OrderedCallback):
    """At the end of training, remove every dead channel and write the smaller model.

    On global rank zero (the other ranks wait): prunes a CPU copy of the network with
    [`prune_model`][lightning_sparsity.prune_model] (outputs checked against the trained network),
    writes
    each format to ``dirpath/filename.<suffix>`` atomically (a checked temporary file, then
    renamed) and logs the size report. The trained LightningModule is not changed. At the first
    batch it already checks that the network can be analysed and has something to prune.

    Formats: ``"ckpt"``, a Lightning checkpoint of the pruned LightningModule that
    ``torch.load(weights_only=True)`` opens (``MyModule.load_from_checkpoint(path)`` with
    [`PrunedCheckpointMixin`][lightning_sparsity.PrunedCheckpointMixin], else ``load_pruned(path,
    MyModule())``);
    ``"pt"``, [`save_pruned`][lightning_sparsity.save_pruned]; ``"pt2"``, a ``torch.export``
    program;
    ``"onnx"``, checked in ONNX Runtime. The batch size is dynamic in ``pt2`` and ``onnx``.

    Args:
        dirpath: output directory; default ``<trainer.log_dir>/pruned`` (``default_root_dir``
            without a logger).
        filename: file name without suffix.
        formats: a non-empty subset of ``("ckpt", "pt", "pt2", "onnx")``; the default needs no
            extra package (``"onnx"`` needs ``pip install "lightning-sparsity[export]"``).
        example_inputs: a tensor or tuple of tensors the network takes (a couple of samples);
            default ``pl_module.example_input_array``, else two samples of the first batch.
        submodule: the network to prune inside the LightningModule (``""``: the module itself);
            default ``pl_module.model`` when it is an ``nn.Module``, else the module itself.
        verify: check the pruned network against the trained one and every written file against
            the pruned network (ONNX Runtime for ``onnx``).
        rtol: relative tolerance of the checks.
        atol: absolute tolerance of the checks.
        dynamic_batch: export the batch dimension as dynamic (``pt2``, ``onnx``).
        allow_unchanged: when no channel can be removed, export the unchanged network instead
            of raising (``prune_model``'s ValueError says why each dead channel stays).

    Raises:
        ValueError: an unknown or repeated format (the valid ones are listed), no format, a bad
            ``filename``, negative tolerances, an unknown ``submodule``.
        TypeError: arguments of the wrong type.
        ModuleNotFoundError: at ``setup``, ``"onnx"`` requested but ``onnx``/``onnxscript`` (or
            ``onnxruntime`` with ``verify``) not installed.
        TraceError: at the first batch, a network the analysis cannot capture.
        RuntimeError: no example inputs, or a failed check (on every rank: no rank hangs).
        ValueError: nothing to prune (unless ``allow_unchanged``).

    Hooks used:
        ``setup`` (format dependencies, the network), ``on_train_batch_start`` (two samples of
        the first batch as the example; the analysis check), ``on_train_end`` (prune a copy,
        write, log ``export/...`` metrics and the report; after the other sparsity callbacks).

    After fit: ``self.paths`` (format -> written path) and ``self.report`` (the
    [`PruneReport`][lightning_sparsity.PruneReport]).

    Example::

        >>> export = PrunedExport(dirpath="exported", formats=("ckpt", "pt2"))
        >>> export.formats
        ('ckpt', 'pt2')
        >>> PrunedExport(formats=("tflite",))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `PrunedExport(formats=('tflite',))`: expected formats among [...], got 'tflite'.
    """

    #: last: after every other sparsity callback has finished the weights
    RANKS: ClassVar[dict[str, int]] = {"train_end": 90}

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str = "pruned",
        formats: Sequence[Format] = ("ckpt", "pt2"),
        example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
        submodule: str | None = None,
        verify: bool = True,
        rtol: float = 1e-4,
        atol: float = 1e-5,
        dynamic_batch: bool = True,
        allow_unchanged: bool = False,
    ) -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.formats = check_formats(formats, owner=_OWNER)
        self.example_inputs = example_inputs
        self.submodule = submodule
        self.verify = verify
        self.rtol = rtol
        self.atol = atol
        self.dynamic_batch = dynamic_batch
        self.allow_unchanged = allow_unchanged
        self._validate()
        super().__init__()
        self._captured: tuple[torch.Tensor, ...] | None = None
        self._checked = False
        self.paths: dict[str, Path] = {}
        self.report: Any = None

    def _validate(self) -> None:
        check_destination(self.dirpath, self.filename, owner=_OWNER)
        if self.example_inputs is not None:
            as_args(self.example_inputs, _OWNER)
        if self.submodule is not None and not isinstance(self.submodule, str):
            fail(_OWNER, "submodule", self.submodule, "a str or None",
                 got=type(self.submodule).__name__, error=TypeError)  # fmt: skip
        for arg in ("verify", "dynamic_batch", "allow_unchanged"):
            check_bool(getattr(self, arg), owner=_OWNER, arg=arg)
        for arg in ("rtol", "atol"):
            check_float(getattr(self, arg), owner=_OWNER, arg=arg, low=0.0)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded_strategy(trainer, owner=_OWNER)
        self._reset_order()
        self._checked = False
        if "onnx" in self.formats:
            missing = missing_onnx_packages(verify=self.verify)
            if missing:
                raise ModuleNotFoundError(
                    f"`{_OWNER}(formats={self.formats!r})`: the ONNX export needs {missing}, "
                    'which are not installed. HINT: pip install "lightning-sparsity[export]", '
                    "or drop 'onnx' from `formats`"
                )
        self._network_name(pl_module)
        if "ckpt" in self.formats and not isinstance(pl_module, PrunedCheckpointMixin):
            rank_zero_warn(
                f"`{_OWNER}`: `{type(pl_module).__name__}` does not mix in "
                "`PrunedCheckpointMixin`, so `load_from_checkpoint` cannot load the pruned .ckpt "
                f"(`load_pruned(path, {type(pl_module).__name__}(...))` can). HINT: "
                f"`class {type(pl_module).__name__}(PrunedCheckpointMixin, ...)`"
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._capture(pl_module, batch)
        if not self._checked:
            self._checked = True
            self._check_prunable(pl_module)

    def _check_prunable(self, pl_module: pl.LightningModule) -> None:
        """At the first batch, fail now rather than after training on a network it cannot prune.

        That is a network whose every Conv/Linear layer but the output layer lies in a part the
        analysis cannot capture (kept whole), or that has no such layer at all.
        """
        from lightning_sparsity.pruning.export import plan_pruning

        network = pl_module.get_submodule(self._network_name(pl_module))
        plan = plan_pruning(network, self._example(pl_module))  # TraceError: nothing captured
        names = [layer.name for layer in select_layers(network) if not layer.is_output]

        def whole(name: str) -> bool:
            return any(o == "" or name == o or name.startswith(o + ".") for o in plan.opaque)

        if self.allow_unchanged or not all(whole(name) for name in names):
            return
        why = "; ".join(f"`{o or type(network).__name__}`: {r}" for o, r in plan.opaque.items())
        fail(
            _OWNER,
            "allow_unchanged",
            False,
            "a network with at least one Conv/Linear layer whose output channels the export "
            "can remove (the output layer's are the model's outputs)",
            got="none" if not names else f"every one inside a part kept whole ({why})",
            hint="make that forward traceable by torch.fx (move data-dependent branches into a "
            "submodule), or pass `allow_unchanged=True` to export the network unchanged.",
        )

    def _capture(self, pl_module: pl.LightningModule, batch: Any) -> None:
        if self._captured is not None or self.example_inputs is not None:
            return
        if getattr(pl_module, "example_input_array", None) is not None:
            return
        x = batch_input(batch, 2)
        if x is not None:  # two samples: a batch dimension of 1 could be mistaken for a constant
            self._captured = (torch.cat([x, x]) if len(x) == 1 else x,)

    def _train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dirpath = Path(self.dirpath) if self.dirpath is not None else self._default_dir(trainer)
        outcome: tuple[Any, ...] = ("ok", {}, None)
        error: BaseException | None = None
        if trainer.is_global_zero:
            try:
                for stale in remove_stale_temporaries(dirpath, self.filename):
                    rank_zero_info(f"`{_OWNER}`: removed {stale}, left by an interrupted export")
                paths, report = self._export(trainer, pl_module, dirpath)
                outcome = ("ok", paths, report)
            except Exception as err:
                error = err
                outcome = ("error", f"{type(err).__name__}: {err}", None)
        # a sync point: only rank 0 writes, nobody leaves before it is done, all fail together
        outcome = trainer.strategy.broadcast(outcome, src=0)
        if error is not None:
            raise error
        if outcome[0] == "error":
            raise RuntimeError(f"`{_OWNER}` failed on global rank 0: {outcome[1]}")
        self.paths, self.report = outcome[1], outcome[2]

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        """Lightning's key for this callback's state: one per dirpath, filename and formats."""
        return self._generate_state_key(
            dirpath=None if self.dirpath is None else str(self.dirpath),
            filename=self.filename,
            formats=tuple(self.formats),
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        # the example captured from the first batch (two samples, CPU), so that a run resumed
        # after its last batch (a crash during the export) can still export
        return {"captured": None if self._captured is None else list(self._captured)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        captured = state_dict.get("captured")
        if captured is not None and self._captured is None:
            self._captured = tuple(t.detach().to("cpu") for t in captured)

    # ------------------------------------------------------------------ work
    def _default_dir(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir) / "pruned"  # log_dir: all ranks

    def _network_name(self, pl_module: pl.LightningModule) -> str:
        return network_name(pl_module, self.submodule, owner=_OWNER)

    def _example(self, pl_module: pl.LightningModule) -> tuple[torch.Tensor, ...]:
        given = self.example_inputs
        if given is None:
            given = getattr(pl_module, "example_input_array", None)
        if given is None:
            given = self._captured
        if given is None:
            raise RuntimeError(
                f"`{_OWNER}`: no example inputs: none given, no `example_input_array` on the "
                "module, and no tensor in a training batch (no batch ran, or the batch is not a "
                "tensor or a tuple/list starting with one). HINT: pass "
                "`PrunedExport(example_inputs=torch.randn(2, ...))`"
            )
        return tuple(t.detach().to("cpu") for t in as_args(given, _OWNER))

    def _export(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, dirpath: Path
    ) -> tuple[dict[str, Path], Any]:
        from lightning_sparsity.pruning.export import prune_model
        from lightning_sparsity.pruning.report import size_report

        example = self._example(pl_module)
        name = self._network_name(pl_module)
        full = copy.deepcopy(pl_module).cpu().eval()  # the trained module is never touched
        network = full.get_submodule(name)
        pruned = prune_model(
            network,
            example,
            verify=self.verify,
            rtol=self.rtol,
            atol=self.atol,
            allow_unchanged=self.allow_unchanged,
        )
        pruned = pruned.cpu().eval()
        report = size_report(network, pruned, example)
        metadata = {"report": report.to_dict(), "network": name}
        paths: dict[str, Path] = {}
        for fmt in self.formats:
            path = dirpath / f"{self.filename}{FORMATS[fmt]}"
            if fmt == "ckpt":
                module = full if name else pruned
                if name:
                    module.set_submodule(name, pruned)
                if not isinstance(module, pl.LightningModule):
                    raise RuntimeError(
                        f"`{_OWNER}(formats=(..., 'ckpt'))`: pruning returned a "
                        f"`{type(module).__name__}`, not a LightningModule. HINT: set "
                        "`submodule=` to the network inside the LightningModule"
                    )
                paths[fmt] = self._write_ckpt(
                    trainer, pl_module, module, name, example, path, metadata
                )
            else:
                paths[fmt] = write_network(
                    fmt,
                    pruned,
                    network,
                    example,
                    path,
                    metadata=metadata,
                    verify=self.verify,
                    rtol=self.rtol,
                    atol=self.atol,
                    dynamic_batch=self.dynamic_batch,
                )
        log_report(trainer, report, paths, owner=_OWNER)
        return paths, report

    def _write_ckpt(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        module: pl.LightningModule,
        name: str,
        example: tuple[torch.Tensor, ...],
        path: Path,
        metadata: dict[str, Any],
    ) -> Path:
        expected = run_outputs(module.get_submodule(name), example)

        def reload(tmp: Path) -> None:  # into a full-width copy of the trained module
            fresh = load_pruned(tmp, copy.deepcopy(pl_module).cpu()).get_submodule(name).eval()
            check_outputs(expected, fresh, example, path, rtol=self.rtol, atol=self.atol,
                          owner=_OWNER)  # fmt: skip

        return save_pruned_checkpoint(
            module,
            path,
            epoch=trainer.current_epoch,
            global_step=trainer.global_step,
            metadata=metadata,
            inputs=describe_inputs(example, name),
            check=reload if self.verify else None,
        )
