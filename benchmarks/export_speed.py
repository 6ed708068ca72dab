"""Export time and CPU inference latency of physically pruned models against their dense originals.

For VGG-16 (CIFAR variant, 3x32x32) and torchvision's ResNet-50 (3x224x224), about half of the
prunable filters are killed at random (seeded): weights, bias and the following BatchNorm's scale
and shift are zeroed, so the channel emits exactly 0. ``prune_model`` then removes them. In VGG-16
every conv and the hidden classifier layer lose half their units; in ResNet-50 the two inner
convolutions of every bottleneck lose half (the block outputs are tied to the residual sums).

Reported per model: export time, MACs (dense / pruned), PyTorch eager latency of both at the same
batch (interleaved repetitions, medians, ``torch.set_num_threads`` fixed), the speedup, and the
figure of merit ``speedup / MAC reduction`` (1.0 = the latency falls as much as the MACs); plus the
ONNX Runtime latency of both (dense and pruned ONNX files, same threads).

Usage::

    python benchmarks/export_speed.py            # batch 32, writes results/export_speed.*
    python benchmarks/export_speed.py --quick --out /tmp/r  # seconds: tiny inputs, 1 rep
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, fmt_int, interleaved_medians, machine_info, merge_results

from lightning_sparsity.pruning.masks import kill_filters


def kill_random_filters(
    model: nn.Module, layer_names: list[str], fraction: float, seed: int
) -> int:
    """Kill ``fraction`` of the output units (random, seeded) of each named layer with the
    library's ``kill_filters``. Returns the number of units killed."""
    gen = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    dead = {}
    for name in layer_names:
        n_out = mods[name].weight.shape[0]
        dead[name] = torch.randperm(n_out, generator=gen)[: round(fraction * n_out)]
    kill_filters(model, dead)
    return sum(int(idx.numel()) for idx in dead.values())


def macs_of(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass over ``x`` (FlopCounterMode FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def vgg16() -> tuple[nn.Module, list[str], tuple[int, ...]]:
    from lightning_sparsity.models import VGG16CIFAR

    model = VGG16CIFAR()
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return model, layers + linears[:-1], (3, 32, 32)


def resnet50() -> tuple[nn.Module, list[str], tuple[int, ...]]:
    from torchvision.models import resnet50 as tv_resnet50

    model = tv_resnet50(weights=None)
    layers = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
        and (n.endswith(".conv1") or n.endswith(".conv2"))
        and n.startswith("layer")
    ]
    return model, layers, (3, 224, 224)


def _onnx_session(model: nn.Module, x: torch.Tensor, path: Path, threads: int) -> Any:
    import onnxruntime as ort

    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def bench_model(
    name: str,
    factory: Any,
    batch: int,
    reps: int,
    threads: int,
    fraction: float,
    seed: int,
    onnx: bool,
    size: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    from lightning_sparsity import prune_model

    torch.manual_seed(seed)
    dense, layers, shape = factory()
    if size is not None:
        shape = size
    dense.eval()
    killed = kill_random_filters(dense, layers, fraction, seed)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
    example = x[:1]

    start = time.perf_counter()
    pruned = prune_model(copy.deepcopy(dense), example, verify=False)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    prune_model(copy.deepcopy(dense), example, verify=True)
    export_verified_s = time.perf_counter() - start
    pruned.eval()
    with torch.no_grad():
        max_diff = float((dense(x) - pruned(x)).abs().max())

    dense_params = sum(p.numel() for p in dense.parameters())
    pruned_params = sum(p.numel() for p in pruned.parameters())
    dense_macs, pruned_macs = macs_of(dense, example), macs_of(pruned, example)
    mac_reduction = dense_macs / pruned_macs

    def run(m: nn.Module) -> Any:
        def fn() -> None:
            with torch.inference_mode():
                m(x)

        return fn

    eager = interleaved_medians({"dense": run(dense), "pruned": run(pruned)}, reps=reps, warmup=1)
    speedup = eager["dense"]["median_s"] / eager["pruned"]["median_s"]
    record: dict[str, Any] = {
        "input": [batch, *shape],
        "killed_units": killed,
        "killed_fraction_per_layer": fraction,
        "pruned_layers": len(layers),
        "export_s": round(export_s, 3),
        "export_with_verify_s": round(export_verified_s, 3),
        "max_abs_output_diff": max_diff,
        "params": {"dense": dense_params, "pruned": pruned_params},
        "macs_per_image": {"dense": dense_macs, "pruned": pruned_macs},
        "mac_reduction": round(mac_reduction, 3),
        "eager_latency_s": {k: round(v["median_s"], 5) for k, v in eager.items()},
        "eager_times_s": {k: [round(t, 5) for t in v["times_s"]] for k, v in eager.items()},
        "eager_speedup": round(speedup, 3),
        "figure_of_merit": round(speedup / mac_reduction, 3),
        "reps": reps,
    }
    if onnx:
        with tempfile.TemporaryDirectory() as tmp:
            # static batch: the ONNX files are exported at the benchmark's batch size
            sessions = {
                k: _onnx_session(m, x, Path(tmp) / f"{k}.onnx", threads)
                for k, m in (("dense", dense), ("pruned", pruned))
            }
            feeds = {"x": x.numpy()}
            ort_out = {k: s.run(None, feeds)[0] for k, s in sessions.items()}
            ort_t = interleaved_medians(
                {k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()},
                reps=reps,
                warmup=1,
            )
        ort_speedup = ort_t["dense"]["median_s"] / ort_t["pruned"]["median_s"]
        record["onnxruntime_latency_s"] = {k: round(v["median_s"], 5) for k, v in ort_t.items()}
        record["onnxruntime_speedup"] = round(ort_speedup, 3)
        record["onnxruntime_figure_of_merit"] = round(ort_speedup / mac_reduction, 3)
        record["onnxruntime_max_abs_diff_vs_torch"] = float(
            abs(torch.from_numpy(ort_out["pruned"]) - pruned(x).detach()).max()
        )
    print(
        f"[export_speed] {name}: export {export_s:.2f} s, MACs {fmt_int(dense_macs)} -> "
        f"{fmt_int(pruned_macs)} ({mac_reduction:.2f}x), eager "
        f"{eager['dense']['median_s'] * 1e3:.1f} -> {eager['pruned']['median_s'] * 1e3:.1f} ms "
        f"({speedup:.2f}x, merit {speedup / mac_reduction:.2f})",
        flush=True,
    )
    return record


def markdown(data: dict[str, Any]) -> str:
    """The results table from ``export_speed.json``."""
    lines = [
        "| model | input | params dense -> pruned | MACs/image dense -> pruned | MAC cut | export "
        "| eager dense -> pruned | speedup | speedup / MAC cut | ORT dense -> pruned "
        "| ORT speedup | ORT merit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in data.get("models", {}).items():
        p, m, e = r["params"], r["macs_per_image"], r["eager_latency_s"]
        ort = r.get("onnxruntime_latency_s")
        ort_cells = (
            f"{ort['dense'] * 1e3:.1f} -> {ort['pruned'] * 1e3:.1f} ms | "
            f"{r['onnxruntime_speedup']:.2f}x | {r['onnxruntime_figure_of_merit']:.2f}"
            if ort
            else "n/a | | "
        )
        lines.append(
            f"| {name} | {'x'.join(map(str, r['input']))} | {fmt_int(p['dense'])} -> "
            f"{fmt_int(p['pruned'])} | {fmt_int(m['dense'])} -> {fmt_int(m['pruned'])} | "
            f"{r['mac_reduction']:.2f}x | {r['export_s']:.2f} s | {e['dense'] * 1e3:.1f} -> "
            f"{e['pruned'] * 1e3:.1f} ms | {r['eager_speedup']:.2f}x | {r['figure_of_merit']:.2f} "
            f"| {ort_cells} |"
        )
    meta = data.get("meta", {})
    head = (
        f"Measured on {meta.get('cpu')} ({meta.get('cpu_count')} cores, load average at start "
        f"{', '.join(f'{x:.1f}' for x in meta.get('load_average_at_start', []))}), "
        f"torch threads {meta.get('torch_threads')}, torch {meta.get('torch')}, torchvision "
        f"{meta.get('torchvision')}, onnxruntime {meta.get('onnxruntime')}, {meta.get('date')}. "
        "Latency: median of interleaved repetitions; target for `speedup / MAC cut`: >= 0.8."
    )
    return "# Export speed\n\n" + head + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny inputs, 1 repetition")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--reps_resnet", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", action="append", choices=("vgg16", "resnet50"))
    parser.add_argument("--no_onnx", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    import onnxruntime

    meta = machine_info() | {"onnxruntime": onnxruntime.__version__}
    out = args.out / "export_speed.json"
    for name in args.model or ["vgg16", "resnet50"]:
        factory = vgg16 if name == "vgg16" else resnet50
        if args.quick:  # tiny inputs, one repetition; ONNX only for VGG (ResNet-50's is slow)
            size = (3, 32, 32) if name == "vgg16" else (3, 64, 64)
            onnx = not args.no_onnx and name == "vgg16"
            record = bench_model(
                name, factory, 2, 1, args.threads, args.fraction, args.seed, onnx=onnx, size=size
            )
        else:
            reps = args.reps if name == "vgg16" else args.reps_resnet
            record = bench_model(
                name,
                factory,
                args.batch,
                reps,
                args.threads,
                args.fraction,
                args.seed,
                onnx=not args.no_onnx,
            )
        record["quick"] = args.quick
        record["machine"] = meta
        data = merge_results(out, "models", name, record)
    data["meta"] = meta
    out.write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "export_speed.md").write_text(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
