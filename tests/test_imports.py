"""``import lightning_sparsity`` never imports torchvision: only ``lightning_sparsity.data`` does.

Lightning itself imports torchmetrics, which imports torchvision whenever it is installed; so the
check is that no module of this package is the importer, not that torchvision stays unloaded
after Lightning is loaded.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_sparsity"

# Records, for every import of torchvision, the file whose import statement triggered it.
PROBE = r"""
import json, sys, traceback

importers = []

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":  # the first import; submodules follow from torchvision
            frames = [
                f.filename for f in traceback.extract_stack()[:-1]
                if not f.filename.startswith("<frozen")
            ]
            importers.append(frames[-1])
        return None

sys.meta_path.insert(0, Watch())
import lightning_sparsity

result = {"after_bare_import": "torchvision" in sys.modules, "missing": []}
for name in ("build_model", "LeNet5Caffe", "select_layers"):
    getattr(lightning_sparsity, name)
result["after_torch_only_names"] = "torchvision" in sys.modules
for name, module in lightning_sparsity._EXPORTS.items():
    if module == "lightning_sparsity.data":
        continue
    try:
        getattr(lightning_sparsity, name)
    except ModuleNotFoundError as err:  # a module another issue has not written yet
        if not (err.name or "").startswith("lightning_sparsity"):
            raise
        result["missing"].append(name)
result["importers"] = importers
print(json.dumps(result))
"""


def test_no_package_module_imports_torchvision() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["after_bare_import"] is False
    assert result["after_torch_only_names"] is False
    assert result["missing"] == [], f"exported names whose module is missing: {result['missing']}"
    ours = [f for f in result["importers"] if str(PACKAGE) in f]
    assert ours == [], f"lightning_sparsity modules import torchvision: {ours}"


def test_only_data_module_names_torchvision_in_source() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "data.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name.split(".")[0] == "torchvision" for name in names):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert offenders == []


def test_license_and_typing_marker_ship_with_the_package() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert "Apache License" in (root / "LICENSE").read_text()
    assert (root / "lightning_sparsity" / "py.typed").is_file()
    assert 'lightning_sparsity = ["py.typed"]' in (root / "pyproject.toml").read_text()
