"""LeNet-5-Caffe on MNIST: every sparsity method with the same epoch budget, then threshold, export
with ``prune_model`` and evaluate the EXPORTED model on the 10,000 test images.

Each method's hyperparameters live in ``benchmarks/configs/lenet5/<method>.yaml``. The 60,000
training images are split (seeded) into 55,000 for training and 5,000 for validation; tuning looks
only at the validation accuracy (``--eval val``), the test set is read once per final run.

Usage::

    python benchmarks/lenet5_mnist.py --data_dir ../shared/data               # every method
    python benchmarks/lenet5_mnist.py --data_dir ../shared/data --method l1   # one method
    python benchmarks/lenet5_mnist.py --data_dir ../shared/data --quick --out /tmp/r  # seconds

Results are merged per method into ``<out>/lenet5_mnist.json``; the markdown table and the plot
(``lenet5_mnist.md``, ``lenet5_mnist.png``) are rebuilt from the whole JSON after each method.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lenet5_report
from common import RESULTS, machine_info, merge_results

CONFIGS = Path(__file__).resolve().parent / "configs" / "lenet5"
#: LeNet-5-Caffe layer names in ``lightning_sparsity.models.LeNet5Caffe``.
LAYERS = {
    "conv1": "features.0",
    "conv2": "features.3",
    "fc1": "classifier.1",
    "fc2": "classifier.3",
}
#: The default run, in order (Torch-Pruning last: it prunes to the size of our best method).
METHODS = [
    "dense",
    "l1",
    "group_lasso",
    "l1_l2",
    "l0_proximal",
    "l0_l21_splitting",
    "capped_l1",
    "lightning_model_pruning",
    "torch_pruning",
]
MEAN, STD = 0.1307, 0.3081


# ----------------------------------------------------------------------------------------- data
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(data_dir: Path, val_size: int = 5000, seed: int = 0) -> dict[str, TensorDataset]:
    """MNIST as normalised tensors, read straight from the raw ``.gz`` files (the folder may be
    read-only): ``train`` (60,000 - val_size), ``val`` (val_size, seeded) and ``test`` (10,000).
    """
    raw = Path(data_dir) / "MNIST" / "raw"

    def pair(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(_read_idx(raw / f"{prefix}-images-idx3-ubyte.gz").copy())
        y = torch.from_numpy(_read_idx(raw / f"{prefix}-labels-idx1-ubyte.gz").copy()).long()
        return x.float().div(255).sub(MEAN).div(STD).unsqueeze(1), y

    x, y = pair("train")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    xt, yt = pair("t10k")
    return {
        "train": TensorDataset(x[train_idx], y[train_idx]),
        "val": TensorDataset(x[val_idx], y[val_idx]),
        "test": TensorDataset(xt, yt),
    }


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, limit: int | None = None) -> float:
    model.eval()
    x, y = data.tensors
    if limit is not None:
        x, y = x[:limit], y[:limit]
    correct = 0
    for i in range(0, len(x), 1000):
        correct += int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum())
    return correct / len(x)


# -------------------------------------------------------------------------------- measurement
def live_counts(model: nn.Module) -> dict[str, int]:
    """Live output units of conv1/conv2/fc1 and live input columns of fc1 (nonzero weights)."""
    mods = dict(model.named_modules())
    out: dict[str, int] = {}
    for short in ("conv1", "conv2", "fc1"):
        w = mods[LAYERS[short]].weight.detach()
        out[short] = int((w.flatten(1).abs().sum(1) > 0).sum())
    out["fc1_in"] = int((mods[LAYERS["fc1"]].weight.detach().abs().sum(0) > 0).sum())
    return out


def exported_widths(model: nn.Module) -> dict[str, int]:
    """Kept widths conv1-conv2-fc1in-fc2in of an exported (physically smaller) LeNet-5."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return {
        "conv1": convs[0].out_channels,
        "conv2": convs[1].out_channels,
        "fc1_in": fcs[0].in_features,
        "fc2_in": fcs[1].in_features,
    }


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module) -> int:
    """Multiply-accumulates of one 1x28x28 image (conv and linear layers), via FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        copy.deepcopy(model).eval()(torch.zeros(1, 1, 28, 28))
    return counter.get_total_flops() // 2


# ------------------------------------------------------------------------------ the callbacks
def _epoch_recorder() -> Any:
    import lightning.pytorch as pl

    class EpochRecorder(pl.Callback):
        """Live filters per layer and wall time at the end of every training epoch."""

        def __init__(self) -> None:
            self.curve: list[dict[str, Any]] = []
            self._start = 0.0

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            row: dict[str, Any] = {"epoch": trainer.current_epoch + 1}
            row.update(live_counts(pl_module.model))
            row["seconds"] = round(time.perf_counter() - self._start, 2)
            self.curve.append(row)
            print(f"[lenet5]   epoch {row}", flush=True)

    return EpochRecorder()


def _torch_pruning_regularizer(pruner: Any) -> Any:
    import lightning.pytorch as pl

    class TorchPruningRegularize(pl.Callback):
        """Torch-Pruning's sparse training: ``pruner.regularize(model)`` after every backward."""

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            pruner.update_regularizer()

        def on_before_optimizer_step(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
        ) -> None:
            pruner.regularize(pl_module.model)

    return TorchPruningRegularize()


def _schedule(value: Any) -> Any:
    """A YAML strength ``{value: v, until_epoch: k}`` -> ``epoch -> v if epoch < k else 0``;
    ``{value: v, from_epoch: k}`` -> ``0`` before epoch ``k``; anything else unchanged.
    """
    if not isinstance(value, dict) or "value" not in value:
        return value
    v, start = float(value["value"]), int(value.get("from_epoch", 0))
    stop = int(value.get("until_epoch", 10**9))
    return lambda epoch: v if start <= epoch < stop else 0.0


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["callbacks.0.init_args.strength=1e-3", ...]``: set nested keys (YAML-parsed values)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        path, _, raw = item.partition("=")
        keys = path.split(".")
        node: Any = cfg
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = yaml.safe_load(raw)
        else:
            node[last] = yaml.safe_load(raw)
    return cfg


def build_callbacks(cfg: dict[str, Any], model: nn.Module, epochs: int) -> list[Any]:
    """Our callbacks from ``cfg['callbacks']`` (``{class, init_args}`` entries) and Lightning's
    ``ModelPruning`` from ``cfg['model_pruning']``.
    """
    import lightning_sparsity

    callbacks: list[Any] = []
    for entry in cfg.get("callbacks", []) or []:
        cls = getattr(lightning_sparsity, entry["class"])
        kwargs = {k: _schedule(v) for k, v in (entry.get("init_args") or {}).items()}
        for key, value in kwargs.items():  # {fraction_of_epochs: f} -> f * epochs
            if isinstance(value, dict) and "fraction_of_epochs" in value:
                kwargs[key] = float(value["fraction_of_epochs"]) * epochs
        callbacks.append(cls(**kwargs))
    if "model_pruning" in cfg:
        from lightning.pytorch.callbacks import ModelPruning

        mp = dict(cfg["model_pruning"])
        mods = dict(model.named_modules())
        params = [(mods[LAYERS[name]], "weight") for name in mp.pop("layers")]
        # prune at the end of epochs 0 .. n-1, the same fraction each time, to keep `final_keep`
        n = max(1, int(epochs * float(mp.pop("prune_epochs_fraction"))))
        per_epoch = 1.0 - float(mp.pop("final_keep")) ** (1.0 / n)
        last = n - 1
        callbacks.append(
            ModelPruning(
                parameters_to_prune=params,
                amount=lambda epoch: per_epoch if epoch <= last else 0.0,
                **mp,
            )
        )
    return callbacks


# -------------------------------------------------------------------------------- one method
def _trainer(epochs: int, callbacks: list[Any], limit_batches: int | None) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        limit_train_batches=limit_batches if limit_batches is not None else 1.0,
        callbacks=callbacks,
        deterministic=False,
    )


def _module(model: nn.Module, cfg: dict[str, Any], epochs: int) -> Any:
    from lightning_sparsity import ClassificationModule

    kwargs = dict(cfg.get("module") or {})
    return ClassificationModule(model, **kwargs)


def _zero_bias_of_dead_filters(model: nn.Module) -> None:
    """Masking tools zero weights only: give a filter whose weights are all zero a zero bias too,
    as FilterThresholding does, so that prune_model may remove it (changes the function; the
    accuracy reported is the exported model's, measured after this).
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                dead = m.weight.flatten(1).abs().sum(1) == 0
                m.bias[dead] = 0.0


def run_method(
    name: str,
    data: dict[str, TensorDataset],
    epochs: int,
    limit_batches: int | None,
    eval_split: str,
    eval_limit: int | None,
    tp_target_params: int | Callable[[], int | None] | None = None,
    seed: int = 0,
    overrides: list[str] | None = None,
    export: bool = True,
) -> dict[str, Any]:
    """Train, threshold, export and evaluate one method; returns its result record."""
    import lightning.pytorch as pl

    from lightning_sparsity import build_model

    cfg = apply_overrides(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()), overrides or [])
    pl.seed_everything(seed, workers=True, verbose=False)
    model = build_model("lenet5")
    dense_params, dense_macs = count_params(model), count_macs(model)
    example = torch.zeros(1, 1, 28, 28)
    loader = DataLoader(
        data["train"], batch_size=int(cfg.get("batch_size", 100)), shuffle=True, num_workers=0
    )
    recorder = _epoch_recorder()
    callbacks = [*build_callbacks(cfg, model, epochs)]
    pruner = None
    tp_cfg = cfg.get("torch_pruning")
    finetune_epochs = 0
    if tp_cfg is not None:
        pruner = _tp_pruner(model, example, tp_cfg)
        model.train()  # building the dependency graph leaves the model in eval mode
        callbacks.append(_torch_pruning_regularizer(pruner))
        finetune_epochs = int(tp_cfg.get("finetune_epochs", 0))
    callbacks.append(recorder)

    sparse_epochs = max(1, epochs - finetune_epochs)
    module = _module(model, cfg, epochs)
    start = time.perf_counter()
    _trainer(sparse_epochs, callbacks, limit_batches).fit(module, loader)
    tp_info: dict[str, Any] = {}
    if pruner is not None:
        # read when the sparse training ends, so other methods may finish meanwhile
        found = tp_target_params() if callable(tp_target_params) else tp_target_params
        target = found or int(tp_cfg.get("target_params", 3000))
        tp_info = _tp_prune_to(pruner, model, example, target)
        model.train()
        if finetune_epochs and epochs > sparse_epochs:
            ft = _module(model, cfg, epochs)
            ft_recorder = _epoch_recorder()
            _trainer(epochs - sparse_epochs, [ft_recorder], limit_batches).fit(ft, loader)
            for row in ft_recorder.curve:
                row["epoch"] += sparse_epochs
                row["finetune"] = True
            recorder.curve.extend(ft_recorder.curve)
    train_time = time.perf_counter() - start

    model.eval()
    if cfg.get("zero_bias_of_dead_filters", False):
        _zero_bias_of_dead_filters(model)
    masked_acc = accuracy(model, data[eval_split], eval_limit)
    export_start = time.perf_counter()
    if export and pruner is None:
        from lightning_sparsity import prune_model
    exported = (
        model
        if pruner is not None or not export
        else prune_model(model, example, verify=True, allow_unchanged=True)
    )
    export_time = time.perf_counter() - export_start
    exported.eval()
    acc = accuracy(exported, data[eval_split], eval_limit)
    val_acc = acc if eval_split == "val" else accuracy(exported, data["val"], eval_limit)
    params, macs = count_params(exported), count_macs(exported)
    widths = exported_widths(exported)
    if not export:  # tuning without the export: sizes from the live counts and the formulas
        live = live_counts(model)
        fc1_in = min(live["fc1_in"], 16 * live["conv2"])  # the export drops dead channels' columns
        widths = {"conv1": live["conv1"], "conv2": live["conv2"], "fc1_in": fc1_in}
        widths["fc2_in"] = live["fc1"]
        params = lenet5_report.lenet_params(*widths.values())
        macs = lenet5_report.lenet_macs(*widths.values())
    epoch_secs = [row["seconds"] for row in recorder.curve]
    record: dict[str, Any] = {
        "paper": cfg.get("paper", ""),
        "description": cfg.get("description", ""),
        "config": cfg,
        "epochs": epochs,
        "eval_split": eval_split,
        "eval_images": len(data[eval_split]) if eval_limit is None else eval_limit,
        "accuracy": acc,
        "accuracy_before_export": masked_acc,
        "val_accuracy": val_acc,
        "widths": widths,
        "exported": export,
        "params": params,
        "macs": macs,
        "dense_params": dense_params,
        "dense_macs": dense_macs,
        "params_removed": 1 - params / dense_params,
        "macs_removed": 1 - macs / dense_macs,
        "train_time_s": round(train_time, 1),
        "export_time_s": round(export_time, 3),
        "seconds_per_epoch": round(sum(epoch_secs) / max(1, len(epoch_secs)), 2),
        "curve": recorder.curve,
        "quick": limit_batches is not None,
        "machine": machine_info(),
    }
    if tp_info:
        record["torch_pruning"] = tp_info
    return record


# ------------------------------------------------------------------------------ Torch-Pruning
def _tp_pruner(model: nn.Module, example: torch.Tensor, tp_cfg: dict[str, Any]) -> Any:
    import torch_pruning as tp

    mods = dict(model.named_modules())
    return tp.pruner.GroupNormPruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        reg=float(tp_cfg.get("reg", 5e-4)),
        global_pruning=bool(tp_cfg.get("global_pruning", True)),
        pruning_ratio=float(tp_cfg.get("max_ratio", 0.99)),
        max_pruning_ratio=float(tp_cfg.get("max_ratio", 0.99)),
        iterative_steps=int(tp_cfg.get("iterative_steps", 200)),
        ignored_layers=[mods[LAYERS["fc2"]]],
    )


def _tp_prune_to(pruner: Any, model: nn.Module, example: torch.Tensor, target: int) -> dict:
    """Prune with Torch-Pruning's own ratio steps until the parameter count is <= ``target``."""
    steps = 0
    while count_params(model) > target and pruner.current_step < pruner.iterative_steps:
        pruner.step()
        steps += 1
    return {"target_params": target, "steps": steps, "reached_params": count_params(model)}


# ------------------------------------------------------------------------------------- main
def _tp_target_from(results: dict[str, Any]) -> int | None:
    """Parameter count of our best method: the smallest at >= 99.0% accuracy, else the most
    accurate.
    """
    ours = {
        k: v
        for k, v in results.get("methods", {}).items()
        if not k.startswith(("dense", "lightning_model_pruning", "torch_pruning"))
        and not v.get("quick")
    }
    if not ours:
        return None
    good = [v for v in ours.values() if v["accuracy"] >= 0.99]
    best = (
        min(good, key=lambda v: v["params"])
        if good
        else max(ours.values(), key=lambda v: v["accuracy"])
    )
    return int(best["params"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", type=Path, default=Path("../shared/data"))
    available = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    parser.add_argument(
        "--method",
        action="append",
        choices=available,
        help="repeatable; default: " + " ".join(METHODS),
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry, e.g. callbacks.0.init_args.strength=1e-3 (tuning)",
    )
    parser.add_argument("--tag", default="", help="store the result as <method><tag>")
    parser.add_argument("--no_export", action="store_true", help="tuning: sizes from live counts")
    parser.add_argument("--report", action="store_true", help="only rebuild the .md and .png")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 batches, 1 epoch, 1000 images")
    parser.add_argument("--eval", choices=("test", "val"), default="test")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--tp_target_params", type=int, default=None)
    args = parser.parse_args(argv)

    out_json = args.out / "lenet5_mnist.json"
    if args.report:
        lenet5_report.write(json.loads(out_json.read_text()), args.out)
        return 0
    torch.set_num_threads(args.threads)
    # Weights that a penalty shrinks towards zero without reaching it (Torch-Pruning's group-norm
    # regularizer) become subnormal floats, which the CPU handles 5-10x slower: a 30-epoch run
    # went from 30 s to 177 s per epoch by epoch 8. Flushed to zero for every run from
    # 2026-11-30 19:05 on (the rows before it ran without this; exact zeros are unaffected).
    torch.set_flush_denormal(True)
    methods = args.method or METHODS
    epochs = 1 if args.quick else args.epochs
    limit_batches = 3 if args.quick else None
    eval_limit = 1000 if args.quick else None
    data = load_mnist(args.data_dir)
    for name in methods:

        def target() -> int | None:
            existing = json.loads(out_json.read_text()) if out_json.exists() else {}
            return args.tp_target_params or _tp_target_from(existing)

        print(f"[lenet5] {name}: {epochs} epoch(s) ...", flush=True)
        record = run_method(
            name,
            data,
            epochs,
            limit_batches,
            args.eval,
            eval_limit,
            tp_target_params=target,
            overrides=args.set,
            export=not args.no_export,
        )
        per_epoch = record["seconds_per_epoch"]
        if args.quick:
            batches = len(data["train"]) / int(record["config"].get("batch_size", 100))
            per_epoch = per_epoch / limit_batches * batches
        print(
            f"[lenet5] {name}: acc {record['accuracy']:.4f} ({args.eval}), widths "
            f"{'-'.join(str(v) for v in record['widths'].values())}, params {record['params']}, "
            f"MACs {record['macs']}, train {record['train_time_s']} s; "
            f"one epoch ~{per_epoch:.0f} s, "
            f"so the full run ({len(METHODS)} methods x {args.epochs} epochs) takes "
            f"~{per_epoch * args.epochs * len(METHODS) / 60:.0f} min on this machine",
            flush=True,
        )
        merged = merge_results(out_json, "methods", name + args.tag, record)
        lenet5_report.write(merged, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
