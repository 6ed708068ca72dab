"""Resume after a crash: SIGKILL in the middle of an epoch, resume from ``last.ckpt`` with
``ckpt_path``, and end exactly where an uninterrupted run ends.

``tests/scripts/crash_resume.py`` trains the tiny CNN with the regularizer (strength on an epoch
schedule), variable splitting (``U``, ``beta`` growing every 2 epochs), thresholding (every epoch,
4 rounds), the monitor and the export, plus ``ModelCheckpoint(save_last=True,
every_n_train_steps=2)``; 6 epochs of 8 steps. The data loader is resumable (Lightning's
``state_dict`` protocol), so a mid-epoch resume continues with the next batch. The crashes, all
``SIGKILL`` from this test (``kill -9``: no handler, no cleanup):

1. run A stops itself at step 21 (epoch 2, batch 4; after 2 thresholding rounds) and is killed;
2. run B resumes from ``last.ckpt`` (step 20), stops at step 37 (epoch 4, batch 4), is killed;
3. run C resumes from ``last.ckpt`` (step 36), trains to the end and is killed half-way through
   writing the ``.pt`` export (after the ``.ckpt`` export was complete);
4. run D (here, in-process) resumes from the final ``last.ckpt`` and writes the export again.

Meanwhile the same training runs here uninterrupted, with the same seed.

Checked after each resume: the masks and round count of the thresholding, ``U``, ``beta`` and the
growth position of the splitting, the regularizer's strength (its schedule position) and the
weights, as the callbacks hold them after ``on_train_start``, equal the checkpoint's and the values
the killed run printed at that step; every step's batch, strength, ``beta`` and round count equal
the uninterrupted run's. At the end: the exported widths and weights equal the uninterrupted run's.
Files: no ``*.tmp`` after a crash in training; after the crash in the export the complete file is
intact, the interrupted file's name does not exist, and only its hidden temporary file is left.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import reliability_common as rc  # noqa: E402

from lightning_sparsity import load_pruned  # noqa: E402

TIMEOUT = 240.0


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("crash_resume", SCRIPTS / "crash_resume.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["crash_resume"] = module
    spec.loader.exec_module(module)
    return module


class Run:
    """The script in a subprocess; its stdout lines read by a thread."""

    def __init__(self, out: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPTS / "crash_resume.py"), "--out", str(out), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, prefix: str) -> str:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                tail = "\n".join(self.lines[-40:])
                raise AssertionError(f"the script ended before {prefix!r}:\n{tail}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line
        self.kill()
        raise AssertionError(f"no {prefix!r} within {TIMEOUT} s")

    def kill(self) -> None:
        """SIGKILL, by the process id this test started."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        assert self.proc.returncode == -signal.SIGKILL

    def steps(self) -> list[str]:
        return [line for line in self.lines if line.startswith("STEP ")]


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


def _ckpt(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def crashes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("crash")
    ref_dir = tmp_path_factory.mktemp("uninterrupted")
    script = _script()
    found: dict[str, Any] = {"out": out, "start": time.monotonic()}
    last = out / "checkpoints" / "last.ckpt"

    run_a = Run(out, "--block-at-step", "21")
    threads = torch.get_num_threads()
    found["reference"] = script.run(ref_dir)  # uninterrupted, while A trains
    torch.set_num_threads(threads)
    found["ref_dir"] = ref_dir
    try:
        found["blocked_a"] = run_a.wait_for("BLOCKED")
    finally:
        run_a.kill()
    found["steps_a"] = run_a.steps()
    found["ckpt_a"] = _ckpt(last)
    found["tmp_after_a"] = _tmp_files(out)

    run_b = Run(out, "--ckpt", str(last), "--block-at-step", "37")
    try:
        run_b.wait_for("RESTORED")
        found["restored_b"] = torch.load(out / "restored.pt", weights_only=True)
        found["blocked_b"] = run_b.wait_for("BLOCKED")
    finally:
        run_b.kill()
    found["steps_b"] = run_b.steps()
    found["ckpt_b"] = _ckpt(last)
    found["tmp_after_b"] = _tmp_files(out)

    run_c = Run(out, "--ckpt", str(last), "--block-in-export")
    try:
        run_c.wait_for("RESTORED")
        found["restored_c"] = torch.load(out / "restored.pt", weights_only=True)
        found["blocked_c"] = run_c.wait_for("EXPORT_BLOCKED")
    finally:
        run_c.kill()
    found["steps_c"] = run_c.steps()
    found["export_after_c"] = sorted(p.name for p in (out / "export").iterdir())
    found["ckpt_c"] = _ckpt(last)

    found["final_d"] = script.run(out, last)  # resumes the finished run: exports again
    found["restored_d"] = torch.load(out / "restored.pt", weights_only=True)
    found["seconds"] = time.monotonic() - found["start"]
    return found


def _step_fields(line: str) -> tuple[int, int, int, int, float, float, int]:
    _, gs, epoch, batch, first, strength, beta, rounds = line.split()
    return int(gs), int(epoch), int(batch), int(first), float(strength), float(beta), int(rounds)


def test_each_kill_happened_mid_epoch_after_thresholding(crashes: dict[str, Any]) -> None:
    assert crashes["blocked_a"] == "BLOCKED 21"
    gs, epoch, batch, *_, rounds = _step_fields(crashes["steps_a"][-1])
    assert (gs, epoch, batch) == (21, 2, 4)
    assert rounds == 2
    assert crashes["ckpt_a"]["global_step"] == 20
    assert crashes["ckpt_a"]["epoch"] == 2
    assert crashes["blocked_b"] == "BLOCKED 37"
    assert crashes["ckpt_b"]["global_step"] == 36
    assert crashes["ckpt_b"]["epoch"] == 4
    assert crashes["blocked_c"].startswith("EXPORT_BLOCKED .pruned.")


def _callback_state(ckpt: dict[str, Any], key: str) -> dict[str, Any]:
    return ckpt["callbacks"][key]


@pytest.mark.parametrize(("restored", "ckpt", "killed_steps"), [("b", "a", "a"), ("c", "b", "b")])
def test_callback_state_is_exactly_restored(
    crashes: dict[str, Any], restored: str, ckpt: str, killed_steps: str
) -> None:
    state = crashes[f"restored_{restored}"]
    saved = crashes[f"ckpt_{ckpt}"]
    assert (state["epoch"], state["global_step"]) == (saved["epoch"], saved["global_step"])
    # thresholding: masks and round count (its schedule position)
    thr = _callback_state(saved, state["thresholding"]["state_key"])
    assert state["thresholding"]["masks"] == thr["masks"]
    assert state["thresholding"]["rounds"] == thr["rounds"] >= 2
    assert any(not all(m) for m in thr["masks"].values())  # filters were killed
    # splitting: U bit for bit, beta and the growth position
    split = _callback_state(saved, state["splitting"]["state_key"])
    assert state["splitting"]["beta"] == split["beta"]
    assert state["splitting"]["growth_epoch"] == split["growth_epoch"]
    assert state["splitting"]["U"].keys() == split["U"].keys()
    for name, u in split["U"].items():
        assert torch.equal(state["splitting"]["U"][name], u), name
    # regularizer: the schedule's value at the checkpoint's epoch, the one the killed run used
    killed = {s[0]: s for s in map(_step_fields, crashes[f"steps_{killed_steps}"])}
    at_save = killed[saved["global_step"]]
    assert state["regularizer"]["strength"] == at_save[4]
    assert state["splitting"]["beta"] == at_save[5]
    assert state["thresholding"]["rounds"] == at_save[6]
    # the weights, dead filters included; the checkpoint's model holds the splitting method's U
    # (what will be exported) and its callback state W, which the resumed run trains on
    trained = split["W"]
    assert trained.keys() == split["U"].keys()
    for key, value in saved["state_dict"].items():
        layer = key.removeprefix("model.").removesuffix(".weight")
        if key.endswith(".weight") and layer in trained:
            assert torch.equal(value, split["U"][layer]), key
            value = trained[layer]
        assert torch.equal(state["weights"][key], value), key


def test_every_step_matches_the_uninterrupted_run(crashes: dict[str, Any]) -> None:
    reference = [_step_fields(s) for s in crashes["reference"]["steps"]]
    assert len(reference) == 6 * 8
    by_step = {r[0]: r for r in reference}
    seen = 0
    for phase in ("a", "b", "c"):
        for line in crashes[f"steps_{phase}"]:
            fields = _step_fields(line)
            assert fields == by_step[fields[0]], (phase, line)
            seen += 1
    assert seen >= 48  # A: 1-21, B: 21-37, C: 37-48 (steps replayed after a kill included)


def test_final_export_equals_the_uninterrupted_run(crashes: dict[str, Any]) -> None:
    ref_export = crashes["ref_dir"] / "export"
    export = crashes["out"] / "export"
    for name in ("pruned.ckpt", "pruned.pt"):
        ref, got = _ckpt(ref_export / name), _ckpt(export / name)
        assert got["pruned_widths"] == ref["pruned_widths"], name
        assert got["state_dict"].keys() == ref["state_dict"].keys()
        for key, value in ref["state_dict"].items():
            assert torch.equal(got["state_dict"][key], value), (name, key)
    widths = rc.export_widths(export / "pruned.pt")
    original = rc.TinyNet()
    assert widths["conv1"]["out_channels"] < original.conv1.out_channels  # something was pruned
    final, ref = crashes["final_d"], crashes["reference"]
    assert final["thresholding"]["masks"] == ref["thresholding"]["masks"]
    for key, value in ref["weights"].items():
        assert torch.equal(final["weights"][key], value), key


def test_no_half_written_file(crashes: dict[str, Any]) -> None:
    assert crashes["tmp_after_a"] == []
    assert crashes["tmp_after_b"] == []
    # killed half-way through the .pt export: the .ckpt export before it is complete, the .pt
    # name does not exist, only the hidden temporary file is left
    after_c = crashes["export_after_c"]
    assert "pruned.ckpt" in after_c
    assert "pruned.pt" not in after_c
    leftovers = [n for n in after_c if n != "pruned.ckpt"]
    assert len(leftovers) == 1
    assert leftovers[0].startswith(".pruned.")
    assert ".tmp" in leftovers[0]
    assert leftovers[0].endswith(".pt")
    # every file that carries an export's name opens and loads completely
    export = crashes["out"] / "export"
    for name in ("pruned.ckpt", "pruned.pt"):
        model = load_pruned(export / name, rc.LitTiny() if name.endswith("ckpt") else rc.TinyNet())
        assert sum(p.numel() for p in model.parameters()) > 0


def test_report_numbers(crashes: dict[str, Any]) -> None:
    """The figures the docs quote (printed with ``-s``): three SIGKILLs survived, two in the middle
    of an epoch (8 steps each) and one during the export.
    """
    assert crashes["blocked_a"].startswith("BLOCKED")
    assert crashes["blocked_b"].startswith("BLOCKED")
    assert crashes["blocked_c"].startswith("EXPORT_BLOCKED")
    for phase in ("a", "b"):
        last = _step_fields(crashes[f"steps_{phase}"][-1])[0]
        assert last % 8 != 0, (phase, last)  # killed mid-epoch
    print(
        f"crash/resume: 3 SIGKILLs survived (2 mid-epoch, 1 mid-export), {crashes['seconds']:.0f} s"
    )


def test_export_after_resuming_a_finished_run_without_example_inputs(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_sparsity import PrunedExport

    def fit(ckpt: Path | None) -> PrunedExport:
        export = PrunedExport(dirpath=tmp_path / "export", formats=("pt",))
        trainer = pl.Trainer(
            max_epochs=1,
            accelerator="cpu",
            callbacks=[
                KillConv1Filter(),
                export,  # last.ckpt at the last batch: a resume runs the epoch end and the export
                ModelCheckpoint(tmp_path, save_last=True, every_n_train_steps=1),
            ],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(rc.LitTiny(), rc.loader(32), ckpt_path=ckpt)
        return export

    fit(None)
    # as if the export had been killed half-way: no file under the real name, a stale temporary
    (tmp_path / "export" / "pruned.pt").unlink()
    stale = tmp_path / "export" / ".pruned.abc123.tmp.pt"
    stale.write_bytes(b"half-written")
    export = fit(tmp_path / "last.ckpt")  # runs no batch: the example comes from the checkpoint
    assert export.paths["pt"].is_file()
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["pruned.pt"]


class KillConv1Filter:
    """A callback killing conv1's filter 0 before the export (something to prune)."""

    def __new__(cls) -> Any:
        import lightning.pytorch as pl

        class _Kill(pl.Callback):
            def on_train_end(self, trainer: Any, pl_module: Any) -> None:
                with torch.no_grad():
                    pl_module.model.conv1.weight[0] = 0.0
                    pl_module.model.conv1.bias[0] = 0.0

        return _Kill()
