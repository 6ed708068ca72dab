"""Train the tiny CNN with every library callback under ``Trainer(strategy="ddp",
accelerator="cpu", devices=N)`` (gloo) and write what each rank saw to ``<out>/result.pt``.

Run by ``tests/test_ddp.py`` in a subprocess (Lightning's DDP launcher re-executes this script for
the other ranks, so it cannot run inside pytest's own process)::

    python tests/scripts/ddp_callbacks.py --out DIR --devices 2 --batch-size 16

Every rank records per-step digests of the penalty gradient, the proximal step, the splitting
variables and every parameter; the masks per epoch; the monitor's metrics; which samples it
trained on; which files it renamed into the export directory. The records are gathered to every
rank with ``torch.distributed.all_gather_object`` at fit end and rank 0 saves them (plain data,
``weights_only``-loadable). The script exits non-zero on any failure; it prints ``DDP_DONE`` last.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

EPOCHS = 4


def run(
    out: Path, devices: int, batch_size: int, export: bool = True
) -> tuple[list[dict[str, Any]], int]:
    """Fit once; returns the records of every rank (on every rank) and this process's rank."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from reliability_common import LitTiny, build_callbacks, loader, rank

    torch.set_num_threads(1)
    pl.seed_everything(0, workers=True)
    export_dir = out / "export"
    renames: list[tuple[int, str]] = []
    real_replace = os.replace

    def logged_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if Path(dst).resolve().parent == export_dir.resolve():
            renames.append((rank(), Path(dst).name))
        real_replace(src, dst, *args, **kwargs)

    callbacks, recorder = build_callbacks(export_dir if export else None)
    strategy = "ddp" if devices > 1 else "auto"
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=devices,
        max_epochs=EPOCHS,
        callbacks=callbacks,
        logger=CSVLogger(out, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=out,
    )
    os.replace = logged_replace  # type: ignore[assignment]
    try:
        trainer.fit(LitTiny(), loader(batch_size, single_process_reference=devices == 1))
    finally:
        os.replace = real_replace  # type: ignore[assignment]
    records = recorder.gathered
    # the renames each rank made into the export directory, gathered the same way
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        all_renames: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(all_renames, renames)
    else:
        all_renames = [renames]
    for record, their in zip(records, all_renames):
        record["export_renames"] = their
    return records, trainer.global_rank


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-export", action="store_true")
    args = parser.parse_args()
    records, my_rank = run(args.out, args.devices, args.batch_size, export=not args.no_export)
    if my_rank == 0:
        torch.save(records, args.out / "result.pt")
    print(f"DDP_DONE rank={my_rank}", flush=True)


if __name__ == "__main__":
    main()
