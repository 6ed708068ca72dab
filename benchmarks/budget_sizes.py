"""Does the exported model meet the budget? LeNet-5-Caffe on MNIST and Fashion-MNIST, parameter
and MAC budgets of 1%, 5% and 25%: the requested size, the exported size (what ``PrunedExport``
wrote, counted by its size report) and their ratio, which must lie in [0.98, 1].

One epoch per run (the whole schedule in its first half, ``by_epoch=0.5``; the second half trains
the survivors) with the l1/l2 penalty steered by the budget: the test accuracy is reported but is
not the point here (the LeNet-5 table in ``lenet5_mnist.md`` is). One run at a time.

Usage::

    python benchmarks/budget_sizes.py --data_dir ../shared/data
    python benchmarks/budget_sizes.py --data_dir ../shared/data --quick --out /tmp/r   # seconds
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, merge_results

DATASETS = ("mnist", "fashion-mnist")
BUDGETS = (("params", 0.01), ("params", 0.05), ("params", 0.25), ("macs", 0.01), ("macs", 0.05),
           ("macs", 0.25))  # fmt: skip


def run(dataset: str, metric: str, fraction: float, data_dir: Path, quick: bool) -> dict[str, Any]:
    """One training run; the requested and exported sizes."""
    import lightning.pytorch as pl

    from lightning_sparsity import (
        ClassificationModule,
        PrunedExport,
        SparsityBudget,
        SparsityRegularizer,
    )
    from lightning_sparsity.data import build_datamodule

    pl.seed_everything(0, verbose=False)
    work = Path(tempfile.mkdtemp(prefix="budget_"))
    budget = SparsityBudget(**{metric: fraction}, by_epoch=0.5)
    export = PrunedExport(dirpath=work, formats=("pt",))
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=8 if quick else 1.0,
        limit_val_batches=0,
        limit_test_batches=2 if quick else 1.0,
        callbacks=[SparsityRegularizer("l1_l2", 1e-3), budget, export],
    )
    module = ClassificationModule("lenet5", optimizer="adam", lr=1e-3)
    data = build_datamodule(dataset, data_dir=str(data_dir), batch_size=100, val_size=5000)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    (test,) = trainer.test(module, datamodule=data, verbose=False)
    report = export.report
    exported = report.params_after if metric == "params" else report.macs_after
    shutil.rmtree(work, ignore_errors=True)
    assert budget.target is not None
    return {
        "dataset": dataset,
        "metric": metric,
        "fraction": fraction,
        "dense": report.params_before if metric == "params" else report.macs_before,
        "requested": budget.target,
        "exported": exported,
        "ratio": exported / budget.target,
        "met": 0.98 * budget.target <= exported <= budget.target,
        "architecture": report.architecture(),
        "params": report.params_after,
        "macs": report.macs_after,
        "test_accuracy": test["test/acc"],
        "train_seconds": round(seconds, 1),
        "machine": machine_info(),
    }


def write_markdown(results: dict[str, Any], path: Path) -> None:
    rows = sorted(results.values(), key=lambda r: (r["dataset"], r["metric"], r["fraction"]))
    lines = [
        "# Budget mode: requested vs exported size (LeNet-5-Caffe)",
        "",
        "Written by `benchmarks/budget_sizes.py`: one epoch per run, the whole schedule in its",
        "first half (`SparsityBudget(..., by_epoch=0.5)`) with the l1/l2 penalty steered, sizes",
        "as the export counts them. Target: exported / requested in [0.98, 1].",
        "",
        "| dataset | budget | requested | exported | ratio | met | architecture | test acc | "
        "load avg (1 min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        load = r["machine"].get("load_average_at_start", [float("nan")])[0]
        lines.append(
            f"| {r['dataset']} | {r['metric']} {r['fraction']:.0%} | {r['requested']:,} | "
            f"{r['exported']:,} | {r['ratio']:.4f} | {'yes' if r['met'] else 'NO'} | "
            f"{r['architecture']} | {r['test_accuracy']:.4f} | {load:.2f} |"
        )
    met = sum(r["met"] for r in rows)
    lines += ["", f"{met} of {len(rows)} runs met the target."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="8 batches per run")
    parser.add_argument("--dataset", action="append", choices=DATASETS)
    parser.add_argument("--report", action="store_true", help="only rebuild the .md")
    args = parser.parse_args(argv)
    if args.report:
        runs = json.loads((args.out / "budget_sizes.json").read_text())["runs"]
        write_markdown(runs, args.out / "budget_sizes.md")
        return 0
    for dataset in args.dataset or DATASETS:
        for metric, fraction in BUDGETS:
            record = run(dataset, metric, fraction, args.data_dir, args.quick)
            print(
                f"[budget] {dataset} {metric} {fraction:.0%}: requested {record['requested']:,}"
                f" exported {record['exported']:,} ratio {record['ratio']:.4f} "
                f"acc {record['test_accuracy']:.4f}",
                flush=True,
            )
            merged = merge_results(
                args.out / "budget_sizes.json", "runs", f"{dataset}/{metric}/{fraction}", record
            )
            write_markdown(merged["runs"], args.out / "budget_sizes.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
