"""Shared helpers of the benchmark scripts: machine description, result-file merging, timing.

Not part of the package: the scripts under ``benchmarks/`` import it by path.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (falls back to ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Where and with what a result was measured."""
    import lightning
    import torchvision

    info: dict[str, Any] = {
        "machine": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    with contextlib.suppress(OSError):
        info["load_average_at_start"] = list(os.getloadavg())
    return info


def merge_results(path: Path, key: str, name: str, record: dict[str, Any]) -> dict[str, Any]:
    """Read the JSON at ``path`` (if any), set ``data[key][name] = record`` and write it back,
    under an exclusive lock (methods may run in parallel processes).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = Path(tempfile.gettempdir()) / f"lightning_sparsity_{path.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        data.setdefault(key, {})[name] = record
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        tmp.replace(path)
    return data


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1
) -> dict[str, dict[str, float]]:
    """Time each callable ``reps`` times, interleaved (a, b, a, b, ...), after ``warmup`` calls
    each; returns the median, min and all times in seconds per name.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {
        name: {"median_s": statistics.median(ts), "min_s": min(ts), "times_s": ts}
        for name, ts in times.items()
    }


def fmt_int(n: float) -> str:
    """431080 -> '431.1K', 2293000 -> '2.29M'."""
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(int(n))
