"""The export on the networks people use: timm's CNN families and torchvision's classification,
segmentation and detection models (``benchmarks/zoo.py``, which also writes the docs' table).

Each model, built without weights, gets ~40% of every conv's output channels made dead (filter,
bias, and the norm that reads the conv's output, found by watching a real forward); then
``prune_model(model, example)`` with nothing else must export (keeping what it cannot prove is
fine, refusing is not), the pruned outputs must equal the original's on a fresh batch of another
size, and the caller's model must be bit for bit what it was (tensors, training flags, hooks).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py"
_spec = importlib.util.spec_from_file_location("zoo_bench", _PATH)
assert _spec is not None
assert _spec.loader is not None
zoo = importlib.util.module_from_spec(_spec)
sys.modules["zoo_bench"] = zoo
_spec.loader.exec_module(zoo)

#: models whose analysis takes more than ~10 s here (still run by default)
SLOW = {"tv:retinanet_resnet50_fpn", "tv:keypointrcnn_resnet50_fpn", "tv:fcos_resnet50_fpn"}
#: where every dead channel must stay, so nothing can be removed exactly: weight-standardised
#: convs (the standardisation sees every input channel) and ConvNeXt-style blocks (each killed
#: conv feeds a LayerNorm over the channels)
NOTHING_REMOVABLE = {"nf_resnet26", "resnetv2_50x1_bit", "edgenext_xx_small", "tv:convnext_tiny"}


def _params() -> list[object]:
    return [
        pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
        for name in zoo.all_names()
    ]


@pytest.mark.parametrize("name", _params())
def test_zoo_model_exports_exactly(name: str) -> None:
    outcome = zoo.run_one(name)
    if outcome.status == "skipped":
        pytest.skip(f"{name} cannot be built here: {outcome.error}")
    assert outcome.status in ("exported", "pinned"), outcome.error
    assert outcome.caller_unchanged is True
    assert outcome.max_diff is not None
    assert outcome.max_diff < 1e-5, outcome.max_diff  # relative
    if name in NOTHING_REMOVABLE:
        assert outcome.status == "pinned"
    else:
        assert outcome.removed > 0, outcome.kept_reasons
        assert outcome.params_after < outcome.params_before
