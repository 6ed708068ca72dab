"""save_pt2 / save_onnx: files that run without model code, checked before they are renamed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

from lightning_sparsity import save_onnx, save_pt2
from lightning_sparsity.pruning import deploy


def convnet() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 4),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net


class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x) + self.b(y), self.a(x)


def test_pt2_runs_without_model_code_with_a_dynamic_batch(tmp_path: Path) -> None:
    net = convnet().train()  # exported in eval mode, its training flags restored afterwards
    path = save_pt2(net, torch.rand(2, 1, 8, 8), tmp_path / "net.pt2")
    assert all(m.training for m in net.modules())
    assert [p.name for p in tmp_path.iterdir()] == ["net.pt2"]
    program = torch.export.load(path).module()
    net.eval()
    for batch in (1, 2, 7):
        x = torch.rand(batch, 1, 8, 8)
        torch.testing.assert_close(program(x), net(x), rtol=1e-5, atol=1e-6)


def test_pt2_several_inputs_and_outputs(tmp_path: Path) -> None:
    net = TwoInTwoOut()
    args = (torch.rand(2, 4), torch.rand(2, 2))
    path = save_pt2(net, args, tmp_path / "net.pt2")
    got = torch.export.load(path).module()(*args)
    for have, want in zip(got, net(*args)):
        torch.testing.assert_close(have, want)


def test_onnx_matches_in_onnx_runtime_with_a_dynamic_batch(tmp_path: Path) -> None:
    net = convnet()
    path = save_onnx(net, torch.rand(2, 1, 8, 8), tmp_path / "net.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["net.onnx"]  # weights inside, no .data file
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    x = torch.rand(5, 1, 8, 8)
    (out,) = session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(out, net.eval()(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_a_file_that_does_not_match_is_never_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = convnet()
    other = convnet()  # different random weights: its program disagrees with `net`
    real = deploy.export_program
    monkeypatch.setattr(deploy, "export_program", lambda model, args, **kw: real(other, args, **kw))
    (tmp_path / "net.pt2").write_bytes(b"previous")
    with pytest.raises(RuntimeError, match=r"save_pt2\(path=.*net\.pt2.*differs.*not written"):
        save_pt2(net, torch.rand(2, 1, 8, 8), tmp_path / "net.pt2")
    assert (tmp_path / "net.pt2").read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["net.pt2"]


def test_missing_onnx_packages_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # find_spec() now reports it missing
    assert deploy.missing_onnx_packages() == ["onnxscript"]
    with pytest.raises(
        ModuleNotFoundError, match=r"\['onnxscript'\].*lightning-sparsity\[export\]"
    ):
        save_onnx(convnet(), torch.rand(2, 1, 8, 8), tmp_path / "net.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_example_inputs(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"save_pt2\(example_inputs=...\).*got list"):
        save_pt2(convnet(), [], tmp_path / "a.pt2")
    with pytest.raises(TypeError, match=r"argument 1 is a str"):
        save_pt2(convnet(), (torch.rand(2, 1, 8, 8), "x"), tmp_path / "a.pt2")
