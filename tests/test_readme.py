"""README.md: short, with the set-up commands, and a quick start that runs as written.

The quick start is extracted from README.md and executed in a fresh Python process, in an empty
folder into which the offline MNIST archives were copied (``data/MNIST/raw/*.gz``, the layout of
``../shared/data``): the data module finds them, unpacks them in the test's scratch cache
(``$LIGHTNING_SPARSITY_CACHE``, set by conftest.py) and checks their MD5, so nothing is
downloaded.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# the offline copy of MNIST, beside the repository (its README describes the layout)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

SETUP_COMMANDS = (
    'python -m pip install -c constraints.txt -e ".[dev]"',
    "python examples/lenet5_mnist.py --epochs 1",
    "python -m pytest",
)


def quick_start() -> str:
    """The one ```python block of the README's ``## Quick start`` section."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Quick start[ \t]*\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match is not None, "README.md has no `## Quick start` section"
    blocks = re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", match.group(1), flags=re.M | re.S)
    assert len(blocks) == 1, (
        f"expected one ```python block under `## Quick start`, got {len(blocks)}"
    )
    return blocks[0]


def test_readme_is_short_and_has_the_setup_commands() -> None:
    """At most ~200 lines (220 allowed), with the install, main-job and test commands."""
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; keep it to about 200"
    text = "\n".join(lines)
    for command in SETUP_COMMANDS:
        assert command in text, f"README.md lacks the set-up command `{command}`"


def test_quick_start_compiles() -> None:
    """The quick start is valid Python (checked without data, in no time)."""
    compile(quick_start(), f"{README}:Quick start", "exec")


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path: Path) -> None:
    """The quick start, run as written in an empty folder, exits 0 and exports the pruned files.

    One real epoch of LeNet-5 on MNIST: a few minutes on two CPU cores.
    """
    raw = SHARED_DATA / "MNIST" / "raw"
    if not raw.is_dir():
        pytest.skip(f"no offline MNIST copy at {raw} (torchvision layout MNIST/raw/*.gz)")
    data = tmp_path / "data" / "MNIST" / "raw"
    data.mkdir(parents=True)
    for archive in raw.glob("*.gz"):
        shutil.copyfile(archive, data / archive.name)  # copyfile: not the read-only mode bits
    script = tmp_path / "quick_start.py"
    script.write_text(quick_start(), encoding="utf-8")

    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    for suffix in ("ckpt", "pt2"):
        paths = sorted(tmp_path.glob(f"lightning_logs/*/pruned/pruned.{suffix}"))
        assert len(paths) == 1, f"expected one exported .{suffix}, found {paths}"
        assert paths[0].stat().st_size > 0
    # the printed report: the exported model is of the requested size (5% of the parameters)
    match = re.search(r"parameters: ([\d,]+) -> ([\d,]+)", done.stdout)
    assert match is not None, done.stdout[-4000:]
    dense, pruned = (int(g.replace(",", "")) for g in match.groups())
    assert 0.98 * int(0.05 * dense) <= pruned <= int(0.05 * dense)
