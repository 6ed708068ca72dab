"""Prune the networks people use: timm's CNN families and torchvision's vision models.

Each model is built without weights, ~40% of every conv's output channels are made dead (the
filter, its bias, and the scale, shift and running mean of the norm layer that reads the conv's
output, found by watching a real forward, not by the library's analysis), and ``prune_model`` is
called with nothing else. Per model: exported (with the share of the dead channels removed),
exported with every dead channel kept, or refused (the error); the outputs of the pruned model
against the original on a fresh batch of another size; the caller's model compared bit for bit
before and after.

    python benchmarks/zoo.py                     # every model, writes results/zoo.{json,md}
    python benchmarks/zoo.py --only resnet18 tv:fcn_resnet50

Needs ``pip install timm`` (``pip install -e ".[zoo]"``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

RESULTS = Path(__file__).resolve().parent / "results"

#: timm CNN families: one small member each (name -> input side)
TIMM: dict[str, int] = {
    "resnet18": 64, "resnet50d": 64, "resnext26ts": 64, "seresnext26d_32x4d": 64,
    "ecaresnet26t": 64, "skresnet18": 64, "resnest14d": 64, "res2net50_26w_4s": 64,
    "resnetrs50": 64, "wide_resnet50_2": 64, "resnetv2_50x1_bit": 64,
    "nf_resnet26": 64, "dm_nfnet_f0": 64, "regnetx_002": 64, "regnety_002": 64,
    "regnetz_b16": 64, "efficientnet_b0": 64, "tf_efficientnet_b0": 64, "efficientnetv2_rw_t": 64,
    "tf_efficientnetv2_b0": 64, "mobilenetv2_050": 64, "mobilenetv3_small_050": 64,
    "mobilenetv4_conv_small": 64, "mnasnet_050": 64, "fbnetc_100": 64, "spnasnet_100": 64,
    "mixnet_s": 64, "tinynet_e": 64, "lcnet_050": 64, "hardcorenas_a": 64, "ghostnet_050": 64,
    "ghostnetv2_100": 64, "repghostnet_050": 64, "rexnet_100": 64, "densenet121": 64,
    "dpn48b": 64, "dla34": 64, "cspresnet50": 64, "cspdarknet53": 64, "cs3darknet_s": 64,
    "darknet17": 64, "vgg11_bn": 64, "repvgg_a0": 64, "mobileone_s0": 64,
    "ese_vovnet19b_dw": 64, "selecsls42b": 64, "gernet_s": 64, "hrnet_w18_small": 64,
    "inception_v3": 96, "inception_v4": 96, "xception41": 96, "convnext_atto": 64,
    "convnextv2_atto": 64, "inception_next_atto": 64, "poolformerv2_s12": 64,
    "hgnet_tiny": 64, "hgnetv2_b0": 64, "tresnet_m": 64, "fastvit_t8": 64,
    "efficientvit_b0": 64, "mobilevit_xxs": 64, "edgenext_xx_small": 64, "rdnet_tiny": 64,
    "res2next50": 64, "sebotnet33ts_256": 256, "halonet26t": 256, "coatnet_nano_rw_224": 224,
}  # fmt: skip

#: torchvision: classification, segmentation, detection
TORCHVISION: dict[str, tuple[str, int]] = {
    "resnet18": ("classification", 64), "resnext50_32x4d": ("classification", 64),
    "wide_resnet50_2": ("classification", 64), "vgg11_bn": ("classification", 64),
    "alexnet": ("classification", 96), "squeezenet1_0": ("classification", 64),
    "densenet121": ("classification", 64), "googlenet": ("classification", 64),
    "inception_v3": ("classification", 96), "mobilenet_v2": ("classification", 64),
    "mobilenet_v3_small": ("classification", 64), "mnasnet0_5": ("classification", 64),
    "shufflenet_v2_x0_5": ("classification", 64), "efficientnet_b0": ("classification", 64),
    "efficientnet_v2_s": ("classification", 64), "regnet_x_400mf": ("classification", 64),
    "regnet_y_400mf": ("classification", 64), "convnext_tiny": ("classification", 64),
    "fcn_resnet50": ("segmentation", 64), "deeplabv3_mobilenet_v3_large": ("segmentation", 64),
    "lraspp_mobilenet_v3_large": ("segmentation", 64),
    "fasterrcnn_mobilenet_v3_large_fpn": ("detection", 128),
    "retinanet_resnet50_fpn": ("detection", 128),
    "ssdlite320_mobilenet_v3_large": ("detection", 128),
    "fcos_resnet50_fpn": ("detection", 128), "keypointrcnn_resnet50_fpn": ("detection", 128),
}  # fmt: skip


@dataclass
class Outcome:
    """What happened to one model."""

    model: str
    family: str
    status: str = "refused"  # exported | pinned (exported, nothing removed) | refused | skipped
    dead: int = 0
    removed: int = 0
    params_before: int = 0
    params_after: int = 0
    max_diff: float | None = None
    caller_unchanged: bool | None = None
    seconds: float = 0.0
    error: str = ""
    kept_reasons: dict[str, int] = field(default_factory=dict)


def build(name: str) -> tuple[nn.Module, Callable[[int], Any], str]:
    """The model, a function ``batch -> example input(s)`` and its family."""
    if name.startswith("tv:"):
        import torchvision

        short = name[3:]
        family, side = TORCHVISION[short]
        if family == "segmentation":
            model = torchvision.models.segmentation.__dict__[short](
                weights=None, weights_backbone=None, num_classes=5, aux_loss=False
            )
        elif family == "detection":
            model = torchvision.models.detection.__dict__[short](
                weights=None, weights_backbone=None, num_classes=3
            )
        else:
            kwargs: dict[str, Any] = {"weights": None, "num_classes": 10}
            if short in ("googlenet", "inception_v3"):
                kwargs.update(aux_logits=False, init_weights=False)
            model = torchvision.models.__dict__[short](**kwargs)
        if family == "detection":
            return model, lambda b: ([torch.rand(3, side, side) for _ in range(b)],), "tv-detection"
        return model, lambda b: (torch.randn(b, 3, side, side),), f"tv-{family}"
    import timm

    side = TIMM[name]
    model = timm.create_model(name, pretrained=False, num_classes=10)
    return model, lambda b: (torch.randn(b, 3, side, side),), "timm"


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if hasattr(value, "__dataclass_fields__"):
        return [t for k in value.__dataclass_fields__ for t in _tensors(getattr(value, k))]
    return []


@torch.no_grad()
def kill(  # noqa: C901 (one pass: hooks find each conv's norm, then kill; zoo models need hooks)
    model: nn.Module, inputs: tuple[Any, ...], fraction: float, seed: int
) -> dict[str, set[int]]:
    """Make ``fraction`` of every conv's output channels dead; returns them per conv.

    Not :func:`lightning_sparsity.pruning.masks.kill_filters`: that finds each layer's norm with a
    ``torch.fx`` trace of the whole model, which many zoo models do not allow; forward hooks
    find it on any model.
    """
    convs = {m: n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
    produced: dict[int, nn.Module] = {}
    norm_of: dict[nn.Module, nn.Module] = {}
    handles = []

    def after_conv(module: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            produced[id(out)] = module

    def before_any(module: nn.Module, args: Any) -> None:
        if module in convs or not args or not isinstance(args[0], Tensor):
            return
        conv = produced.get(id(args[0]))
        w = getattr(module, "weight", None)
        if (
            conv is not None
            and isinstance(w, Tensor)
            and w.dim() == 1
            and w.numel() == conv.out_channels  # type: ignore[attr-defined]
            and conv not in norm_of
        ):
            norm_of[conv] = module

    for m in model.modules():
        if m in convs:
            handles.append(m.register_forward_hook(after_conv))
        elif not list(m.children()):
            handles.append(m.register_forward_pre_hook(before_any))
    model.eval()
    try:
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
    g = torch.Generator().manual_seed(seed)
    dead: dict[str, set[int]] = {}
    for conv in convs:
        c = conv.out_channels  # type: ignore[attr-defined]
        n = int(fraction * c)
        if n == 0 or c < 2:
            continue
        idx = torch.randperm(c, generator=g)[:n]
        conv.weight[idx] = 0  # type: ignore[index]
        if conv.bias is not None:  # type: ignore[union-attr]
            conv.bias[idx] = 0  # type: ignore[index]
        norm = norm_of.get(conv)
        if norm is not None:
            for attr in ("weight", "bias", "running_mean"):
                t = getattr(norm, attr, None)
                if isinstance(t, Tensor) and t.numel() == c:
                    t[idx] = 0
        dead[convs[conv]] = set(idx.tolist())
    return dead


def state(model: nn.Module) -> dict[str, Any]:
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["training"] != b["training"] or a["hooks"] != b["hooks"]:
        return False
    ta, tb = a["tensors"], b["tensors"]
    return ta.keys() == tb.keys() and all(
        torch.equal(ta[k], tb[k]) and ta[k].dtype == tb[k].dtype for k in ta
    )


def run_one(name: str, fraction: float = 0.4, seed: int = 0) -> Outcome:
    from lightning_sparsity import prune_model
    from lightning_sparsity.pruning.export import plan_pruning
    from lightning_sparsity.pruning.report import count_params

    start = time.perf_counter()
    try:
        model, make, family = build(name)
    except Exception as err:  # the zoo itself cannot build it here
        return Outcome(name, "?", status="skipped", error=f"{type(err).__name__}: {err}"[:300])
    out = Outcome(name, family)
    torch.manual_seed(seed)
    inputs = make(2)
    try:
        model.eval()
        killed = kill(model, inputs, fraction, seed)
        out.dead = sum(len(v) for v in killed.values())
        before = state(model)
        plan = plan_pruning(model, inputs)
        pruned = prune_model(model, inputs, allow_unchanged=True)
        out.caller_unchanged = same_state(before, state(model))
        removed = plan.removed_out()
        out.removed = sum(len(killed[n] & set(v)) for n, v in removed.items() if n in killed)
        for channels in plan.kept_dead.values():
            for why in channels.values():
                key = why.split(":")[0][:90]
                out.kept_reasons[key] = out.kept_reasons.get(key, 0) + 1
        out.params_before, out.params_after = count_params(model), count_params(pruned)
        fresh = make(3)
        model.eval()
        pruned.eval()
        with torch.no_grad():
            a, b = _tensors(model(*fresh)), _tensors(pruned(*fresh))
        # relative: random-weight networks reach 1e10 (re-parameterised branches add up)
        out.max_diff = max(
            (
                float((x.double() - y.double()).abs().max() / x.double().abs().max().clamp_min(1))
                for x, y in zip(a, b)
                if x.numel() and x.is_floating_point()
            ),
            default=0.0,
        )
        if len(a) != len(b):
            raise RuntimeError(f"{len(a)} output tensors before, {len(b)} after")
        out.status = "exported" if out.removed else "pinned"
    except Exception as err:
        out.status = "refused"
        out.error = f"{type(err).__name__}: {err}"[:400]
        if os.environ.get("ZOO_TRACEBACK"):
            traceback.print_exc()
    out.seconds = time.perf_counter() - start
    return out


def all_names() -> list[str]:
    return list(TIMM) + [f"tv:{n}" for n in TORCHVISION]


def markdown(outcomes: list[Outcome], header: str) -> str:
    lines = [
        header,
        "",
        "| model | family | status | dead channels removed | params | max rel. output diff | "
        "caller unchanged | kept / refused because |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        share = f"{o.removed}/{o.dead} ({o.removed / o.dead:.0%})" if o.dead else "-"
        params = f"{o.params_before:,} -> {o.params_after:,}" if o.params_before else "-"
        diff = f"{o.max_diff:.1e}" if o.max_diff is not None else "-"
        why = o.error or "; ".join(f"{k} (x{v})" for k, v in sorted(o.kept_reasons.items()))
        why = why.replace("|", "/").replace("\n", " ")[:160]
        lines.append(
            f"| {o.model} | {o.family} | {o.status} | {share} | {params} | {diff} | "
            f"{o.caller_unchanged} | {why} |"
        )
    lines.append("")
    fams: dict[str, list[Outcome]] = {}
    for o in outcomes:
        if o.status != "skipped":
            fams.setdefault(o.family, []).append(o)
    lines += ["| family | models | exported | pinned (nothing removed) | refused | dead removed |"]
    lines += ["|---|---|---|---|---|---|"]
    for fam, os_ in fams.items():
        dead = sum(o.dead for o in os_ if o.status != "refused")
        rem = sum(o.removed for o in os_)
        counts = {s: sum(o.status == s for o in os_) for s in ("exported", "pinned", "refused")}
        lines.append(
            f"| {fam} | {len(os_)} | {counts['exported']} | {counts['pinned']} | "
            f"{counts['refused']} | {rem / dead:.0%} |"
            if dead
            else f"| {fam} | {len(os_)} | {counts['exported']} | {counts['pinned']} | "
            f"{counts['refused']} | - |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="model names (tv: prefix for torchvision)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    names = args.only or all_names()
    outcomes = []
    for name in names:
        o = run_one(name)
        outcomes.append(o)
        print(
            f"{o.model:36s} {o.status:9s} removed {o.removed}/{o.dead} diff {o.max_diff} "
            f"unchanged {o.caller_unchanged} {o.seconds:.1f}s {o.error[:150]}",
            flush=True,
        )
    import timm
    import torchvision

    header = (
        f"Measured on {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}), torch "
        f"{torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. 40% of every conv's output "
        "channels dead; `prune_model(model, example)` with nothing else; outputs compared on a "
        "fresh batch of another size."
    )
    if not args.only:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "zoo.json").write_text(
            json.dumps({"header": header, "models": [asdict(o) for o in outcomes]}, indent=1)
        )
        (args.out / "zoo.md").write_text(markdown(outcomes, header))
    print(markdown(outcomes, header))


if __name__ == "__main__":
    main()
