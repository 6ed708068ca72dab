"""What the sparsity callbacks need from a running Trainer (private).

The strategy guard, the NaN guard, the logging cadence and the optimizer lookups.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

#: Strategies that shard parameters, gradients or optimizer state across processes (matched by
#: class name along the MRO, so that no optional package such as deepspeed is imported).
SHARDING_STRATEGIES: tuple[str, ...] = (
    "FSDPStrategy",
    "DeepSpeedStrategy",
    "ModelParallelStrategy",
    "XLAFSDPStrategy",
)


def refuse_sharded_strategy(trainer: Any, *, owner: str) -> None:
    """Raise when ``trainer.strategy`` shards the model (FSDP, DeepSpeed, ModelParallel).

    The callbacks need each layer's whole weight, gradient and optimizer state on every process
    (filter norms, masks, proximal maps, the export); under sharding each rank holds a slice, and
    the gradients live in flat buffers. DDP (a full replica per rank) is supported and tested.
    """
    strategy = getattr(trainer, "strategy", None)
    names = [cls.__name__ for cls in type(strategy).__mro__]
    sharding = next((name for name in names if name in SHARDING_STRATEGIES), None)
    if sharding is not None:
        raise RuntimeError(
            f"`{owner}`: `Trainer(strategy={type(strategy).__name__}(...))` is a {sharding}, which "
            "shards the parameters across processes, but this callback needs every layer's whole "
            "weight, gradient and optimizer state on each process. HINT: train with "
            '`strategy="ddp"` (supported: a full replica per process), and use FSDP or DeepSpeed '
            "for the exported, smaller model if needed."
        )


def raise_if_nonfinite(
    values: Tensor | dict[str, Tensor], names: Sequence[str], *, owner: str, what: str = ""
) -> None:
    """Raise naming the layers whose values are NaN or inf, with one device sync.

    ``values``: one value per layer, or ``{description: per-layer values}`` for several checks
    at once (e.g. the penalty and the gradient), each reported separately.
    """
    rows = values if isinstance(values, dict) else {what: values}
    finite = torch.isfinite(torch.stack(list(rows.values())))
    if bool(finite.all()):
        return
    problems = []
    for description, ok in zip(rows, finite.tolist()):
        bad = [name for name, good in zip(names, ok) if not good]
        if bad:
            problems.append(f"{description} is NaN or inf in layer(s) {bad}")
    raise RuntimeError(
        f"`{owner}`: {'; '.join(problems)}; stopping before the weights are corrupted. HINT: "
        "lower the learning rate or the strength, or clip gradients "
        "(`Trainer(gradient_clip_val=...)`)."
    )


def log_due(trainer: Any, every: int | None, *, after_step: bool) -> bool:
    """Whether this optimizer step is one the Trainer writes to its loggers.

    ``every=None``: the Trainer's ``log_every_n_steps``; 0: never. ``self.log`` costs a few ms
    per call, so it runs only then. ``after_step``: called after the optimizer step
    (``global_step`` already counts it).
    """
    n = trainer.log_every_n_steps if every is None else every
    if n <= 0:
        return False
    step = trainer.global_step if after_step else trainer.global_step + 1
    return step % n == 0


def optimizer_param_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    """The ``id`` of every parameter an optimizer updates."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def log_report(trainer: Any, report: Any, paths: dict[str, Path], *, owner: str) -> None:
    """Log an export: files and report as text, ``export/...`` metrics, TensorBoard text."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.utilities import rank_zero_info

    listing = "\n".join(f"  {fmt}: {path}" for fmt, path in paths.items())
    rank_zero_info(f"`{owner}` wrote:\n{listing}\n{report}")
    metrics = {  # export/params, export/params_before, export/params_removed, .../macs...
        f"export/{key.removesuffix('_after')}": float(value)
        for key, value in report.to_dict().items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    for logger in trainer.loggers:
        if metrics:
            logger.log_metrics(metrics, step=trainer.global_step)
        if isinstance(logger, TensorBoardLogger):
            text = "\n".join("    " + line for line in str(report).splitlines())
            logger.experiment.add_text("export/report", text, global_step=trainer.global_step)
        logger.save()
