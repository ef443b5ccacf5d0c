"""What a search leaves in its output folder: ``spec.json``, ``report.json`` / ``report.md``,
``curves.png`` (reward, accuracy, cost, controller entropy per step), ``scatter.png`` (accuracy vs
cost of sampled sub-networks) and ``history.jsonl`` (one row per step)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import atomic_write_json, atomic_write_text
from ..models.specs import (
    AttentionSpec,
    ConvBNSpec,
    FusedIBSpec,
    ModelSpec,
    UIBSpec,
    read_spec_file,  # noqa: F401 - re-exported: the reader of a search's spec.json
)
from ..plotting import pyplot, save_figure
from .compact import spec_to_string
from .space import Arch

__all__ = ["SearchResult", "SPEC", "HISTORY", "write_report", "predicted_costs", "block_name", "read_spec_file"]

SPEC = "spec.json"
HISTORY = "history.jsonl"


@dataclass
class SearchResult:
    output: Path
    arch: Arch
    spec: ModelSpec
    cost: float
    target: float
    unit: str
    report: dict[str, Any] = field(default_factory=dict)


def block_name(b: Any) -> str:
    """Human name of a block: the UIB instantiation (docs/architecture.md §2.4) with its kernels."""
    if isinstance(b, UIBSpec):
        s, m = b.start_dw, b.mid_dw
        if s and m:
            kind = f"ExtraDW {s}x{s}+{m}x{m}"
        elif m:
            kind = f"IB {m}x{m}"
        elif s:
            kind = f"ConvNext {s}x{s}"
        else:
            kind = "FFN"
        return f"{kind} e{b.expand:g}" + (" s2" if b.stride == 2 else "")
    if isinstance(b, FusedIBSpec):
        return f"FusedIB {b.kernel}x{b.kernel} e{b.expand:g}" + (" s2" if b.stride == 2 else "")
    if isinstance(b, ConvBNSpec):
        return f"Conv {b.kernel}x{b.kernel}" + (" s2" if b.stride == 2 else "")
    if isinstance(b, AttentionSpec):
        return f"MQA {b.heads}h x {b.key_dim}" + (f" kv/{b.kv_stride}" if b.kv_stride > 1 else "")
    return type(b).__name__


def predicted_costs(spec: ModelSpec, resolution: int, num_classes: int) -> dict[str, float]:
    """MACs, parameters and the roofline latency on every built-in hardware profile."""
    import torch

    from ..models.mobilenetv4 import MobileNetV4
    from ..perf import profile
    from ..perf.hardware import BUILTIN_PROFILES
    from ..perf.roofline import predict_latency

    with torch.device("meta"):
        model = MobileNetV4(spec, num_classes=num_classes)
    prof = profile(model, resolution)
    out = {"macs_M": prof.macs / 1e6, "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    for name, hw in BUILTIN_PROFILES.items():
        # The roofline counts bytes at the device's dtype (int8 for the paper's devices).
        out[f"{name}_ms"] = predict_latency(profile(model, resolution, dtype=hw.dtype), hw).latency_ms
    return out


def _stage_rows(spec: ModelSpec) -> list[dict[str, Any]]:
    rows = []
    for i, stage in enumerate(spec.stages):
        width = next((b.out for b in reversed(stage) if not isinstance(b, AttentionSpec)), None)
        rows.append(
            {
                "stage": i,
                "stride": 2 ** (i + 2),
                "filters": width,
                "blocks": [block_name(b) for b in stage],
            }
        )
    return rows


def _smooth(values: Sequence[float], k: int) -> list[float]:
    out, acc = [], 0.0
    window: list[float] = []
    for v in values:
        window.append(v)
        acc += v
        if len(window) > k:
            acc -= window.pop(0)
        out.append(acc / len(window))
    return out


def plot_curves(history: list[dict[str, Any]], path: Path, target: float, unit: str, stage_starts: list[int]) -> Path:
    plt = pyplot()

    rl = [r for r in history if "reward" in r]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    k = max(1, len(rl) // 50)
    series = [
        ("reward", "reward  Q + beta|T/T0 - 1|", axes[0, 0]),
        ("quality", "held-out batch accuracy Q", axes[0, 1]),
        ("cost", f"cost T ({unit})", axes[1, 0]),
    ]
    stages = sorted({r["stage"] for r in rl}, key=[r["stage"] for r in rl].index)
    for key, title, ax in series:
        for n, stage in enumerate(stages):  # one line per stage: each stage has its own controller
            part = [r for r in rl if r["stage"] == stage]
            xs = [r["step"] for r in part]
            ys = [r[key] for r in part]
            ax.plot(xs, ys, ".", ms=2, alpha=0.3, color="tab:blue")
            ax.plot(xs, _smooth(ys, k), color="tab:blue", lw=1.5, label="moving average" if n == 0 else None)
            if key == "reward":
                ax.plot(
                    xs, [r["baseline"] for r in part], color="tab:orange", lw=1, label="baseline" if n == 0 else None
                )
        if key == "cost":
            ax.axhline(target, color="tab:red", ls="--", lw=1, label=f"target {target:g}")
        ax.legend(loc="best", fontsize=8)
        ax.set_title(title)
    ax = axes[1, 1]
    ax.plot([r["step"] for r in history], [r["entropy"] for r in history], color="tab:green")
    ax.set_title("controller entropy (nats)")
    for ax in axes.flat:
        for s in stage_starts[1:]:
            ax.axvline(s, color="grey", ls=":", lw=1)
        ax.set_xlabel("step")
    fig.tight_layout()

    return save_figure(fig, path, dpi=110)


def plot_scatter(subnets: list[dict[str, Any]], path: Path, target: float, unit: str) -> Path:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = {"uniform": ("tab:grey", "o", "uniform samples"), "policy": ("tab:blue", "o", "controller samples")}
    for kind, (color, marker, label) in styles.items():
        pts = [s for s in subnets if s["kind"] == kind]
        if pts:
            ax.scatter(
                [p["cost"] for p in pts], [p["accuracy"] for p in pts], c=color, marker=marker, label=label, s=20
            )
    found = [s for s in subnets if s["kind"] == "found"]
    if found:
        ax.scatter([found[0]["cost"]], [found[0]["accuracy"]], c="tab:red", marker="*", s=160, label="found")
    ax.axvline(target, color="tab:red", ls="--", lw=1)
    ax.set_xlabel(f"cost ({unit})")
    ax.set_ylabel("super-network held-out accuracy (%)")
    ax.set_title("sampled sub-networks")
    ax.legend()
    fig.tight_layout()

    return save_figure(fig, path, dpi=110)


def write_report(
    search: Any, result: SearchResult, pick: dict[str, Any], subnets: list[dict[str, Any]], wall: float
) -> dict[str, Any]:
    from .cost import measure_model_ms

    out = search.run_dir
    spec = result.spec
    spec_dict = spec.to_dict()
    spec_dict["compact"] = spec_to_string(spec)
    atomic_write_json(out / SPEC, spec_dict)
    atomic_write_text(out / HISTORY, "".join(json.dumps(r) + "\n" for r in search.history))

    res, nc = search.resolution, search.num_classes
    costs = predicted_costs(spec, res, nc)
    measured = measure_model_ms(spec, res, nc, search.scfg.threads)
    report: dict[str, Any] = {
        "spec": str(out / SPEC),
        "compact": spec_dict["compact"],
        "space": search.space.name,
        "cost_model": search.cost_model.describe(),
        "target": result.target,
        "unit": result.unit,
        "cost": result.cost,
        "cost_error": result.cost / result.target - 1,
        "within_tolerance": abs(result.cost / result.target - 1) <= search.scfg.cost_tolerance,
        "pick": pick,
        "stage_results": {k: search.space.to_string(v) for k, v in search.stage_results.items()},
        "stages": _stage_rows(spec),
        "resolution": res,
        "num_classes": nc,
        "predicted": costs,
        "measured_here_ms": measured,
        "measured_threads": search.scfg.threads,
        "subnets": subnets,
        "steps": search.plan.total_steps,
        "wall_seconds": wall,
        "processes": search.info.world_size,
        "config": search.scfg.to_dict(),
    }
    atomic_write_json(out / "report.json", report)
    starts = [s.start for s in search.stages]
    plot_curves(search.history, out / "curves.png", result.target, result.unit, starts)
    if subnets:
        plot_scatter(subnets, out / "scatter.png", result.target, result.unit)
    atomic_write_text(out / "report.md", _markdown(report))
    return report


def _markdown(r: dict[str, Any]) -> str:
    p = r["predicted"]
    lines = [
        f"# Search result: `{r['compact']}`",
        "",
        f"- space `{r['space']}`, {r['steps']} steps, {r['wall_seconds'] / 60:.1f} min on {r['processes']} process(es)",
        f"- cost model {r['cost_model']}: **{r['cost']:.4g} {r['unit']}** for target {r['target']:g} "
        f"({100 * r['cost_error']:+.1f}%, {'within' if r['within_tolerance'] else 'OUTSIDE'} tolerance)",
        f"- controller argmax `{r['pick']['argmax']}` ({r['pick']['argmax_cost']:.4g} {r['unit']})"
        + (" - moved to the most likely sampled architecture within tolerance" if r["pick"]["projected"] else ""),
        "",
        "## Blocks per stage",
        "",
        "| stage | stride | filters | blocks |",
        "|---|---|---|---|",
    ]
    for s in r["stages"]:
        lines.append(f"| {s['stage']} | /{s['stride']} | {s['filters']} | {', '.join(s['blocks'])} |")
    lines += [
        "",
        f"## Cost at {r['resolution']} px ({r['num_classes']} classes)",
        "",
        "| cost | value |",
        "|---|---|",
        f"| MACs | {p['macs_M']:.2f} M |",
        f"| parameters | {p['params_M']:.3f} M |",
    ]
    for k, v in p.items():
        if k.endswith("_ms"):
            lines.append(f"| roofline {k[:-3]} | {v:.4f} ms |")
    clock = "thread CPU time" if r["measured_threads"] == 1 else "wall clock"
    here = f"measured here (eager PyTorch, batch 1, {r['measured_threads']} thread(s), {clock})"
    lines.append(f"| {here} | {r['measured_here_ms']:.3f} ms |")
    lines += ["", "![curves](curves.png)", "", "![scatter](scatter.png)", ""]
    return "\n".join(lines)
