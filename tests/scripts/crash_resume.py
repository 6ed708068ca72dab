"""Train the tiny CNN with the regularizer (epoch schedule), variable splitting, thresholding,
monitor and export callbacks plus ``ModelCheckpoint(save_last=True, every_n_train_steps=2)``; run
by ``tests/test_crash_resume.py``, which SIGKILLs it and resumes from ``last.ckpt``::

    python tests/scripts/crash_resume.py --out DIR [--ckpt last.ckpt] [--block-at-step N]
                                         [--block-in-export]

Markers on stdout (flushed): ``STEP <global_step> <epoch> <batch> <first sample> <strength>
<beta> <rounds>`` after every batch (after the callbacks), ``EPOCH_END <epoch> <rounds>`` after
every epoch's thresholding, ``RESTORED`` once the callbacks' state after ``on_train_start`` is
written to ``<out>/restored.pt`` (a resumed run), ``BLOCKED <global_step>`` when the script stops at
``--block-at-step`` (mid-epoch, inside the training loop) and waits to be killed,
``EXPORT_BLOCKED <file>`` when ``--block-in-export`` has written half of the temporary file of the
``.pt`` export and waits to be killed, ``DONE`` at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

EPOCHS = 6
BATCH = 16  # 8 optimizer steps per epoch


def strength_schedule(epoch: int) -> float:
    """The regularizer's strength: grows every epoch (so its position must be restored)."""
    return 0.02 * (1 + epoch)


def _state(callbacks: dict[str, Any], trainer: Any, pl_module: Any) -> dict[str, Any]:
    thr, split, reg = callbacks["thresholding"], callbacks["splitting"], callbacks["regularizer"]
    return {
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "thresholding": {
            "masks": {k: v.tolist() for k, v in thr.masks.items()},
            "rounds": thr.rounds,
            "state_key": thr.state_key,
        },
        "splitting": {
            "U": {k: v.detach().cpu().clone() for k, v in split.U.items()},
            "beta": split.beta,
            "growth_epoch": split.growth_epoch,
            "state_key": split.state_key,
        },
        "regularizer": {"strength": reg._current, "state_key": reg.state_key},
        "weights": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
    }


def run(
    out: Path,
    ckpt: Path | None = None,
    block_at_step: int | None = None,
    block_in_export: bool = False,
) -> dict[str, Any]:
    """Fit (or resume); returns the final state of the callbacks and the export's paths."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from reliability_common import IMAGE, CountConsumed, LitTiny, ResumableLoader

    from lightning_sparsity import (
        FilterThresholding,
        PrunedExport,
        SparsityMonitor,
        SparsityRegularizer,
        VariableSplitting,
    )

    torch.set_num_threads(1)
    pl.seed_everything(0, workers=True)
    callbacks: dict[str, Any] = {
        "regularizer": SparsityRegularizer(
            "l1_l2", strength=strength_schedule, layers=["conv1", "conv2"]
        ),
        "splitting": VariableSplitting(
            strength=0.02, beta=1.0, growth_every_n_epochs=2, layers=["fc1"]
        ),
        "thresholding": FilterThresholding(
            threshold=0.3, relative=True, criterion="l2", fraction=0.2, max_rounds=4
        ),
        "monitor": SparsityMonitor(histograms=False),
        # explicit example inputs: resuming a finished run runs no batch to take them from
        "export": PrunedExport(
            dirpath=out / "export",
            formats=("ckpt", "pt"),
            example_inputs=torch.randn(2, *IMAGE, generator=torch.Generator().manual_seed(0)),
        ),
    }

    steps: list[str] = []

    class Markers(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if ckpt is not None:  # the state every callback re-applied from the checkpoint
                torch.save(_state(callbacks, trainer, pl_module), out / "restored.pt")
                print("RESTORED", flush=True)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, o: Any, b: Any, i: int) -> None:
            reg, split = callbacks["regularizer"], callbacks["splitting"]
            rounds = callbacks["thresholding"].rounds
            gs, epoch, first = trainer.global_step, trainer.current_epoch, int(b[2][0])
            steps.append(f"STEP {gs} {epoch} {i} {first} {reg._current!r} {split.beta!r} {rounds}")
            print(steps[-1], flush=True)
            if gs == block_at_step:
                print(f"BLOCKED {gs}", flush=True)
                time.sleep(3600)  # killed here, in the middle of an epoch

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            rounds = callbacks["thresholding"].rounds
            print(f"EPOCH_END {trainer.current_epoch} {rounds}", flush=True)

    if block_in_export:
        real_save = torch.save

        def half_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            name = Path(str(f)).name
            # atomic_write's temporary file of pruned.pt (".pruned.<random>.tmp.pt")
            if name.startswith(".pruned.") and ".tmp" in name and name.endswith(".pt"):
                import io

                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                with open(f, "wb") as handle:
                    handle.write(data[: len(data) // 2])
                    handle.flush()
                print(f"EXPORT_BLOCKED {name}", flush=True)
                time.sleep(3600)  # killed here, half-way through writing the export
            real_save(obj, f, *args, **kwargs)

        torch.save = half_save  # type: ignore[assignment]

    loader = ResumableLoader(BATCH)
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints", save_last=True, every_n_train_steps=2, save_top_k=1
    )
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        callbacks=[CountConsumed(loader), *callbacks.values(), Markers(), checkpoint],
        logger=CSVLogger(out, name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=out,
    )
    module = LitTiny()
    trainer.fit(module, loader, ckpt_path=ckpt)
    final = _state(callbacks, trainer, module)
    final["export_paths"] = {k: str(v) for k, v in callbacks["export"].paths.items()}
    final["steps"] = steps
    print("DONE", flush=True)
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ckpt", type=Path, default=None)
    parser.add_argument("--block-at-step", type=int, default=None)
    parser.add_argument("--block-in-export", action="store_true")
    args = parser.parse_args()
    run(args.out, args.ckpt, args.block_at_step, args.block_in_export)


if __name__ == "__main__":
    main()
