"""The main job: train LeNet-5-Caffe on MNIST with sparsity callbacks, export the pruned network,
and test both the trained network and the exported one.

The configuration is ``examples/lenet5_mnist.yaml`` (read by default); any key can be overridden
with LightningCLI's options, and another file given with ``--config`` is read after it. Three
short options cover the usual changes::

    python examples/lenet5_mnist.py --epochs 1 --data_dir ../shared/data --output_dir outputs/run1
    python examples/lenet5_mnist.py --config my_run.yaml --model.lr 3e-4 --trainer.max_epochs 20
    python examples/lenet5_mnist.py --print_config        # the full configuration, as YAML

``--epochs`` sets ``trainer.max_epochs``, ``--data_dir`` sets ``data.data_dir`` (a torchvision
root holding ``MNIST/raw/*.gz``; downloaded there when missing), ``--output_dir`` sets
``trainer.default_root_dir`` and the logger's ``save_dir`` (TensorBoard events, checkpoints).
They win over the configuration files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_sparsity import PrunedExport, SparsityBudget
from lightning_sparsity.data import MNISTDataModule
from lightning_sparsity.module import ClassificationModule

DEFAULT_CONFIG = Path(__file__).with_suffix(".yaml")


class LeNet5MNISTCLI(LightningCLI):
    """LightningCLI with the three short options ``--epochs``, ``--data_dir``, ``--output_dir``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--epochs", type=int | None, default=None, help="trainer.max_epochs")
        parser.add_argument("--data_dir", type=str | None, default=None, help="data.data_dir")
        parser.add_argument(
            "--output_dir",
            type=str | None,
            default=None,
            help="trainer.default_root_dir and the logger's save_dir",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config
        if config.epochs is not None:
            config.trainer.max_epochs = config.epochs
        if config.data_dir is not None:
            config.data.data_dir = config.data_dir
        if config.output_dir is not None:
            config.trainer.default_root_dir = config.output_dir
            loggers = config.trainer.logger
            for logger in loggers if isinstance(loggers, list) else [loggers]:
                init_args = getattr(logger, "init_args", None)
                if isinstance(init_args, Namespace) and "save_dir" in init_args:
                    init_args.save_dir = config.output_dir


def export_summary(trainer: pl.Trainer) -> list[str]:
    """Lines about the physically pruned export, printed after the test results.

    EXPORT SUMMARY: the PrunedExport callback (added to ``trainer.callbacks`` in the YAML) reports
    its files and sizes here: kept widths, parameters and MACs from its size report. Without it
    there is nothing to report.
    """
    export = next((cb for cb in trainer.callbacks if isinstance(cb, PrunedExport)), None)
    if export is None or export.report is None:
        return []
    report = export.report
    widths = ", ".join(
        f"{layer.name} {layer.out_before}->{layer.out_after}"
        for layer in report.layers
        if layer.kind.startswith(("Conv", "Linear"))
    )
    lines = [
        "",
        "== Pruned export (last epoch's weights) ==",
        f"kept widths: {widths}",
        f"architecture (conv filters, then Linear inputs): {report.architecture(after=False)} "
        f"-> {report.architecture()}",
        f"parameters: {report.params_before:,} -> {report.params_after:,} "
        f"(-{100 * report.params_removed:.1f}%)",
        f"MACs per example: {report.macs_before:,} -> {report.macs_after:,} "
        f"(-{100 * report.macs_removed:.1f}%)",
    ]
    budget = next((cb for cb in trainer.callbacks if isinstance(cb, SparsityBudget)), None)
    if budget is not None and budget.target is not None:
        lines.append(f"budget: {budget.target:,} {budget.metric} requested")
    lines += [f"{fmt}: {path}" for fmt, path in export.paths.items()]
    return lines


def test_exported(trainer: pl.Trainer, data: pl.LightningDataModule) -> dict[str, float] | None:
    """Reload the exported pruned checkpoint as a user would and test it on the same test set."""
    export = next((cb for cb in trainer.callbacks if isinstance(cb, PrunedExport)), None)
    if export is None or "ckpt" not in export.paths:
        return None
    pruned = ClassificationModule.load_from_checkpoint(export.paths["ckpt"], map_location="cpu")
    tester = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_test_batches=trainer.limit_test_batches,
    )
    (results,) = tester.test(pruned, datamodule=data, verbose=False)
    return results


def main(args: list[str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    cli = LeNet5MNISTCLI(
        ClassificationModule,
        MNISTDataModule,
        run=False,
        args=args,
        parser_kwargs={"default_config_files": [str(DEFAULT_CONFIG)]},
        save_config_kwargs={"overwrite": True},
    )
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    trainer.fit(model, datamodule=data)
    # the last epoch's weights: the ones PrunedExport exported (an earlier "best" epoch would be
    # denser than the export, so testing it would misreport the pruned model)
    (results,) = trainer.test(model, datamodule=data)
    pruned_results = test_exported(trainer, data)
    wall = time.perf_counter() - start

    print()
    print("== LeNet-5-Caffe on MNIST ==")
    print(f"test accuracy: {results['test/acc']:.4f}  (test loss {results['test/loss']:.4f})")
    print(f"epochs: {trainer.current_epoch}  steps: {trainer.global_step}  wall time: {wall:.1f} s")
    print("tested weights: last epoch")
    if trainer.logger is not None and trainer.logger.log_dir is not None:
        print(f"TensorBoard: tensorboard --logdir {trainer.logger.log_dir}")
    # ---- export summary (PrunedExport) ------------------------------------------------------
    for line in export_summary(trainer):
        print(line)
    if pruned_results is not None:
        print(
            f"pruned test accuracy: {pruned_results['test/acc']:.4f}  "
            f"(test loss {pruned_results['test/loss']:.4f}; the exported .ckpt reloaded with "
            "ClassificationModule.load_from_checkpoint)"
        )
    pruned = {f"pruned_{k}": v for k, v in (pruned_results or {}).items()}
    return {**results, **pruned, "wall_time_s": wall}


if __name__ == "__main__":
    main()
