"""Training-step overhead of the sparsity callbacks, as ratios to plain training in one process.

For LeNet-5-Caffe (batch 32, 1x28x28) and torchvision's ResNet-18 (10 classes, batch 8, 3x64x64
by default) on the CPU, a real ``lightning.pytorch.Trainer`` runs short fits with RMSProp (lr 1e-3)
on fixed random data under each configuration: plain; ``SparsityRegularizer`` with each built-in
penalty; ``ProximalSparsity`` L0 (group hard) and L1 (group soft, exact in RMSProp's
per-coordinate metric); ``VariableSplitting``; and Torch-Pruning's own sparse training
(``GroupNormPruner.regularize`` after backward, as its examples do) when ``torch_pruning`` is
installed. A step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (forward,
backward, the gradient hooks, the optimizer step and the proximal/splitting updates; the timer is
the last callback). The configurations are interleaved (their order rotates every repetition), the
first steps of every fit are dropped, and the ratio is the median step time over all repetitions
divided by plain training's. The same model instance is reused by every fit of a model (the
weights' values do not change the cost of dense ops).

Usage::

    python benchmarks/overhead.py                    # writes results/overhead.{json,md}
    python benchmarks/overhead.py --quick --out /tmp/r  # seconds: LeNet-5 only, a few steps
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info

from lightning_sparsity import (
    LeNet5Caffe,
    ProximalSparsity,
    SparsityRegularizer,
    VariableSplitting,
)


class Bench(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.RMSprop(self.model.parameters(), lr=1e-3)


class StepTimer(pl.Callback):
    """Times every step, and the part of it spent inside the instrumented callbacks' hooks."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.hook_times: list[float] = []
        self.in_hooks = 0.0
        self._start = 0.0

    def instrument(self, callback: pl.Callback) -> pl.Callback:
        for hook in ("on_before_optimizer_step", "on_train_batch_end"):
            if getattr(type(callback), hook) is getattr(pl.Callback, hook):
                continue
            original = getattr(callback, hook)

            def timed(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.in_hooks += time.perf_counter() - start

            setattr(callback, hook, timed)
        return callback

    def on_train_batch_start(self, *args: Any) -> None:
        self.in_hooks = 0.0
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._start)
        self.hook_times.append(self.in_hooks)


class TorchPruningRegularize(pl.Callback):
    """Torch-Pruning's sparse training step at the place its examples call it (after backward,
    before ``optimizer.step``).
    """

    def __init__(self, pruner: Any) -> None:
        self.pruner = pruner

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.pruner.regularize(pl_module.model)


def configurations(model: nn.Module, example: torch.Tensor) -> dict[str, Callable[[], list]]:
    configs: dict[str, Callable[[], list]] = {
        "plain": list,
        "regularizer group_lasso": lambda: [SparsityRegularizer("group_lasso", 1e-4)],
        "regularizer l1_l2": lambda: [SparsityRegularizer("l1_l2", 1e-4)],
        "regularizer capped_l1": lambda: [SparsityRegularizer("capped_l1", 1e-4, cap=1.0)],
        "regularizer l1": lambda: [SparsityRegularizer("l1", 1e-5)],
        "proximal l0 (group hard)": lambda: [ProximalSparsity(1e-6, "l0")],
        "proximal l1 (group soft, per-coordinate)": lambda: [ProximalSparsity(1e-6, "l1")],
        "splitting": lambda: [VariableSplitting(1e-4, 1.0)],
    }
    if importlib.util.find_spec("torch_pruning") is not None:
        import torch_pruning as tp

        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        pruner = tp.pruner.GroupNormPruner(
            model,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            reg=1e-4,
            ignored_layers=[last],
        )
        configs["torch_pruning GroupNormPruner.regularize"] = lambda: [
            TorchPruningRegularize(pruner)
        ]
    return configs


def measure(
    name: str,
    model: nn.Module,
    shape: tuple[int, ...],
    batch: int,
    steps: int,
    warmup: int,
    reps: int,
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch * (steps + 1), *shape, generator=gen)
    y = torch.randint(0, 10, (x.shape[0],), generator=gen)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    module = Bench(model)
    configs = configurations(model, x[:1])
    times: dict[str, list[float]] = {c: [] for c in configs}
    hook_times: dict[str, list[float]] = {c: [] for c in configs}
    order = list(configs)
    for rep in range(reps):
        for c in order[rep % len(order) :] + order[: rep % len(order)]:
            timer = StepTimer()
            pl.Trainer(
                max_epochs=1,
                limit_train_batches=steps,
                callbacks=[*(timer.instrument(cb) for cb in configs[c]()), timer],
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                accelerator="cpu",
            ).fit(module, train_dataloaders=loader)
            times[c].extend(timer.times[warmup:])
            hook_times[c].extend(timer.hook_times[warmup:])
    plain = statistics.median(times["plain"])
    results = {
        c: {
            "median_ms": 1e3 * statistics.median(ts),
            "min_ms": 1e3 * min(ts),
            "ratio": statistics.median(ts) / plain,
            "hook_median_ms": 1e3 * statistics.median(hook_times[c]),
            "hook_ratio": 1 + statistics.median(hook_times[c]) / plain,
            "steps_timed": len(ts),
        }
        for c, ts in times.items()
    }
    print(f"\n{name}: plain {1e3 * plain:.1f} ms/step")
    for c, r in results.items():
        print(
            f"  {c:45s} {r['median_ms']:8.1f} ms  x{r['ratio']:.3f}   in hooks "
            f"{r['hook_median_ms']:7.2f} ms  x{r['hook_ratio']:.3f}"
        )
    return {
        "batch": batch,
        "input": list(shape),
        "params": sum(p.numel() for p in model.parameters()),
        "steps_per_fit": steps,
        "warmup_steps_dropped": warmup,
        "reps": reps,
        "configs": results,
    }


def write_markdown(data: dict[str, Any], path: Path) -> None:
    machine = data["machine"]
    lines = [
        "# Training-step overhead of the sparsity callbacks",
        "",
        f"CPU `{machine['cpu']}` ({machine['cpu_count']} cores), {machine['torch_threads']} torch "
        f"thread(s), torch {machine['torch']}, lightning {machine['lightning']}, torch-pruning "
        f"{machine.get('torch_pruning')}; load average at start "
        f"{[round(x, 1) for x in machine.get('load_average_at_start', [])]}; {machine['date']}.",
        "",
        "RMSProp (lr 1e-3), random data. `step ms`: median time of a training step (forward, "
        "backward, hooks, optimizer step, post-step updates); `ratio`: that over plain training's "
        "median, measured in one process with interleaved fits. `hook ms`: median time spent "
        "inside the callback's own hooks per step; `hook ratio` = 1 + hook ms / plain step ms, the "
        "same overhead measured directly (far less sensitive to other processes on the machine "
        "than the difference of two step times).",
    ]
    for m, info in data["models"].items():
        lines += [
            "",
            f"## {m}: batch {info['batch']}, input {info['input']}, {info['params']:,} parameters",
            "",
            f"{info['reps']} fits per configuration of {info['steps_per_fit']} steps (first "
            f"{info['warmup_steps_dropped']} of each dropped).",
            "",
            "| configuration | step ms | ratio | hook ms | hook ratio |",
            "|---|---|---|---|---|",
        ]
        for c, r in info["configs"].items():
            lines.append(
                f"| {c} | {r['median_ms']:.1f} | {r['ratio']:.3f} | {r['hook_median_ms']:.2f} | "
                f"{r['hook_ratio']:.3f} |"
            )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="LeNet-5 only, few steps, 1 rep")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7, help="fits per configuration, LeNet-5")
    parser.add_argument("--reps_resnet", type=int, default=5, help="fits per configuration")
    parser.add_argument("--resnet_size", type=int, default=64, help="ResNet-18 input side")
    parser.add_argument("--resnet_batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.manual_seed(0)
    data: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "models": {}}
    data["machine"]["torch_pruning"] = None
    if importlib.util.find_spec("torch_pruning") is not None:
        import torch_pruning as tp

        data["machine"]["torch_pruning"] = tp.__version__
    if args.quick:
        data["models"]["lenet5"] = measure("lenet5", LeNet5Caffe(), (1, 28, 28), 8, 4, 1, 1)
    else:
        data["models"]["lenet5"] = measure(
            "lenet5", LeNet5Caffe(), (1, 28, 28), 32, 30, 3, args.reps
        )
        from torchvision.models import resnet18

        size = args.resnet_size
        data["models"]["resnet18"] = measure(
            "resnet18",
            resnet18(num_classes=10),
            (3, size, size),
            args.resnet_batch,
            10,
            2,
            args.reps_resnet,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(data, indent=2) + "\n")
    write_markdown(data, args.out / "overhead.md")
    print(f"\nwrote {args.out / 'overhead.json'} and {args.out / 'overhead.md'}")


if __name__ == "__main__":
    main()
