"""Each benchmark script runs end to end on a tiny budget (``--quick``) and writes its result files.

The scripts are run in a subprocess, exactly as a user runs them, with ``--out`` pointing at a
temporary folder so that the committed results are never overwritten.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_lenet5_quick_dense_and_model_pruning(data_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    proc = _run(
        "lenet5_mnist.py",
        "--quick",
        "--data_dir",
        str(data_root),
        "--out",
        str(tmp_path),
        "--method",
        "dense",
        "--method",
        "lightning_model_pruning",
    )
    assert "full run" in proc.stdout  # the time estimate is printed
    data = json.loads((tmp_path / "lenet5_mnist.json").read_text())
    dense = data["methods"]["dense"]
    assert dense["quick"] is True
    assert dense["params"] == dense["dense_params"] == 431_080
    assert dense["widths"] == {"conv1": 20, "conv2": 50, "fc1_in": 800, "fc2_in": 500}
    assert 0.0 <= dense["accuracy"] <= 1.0
    assert dense["curve"]
    assert dense["curve"][0]["conv1"] == 20
    masked = data["methods"]["lightning_model_pruning"]
    # ModelPruning killed 80% of conv1/conv2/fc1 units after the only epoch: the export is smaller
    assert masked["widths"]["conv1"] == 4
    assert masked["widths"]["conv2"] == 10
    assert masked["params"] < dense["params"]
    assert masked["curve"][-1]["conv1"] == 4
    md = (tmp_path / "lenet5_mnist.md").read_text()
    assert "| dense (quick) |" in md
    assert "BC-GHS" in md
    assert (tmp_path / "lenet5_mnist.png").stat().st_size > 0


def test_lenet5_quick_torch_pruning(data_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch_pruning")
    _run(
        "lenet5_mnist.py",
        "--quick",
        "--data_dir",
        str(data_root),
        "--out",
        str(tmp_path),
        "--method",
        "torch_pruning",
        "--tp_target_params",
        "20000",
    )
    record = json.loads((tmp_path / "lenet5_mnist.json").read_text())["methods"]["torch_pruning"]
    assert record["params"] <= 20_000
    assert record["torch_pruning"]["reached_params"] == record["params"]


def test_export_speed_quick(tmp_path: Path) -> None:
    _run("export_speed.py", "--quick", "--out", str(tmp_path))
    data = json.loads((tmp_path / "export_speed.json").read_text())
    for name in ("vgg16", "resnet50"):
        r = data["models"][name]
        assert r["quick"] is True
        assert r["params"]["pruned"] < r["params"]["dense"]
        assert r["mac_reduction"] > 1.5  # half the filters of (nearly) every conv are gone
        assert r["max_abs_output_diff"] < 1e-3  # the export is exact
        # the reported ratios are those of the reported medians (timing itself is not tested)
        lat = r["eager_latency_s"]
        assert lat["dense"] > 0
        assert lat["pruned"] > 0
        assert r["eager_speedup"] == pytest.approx(lat["dense"] / lat["pruned"], rel=2e-3)
        for key in ("dense", "pruned"):
            times = sorted(r["eager_times_s"][key])
            assert lat[key] == pytest.approx(times[len(times) // 2], rel=1e-3)  # the median
        assert r["figure_of_merit"] == pytest.approx(
            r["eager_speedup"] / r["mac_reduction"], rel=5e-3
        )
    vgg = data["models"]["vgg16"]
    ort = vgg["onnxruntime_latency_s"]
    assert vgg["onnxruntime_speedup"] == pytest.approx(ort["dense"] / ort["pruned"], rel=2e-3)
    md = (tmp_path / "export_speed.md").read_text()
    assert "| vgg16 |" in md
    assert "| resnet50 |" in md


def test_overhead_quick(tmp_path: Path) -> None:
    _run("overhead.py", "--quick", "--out", str(tmp_path))
    data = json.loads((tmp_path / "overhead.json").read_text())
    assert data["quick"] is True
    assert data["machine"]["torch"]
    configs = data["models"]["lenet5"]["configs"]
    expected = {
        "plain",
        "regularizer group_lasso",
        "regularizer l1_l2",
        "regularizer capped_l1",
        "regularizer l1",
        "proximal l0 (group hard)",
        "proximal l1 (group soft, per-coordinate)",
        "splitting",
    }
    assert expected <= set(configs)
    assert configs["plain"]["ratio"] == 1.0
    assert configs["plain"]["hook_median_ms"] == 0.0
    for name, record in configs.items():
        assert record["steps_timed"] >= 1, name
        assert record["median_ms"] > 0, name
        if name != "plain":
            assert record["hook_median_ms"] > 0, name  # the callback's hooks really ran
    md = (tmp_path / "overhead.md").read_text()
    assert "| plain |" in md
    assert "| regularizer l1_l2 |" in md
