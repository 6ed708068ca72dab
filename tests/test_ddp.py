"""Every callback under ``Trainer(strategy="ddp", accelerator="cpu", devices=2)`` (gloo), and the
FSDP stance.

One 2-process run (``tests/scripts/ddp_callbacks.py``, in a subprocess: Lightning's DDP launcher
re-executes the script) trains the tiny CNN of ``tests/scripts/reliability_common.py`` with the
regularizer, proximal, splitting, two thresholding, monitor and export callbacks at once, and
gathers what each rank saw. While it runs, the same training runs here in one process with the
same global batch (32 = 2 x 16; same seed; the same sample permutation per epoch, see
``reliability_common.loader``).

What is equal, and why:

* rank 0 vs rank 1, bit for bit: DDP all-reduces (averages) the data gradients during backward, so
  both ranks hold the same gradients and weights; every callback computes from those alone, so
  the penalty gradient, the proximal map, ``U`` and ``beta``, and every parameter after every step
  agree exactly. Thresholding decisions are computed on rank 0 and broadcast: a criterion that
  deliberately disagrees on rank 1 does not change the masks.
* 2 processes x 16 vs 1 process x 32: the global batches are the same samples (checked), and the
  average of two 16-sample mean gradients is the 32-sample mean, up to floating-point summation
  order (~1e-7). So the weights agree to ~1e-6 (not bitwise), and the masks, the kept filters and
  the exported widths are identical (thresholds are not within that distance of any filter norm
  here; a tie at 1e-7 could in principle flip one decision). The model has no BatchNorm: on CPU
  there is no SyncBatchNorm, so each rank would normalise with its own 16-sample statistics.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import reliability_common as rc  # noqa: E402

LAYERS = ("conv1", "conv2", "fc1")


def _load_script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ddp_dir = tmp_path_factory.mktemp("ddp2")
    one_dir = tmp_path_factory.mktemp("ddp1")
    start = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPTS / "ddp_callbacks.py"),
            "--out",
            str(ddp_dir),
            "--devices",
            "2",
            "--batch-size",
            "16",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        threads = torch.get_num_threads()
        single, _ = _load_script("ddp_callbacks").run(one_dir, 1, 32)
        torch.set_num_threads(threads)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output[-4000:]
    assert "DDP_DONE rank=0" in output, output[-4000:]
    assert "DDP_DONE rank=1" in output, output[-4000:]
    ddp = torch.load(ddp_dir / "result.pt", weights_only=True)
    return {
        "ddp": ddp,
        "single": single[0],
        "ddp_dir": ddp_dir,
        "one_dir": one_dir,
        "seconds": time.monotonic() - start,
        "output": output,
    }


def test_two_ranks_ran(runs: dict[str, Any]) -> None:
    r0, r1 = runs["ddp"]
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    steps = rc.N_SAMPLES // 32 * _epochs()
    assert len(r0["seen"]) == len(r1["seen"]) == steps
    # each rank trained on half of every global batch, the halves disjoint
    for a, b in zip(r0["seen"], r1["seen"]):
        assert len(a) == len(b) == 16
        assert not set(a) & set(b)


def _epochs() -> int:
    return int(_load_script("ddp_callbacks").EPOCHS)


def test_every_parameter_agrees_across_ranks_after_every_step(runs: dict[str, Any]) -> None:
    r0, r1 = runs["ddp"]
    assert r0["param_digests"] == r1["param_digests"]
    for key, value in r0["final_weights"].items():
        assert torch.equal(value, r1["final_weights"][key]), key


def test_penalty_gradients_are_identical_on_both_ranks(runs: dict[str, Any]) -> None:
    r0, r1 = runs["ddp"]
    assert r0["penalty_grads"] == r1["penalty_grads"]
    assert r0["penalty_grad_nonzero"] == len(r0["seen"])  # the regularizer acted at every step


def test_proximal_steps_are_identical_on_both_ranks(runs: dict[str, Any]) -> None:
    r0, r1 = runs["ddp"]
    assert r0["prox_weights"] == r1["prox_weights"]
    assert r0["prox_changed"] > 0  # the map did zero something
    assert r0["prox_zero_filters"] == r1["prox_zero_filters"]
    assert r0["prox_zero_filters"][-1] > 0


def test_splitting_state_is_identical_on_both_ranks(runs: dict[str, Any]) -> None:
    r0, r1 = runs["ddp"]
    assert r0["splitting"] == r1["splitting"]  # beta and a digest of U after every step
    f0, f1 = r0["splitting_final"], r1["splitting_final"]
    assert f0["beta"] == f1["beta"] == pytest.approx(1.25 ** (_epochs() - 1))
    for name, u in f0["U"].items():
        assert torch.equal(u, f1["U"][name]), name
        assert int((u == 0).sum()) > 0  # U is sparse


def test_masks_agree_across_ranks_every_epoch(runs: dict[str, Any]) -> None:
    r0, r1 = runs["ddp"]
    assert len(r0["masks"]) == _epochs()
    assert r0["masks"] == r1["masks"]
    last = r0["masks"][-1]
    assert sum(last["thresholding/conv1"]) < len(last["thresholding/conv1"])  # kills happened


def test_thresholding_decision_is_rank_zeros_and_shared(runs: dict[str, Any]) -> None:
    """The criterion ranks filters oppositely on rank 1: taken locally, rank 1 would kill other
    filters. The masks still agree, and equal the single-process run's (where rank 0's criterion
    decides): the decision is taken on rank 0 and broadcast.
    """
    r0, r1, one = *runs["ddp"], runs["single"]
    assert r0["rank_local_choices"] != r1["rank_local_choices"]
    key = "rank_thresholding/conv1"
    for e0, e1, e_one in zip(r0["masks"], r1["masks"], one["masks"]):
        assert e0[key] == e1[key] == e_one[key]
    assert sum(r0["masks"][-1][key]) < len(r0["masks"][-1][key])


def test_monitor_logs_the_same_counts_on_both_ranks(runs: dict[str, Any]) -> None:
    r0, r1 = runs["ddp"]
    assert r0["metrics"] == r1["metrics"]
    last = r0["masks"][-1]
    # the monitor counts the non-zero filters of what will be exported: the final weights (the
    # proximal map zeroes filters the masks do not know of), U for the splitting's fc1
    u = r0["splitting_final"]["U"]
    for name in LAYERS:
        masked = [all(m) for m in zip(*(v for k, v in last.items() if k.endswith(f"/{name}")))]
        weight = next(v for k, v in r0["final_weights"].items() if k.endswith(f"{name}.weight"))
        weight = u.get(name, weight)
        live = [bool(f.abs().sum() > 0) for f in weight]
        assert all(m for m, alive in zip(masked, live) if alive)  # a masked filter is zero
        assert r0["metrics"][f"sparsity/{name}/filters"] == sum(live), name
    # one metrics file, written by rank zero
    assert len(list(runs["ddp_dir"].rglob("metrics.csv"))) == 1


def test_export_is_written_once_by_rank_zero(runs: dict[str, Any]) -> None:
    r0, r1 = runs["ddp"]
    assert sorted(r0["export_renames"]) == [(0, "pruned.ckpt"), (0, "pruned.pt")]
    assert r1["export_renames"] == []
    export_dir = runs["ddp_dir"] / "export"
    assert sorted(p.name for p in export_dir.iterdir()) == ["pruned.ckpt", "pruned.pt"]
    assert not [p for p in runs["ddp_dir"].rglob("*") if ".tmp" in p.name]
    assert r0["export_paths"] == r1["export_paths"]  # rank 1 learns the paths by broadcast
    widths = rc.export_widths(export_dir / "pruned.pt")
    last = r0["masks"][-1]
    for name in ("conv1", "conv2"):
        live = [all(m) for m in zip(*(v for k, v in last.items() if k.endswith(f"/{name}")))]
        width = widths[name].get("out_channels", widths[name].get("out_features"))
        assert width == sum(live), name


def test_two_processes_equal_one_process_with_the_same_global_batch(
    runs: dict[str, Any],
) -> None:
    r0, r1, one = *runs["ddp"], runs["single"]
    assert one["world_size"] == 1
    global_batches = [sorted(a + b) for a, b in zip(r0["seen"], r1["seen"])]
    assert global_batches == [sorted(s) for s in one["seen"]]
    assert r0["masks"] == one["masks"]
    ddp_widths = rc.export_widths(runs["ddp_dir"] / "export" / "pruned.pt")
    one_widths = rc.export_widths(runs["one_dir"] / "export" / "pruned.pt")
    assert ddp_widths == one_widths
    diff = max(
        float((r0["final_weights"][k] - v).abs().max()) for k, v in one["final_weights"].items()
    )
    assert diff < 1e-4, diff
    for key, value in one["metrics"].items():
        assert r0["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    print(f"2x16 vs 1x32: max |weight difference| {diff:.2e}; run took {runs['seconds']:.0f} s")


# ------------------------------------------------------------------------------------- FSDP
def test_sharded_strategies_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    """FSDP cannot run on CPU (Lightning: "requires a GPU accelerator"; torch: "FSDP needs a
    non-CPU accelerator device"), but a subclass of ``FSDPStrategy`` passes Lightning's check and
    reaches the callbacks' ``setup``, which runs before the strategy wraps the model: each callback
    refuses there, naming the strategy and the fix, before anything is sharded.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import FSDPStrategy

    class CPUFSDPStrategy(FSDPStrategy):
        """A genuine FSDPStrategy (for Lightning's GPU check, only the exact class is refused)."""

    stack, _ = rc.build_callbacks(tmp_path / "export")
    library = [cb for cb in stack if type(cb).__module__.startswith("lightning_sparsity")]
    assert len({type(cb) for cb in library}) == 6
    try:
        for callback in library:
            trainer = pl.Trainer(
                strategy=CPUFSDPStrategy(),
                accelerator="cpu",
                devices=1,
                max_steps=1,
                callbacks=[callback],
                logger=pl.loggers.CSVLogger(tmp_path),
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            expected = rf"`{type(callback).__name__}`.*CPUFSDPStrategy.*shards.*ddp"
            with pytest.raises(RuntimeError, match=expected):
                trainer.fit(rc.LitTiny(), rc.loader(8))
    finally:
        if torch.distributed.is_initialized():  # the 1-process group of setup_environment
            torch.distributed.destroy_process_group()


def test_the_sharding_check_knows_each_strategy() -> None:
    """The check behind the refusal, on Lightning's own strategy classes (instances made without
    ``__init__`` where it needs packages or devices this machine lacks).
    """
    from types import SimpleNamespace

    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
    )

    from lightning_sparsity.callbacks._runtime import refuse_sharded_strategy

    for cls in (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy):
        strategy = object.__new__(cls)
        with pytest.raises(RuntimeError, match=rf"`Owner`.*{cls.__name__}.*ddp"):
            refuse_sharded_strategy(SimpleNamespace(strategy=strategy), owner="Owner")
    for ok in (DDPStrategy(), SingleDeviceStrategy("cpu")):
        refuse_sharded_strategy(SimpleNamespace(strategy=ok), owner="Owner")
