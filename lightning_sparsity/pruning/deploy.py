"""Deployment files that need no Python model code: a ``torch.export`` program and ONNX.

The program is written as ``.pt2``. Each file is written atomically and, before it replaces the
target, read back and run on the example inputs (``torch.export.load`` / ONNX Runtime) and compared
with the model's own outputs.

The batch dimension (dim 0 of every input) is exported as dynamic when the model allows it
(``torch.export.Dim.AUTO``: it stays static where the code fixes the batch size).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_sparsity.pruning.outputs import eval_mode, tensors
from lightning_sparsity.pruning.serialization import atomic_write

ExampleInputs = torch.Tensor | Sequence[torch.Tensor]


def as_args(example_inputs: Any, owner: str) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` as a tuple of positional tensors (one tensor, or a tuple/list of them)."""
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(args, (tuple, list)) or not args:
        raise TypeError(
            f"`{owner}(example_inputs=...)`: expected a tensor or a non-empty tuple of tensors, "
            f"got {type(example_inputs).__name__}"
        )
    for i, arg in enumerate(args):
        if not isinstance(arg, torch.Tensor):
            raise TypeError(
                f"`{owner}(example_inputs=...)`: expected tensors, argument {i} is a "
                f"{type(arg).__name__}"
            )
    return tuple(args)


def run_outputs(model: Any, args: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The output tensors of ``model(*args)`` (any nesting flattened), on the CPU."""
    with torch.no_grad():
        return [t.detach().cpu() for t in tensors(model(*args))]


def _bigger_batch(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.cat([a, a[:1]]) for a in args)


def assert_outputs_close(
    expected: list[torch.Tensor],
    got: list[Any],
    *,
    what: str,
    rtol: float,
    atol: float,
) -> None:
    """Raise RuntimeError naming ``what`` unless ``got`` matches ``expected`` output by output."""
    if len(expected) != len(got):
        raise RuntimeError(f"{what}: {len(got)} outputs, the model gives {len(expected)}")
    for i, (want, have) in enumerate(zip(expected, got)):
        have_t = torch.as_tensor(have).to(want.dtype)
        if have_t.shape != want.shape or not torch.allclose(have_t, want, rtol=rtol, atol=atol):
            diff = (
                (have_t - want).abs().max().item()
                if have_t.shape == want.shape
                else f"shape {list(have_t.shape)} vs {list(want.shape)}"
            )
            raise RuntimeError(
                f"{what}: output {i} differs from the model's (max |diff| {diff}, rtol={rtol}, "
                f"atol={atol}); the file was not written"
            )


def export_program(
    model: nn.Module, example_inputs: ExampleInputs, *, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` in eval mode, batch dimension dynamic if allowed."""
    args = as_args(example_inputs, "export_program")
    shapes = tuple({0: torch.export.Dim.AUTO} for _ in args) if dynamic_batch else None
    with eval_mode(model):
        return torch.export.export(model, args, dynamic_shapes=shapes)


def _batch_is_dynamic(program: torch.export.ExportedProgram) -> bool:
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
            val = node.meta.get("val")
            if val is not None and val.dim() and not isinstance(val.shape[0], int):
                return True
    return False


def save_pt2(
    model: nn.Module,
    example_inputs: ExampleInputs,
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> Path:
    """Write ``model`` (in eval mode) as a ``torch.export`` program to ``path``.

    Load it anywhere with ``torch.export.load(path).module()``, no model code needed. With
    ``verify`` the written file is loaded and run on ``example_inputs`` (and, when the batch is
    dynamic, on a batch one larger) before it replaces ``path``.

    Raises:
        TypeError: bad ``example_inputs``.
        RuntimeError: the reloaded program's outputs differ; nothing is written.

    Example::

        >>> import tempfile, torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
        >>> path = save_pt2(net, torch.randn(2, 4), tempfile.mkdtemp() + "/net.pt2")
        >>> torch.export.load(path).module()(torch.randn(5, 4)).shape
        torch.Size([5, 3])
    """
    args = as_args(example_inputs, "save_pt2")
    program = export_program(model, args, dynamic_batch=dynamic_batch)

    def check(tmp: Path) -> None:
        loaded = torch.export.load(tmp).module()
        batches = [args, _bigger_batch(args)] if _batch_is_dynamic(program) else [args]
        with eval_mode(model):
            for batch in batches:
                assert_outputs_close(
                    run_outputs(model, batch),
                    run_outputs(loaded, batch),
                    what=f"`save_pt2(path={str(path)!r})`",
                    rtol=rtol,
                    atol=atol,
                )

    return atomic_write(
        path, lambda tmp: torch.export.save(program, tmp), check if verify else None
    )


def missing_onnx_packages(*, verify: bool = True) -> list[str]:
    """The packages the ONNX export needs that are missing (``onnxruntime`` only to verify)."""
    needed = ["onnx", "onnxscript"] + (["onnxruntime"] if verify else [])
    return [name for name in needed if importlib.util.find_spec(name) is None]


def save_onnx(
    model: nn.Module,
    example_inputs: ExampleInputs,
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    dynamo: bool = True,
) -> Path:
    """Write ``model`` (in eval mode) as ONNX to ``path`` (weights inside the one file).

    Inputs are named ``input`` (``input_0``, ``input_1``... for several), outputs ``output``
    (``output_0``...). With ``verify`` the written file runs in ONNX Runtime (CPU) on
    ``example_inputs`` (and on a batch one larger when the batch is dynamic) and must match the
    model before it replaces ``path``. ``dynamo=False`` uses the legacy TorchScript exporter.

    Raises:
        ModuleNotFoundError: ``onnx``/``onnxscript`` (or ``onnxruntime`` with ``verify``) missing.
        RuntimeError: ONNX Runtime's outputs differ; nothing is written.
    """
    missing = missing_onnx_packages(verify=verify)
    if missing:
        raise ModuleNotFoundError(
            f"`save_onnx`: the ONNX export needs {missing}, which are not installed. "
            'HINT: pip install "lightning-sparsity[export]"'
        )
    args = as_args(example_inputs, "save_onnx")
    with eval_mode(model):
        n_out = len(run_outputs(model, args))
    inputs = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    outputs = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    export_kwargs: dict[str, Any] = {"input_names": inputs, "output_names": outputs}
    if dynamo:
        if dynamic_batch:
            export_kwargs["dynamic_shapes"] = tuple({0: torch.export.Dim.AUTO} for _ in args)
        export_kwargs.update(dynamo=True, verbose=False, external_data=False)
    else:
        if dynamic_batch:
            export_kwargs["dynamic_axes"] = {name: {0: "batch"} for name in inputs + outputs}
        export_kwargs["dynamo"] = False

    def write(tmp: Path) -> None:
        with eval_mode(model):
            torch.onnx.export(model, args, str(tmp), **export_kwargs)

    def check(tmp: Path) -> None:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        dims = session.get_inputs()[0].shape
        dynamic = bool(dims) and not isinstance(dims[0], int)
        with eval_mode(model):
            for batch in [args, _bigger_batch(args)] if dynamic else [args]:
                feed = {n: a.detach().cpu().numpy() for n, a in zip(names, batch)}
                assert_outputs_close(
                    run_outputs(model, batch),
                    list(session.run(None, feed)),
                    what=f"`save_onnx(path={str(path)!r})` in ONNX Runtime",
                    rtol=rtol,
                    atol=atol,
                )

    return atomic_write(path, write, check if verify else None)
