"""``mnv4 bench``: the paper's latency protocol across runtimes and models, one process per measurement.

Each (model, runtime, precision) runs in a fresh subprocess (``python -m mnv4.deploy.bench``):
several runtimes in one process inflate every figure because idle thread pools spin on the few
cores. Exported runtimes benchmark the very artefact that passed its parity check.

Runtimes: ``torch`` (eager, as built), ``torch-fused`` (:func:`mnv4.deploy.fuse` + the oneDNN packed
path for MNv4; BN folding for baselines), ``torch-compile`` (inductor, freezing), ``onnxruntime``,
``openvino``, ``litert``, ``executorch``; precisions fp32 / fp16 / int8 where the route has them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import MNv4Error

__all__ = ["RUNTIMES", "BenchRow", "available_runtimes", "bench", "run_one", "write_table", "pareto_plot"]

# runtime -> (export format or None for in-process torch, precisions, python package it needs)
RUNTIMES: dict[str, tuple[str | None, tuple[str, ...], str | None]] = {
    "torch": (None, ("fp32",), None),
    "torch-fused": (None, ("fp32",), None),
    "torch-compile": (None, ("fp32",), None),
    "onnxruntime": ("onnx", ("fp32", "fp16", "int8"), "onnxruntime"),
    "openvino": ("openvino", ("fp32", "int8"), "openvino"),
    "litert": ("litert", ("fp32", "int8"), "litert_torch"),
    "executorch": ("executorch", ("fp32", "int8"), "executorch"),
}
DEFAULT_RUNTIMES = ("torch", "torch-fused", "onnxruntime", "openvino", "litert", "executorch")


@dataclass
class BenchRow:
    model: str
    runtime: str
    precision: str
    resolution: int
    median_ms: float
    spread: float
    runs: int
    repeats: int
    threads: int
    macs: int
    params: int
    top1: float
    top1_source: str
    parity: str = ""
    error: str = ""


def available_runtimes() -> list[str]:
    import importlib.util

    out = []
    for name, (_, _, package) in RUNTIMES.items():
        if package is None or importlib.util.find_spec(package) is not None:
            out.append(name)
    return out


def _torch_fn(model, runtime: str, x):
    import torch

    from .cpu import optimize_for_cpu
    from .fuse import fuse

    if runtime == "torch-fused":
        model = optimize_for_cpu(model) if hasattr(model, "spec") else fuse(model)
    elif runtime == "torch-compile":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        model = torch.compile(fuse(model))

    def fn():
        with torch.inference_mode():
            return model(x)

    return fn


def run_one(
    model_name: str,
    runtime: str,
    precision: str = "fp32",
    resolution: int | None = None,
    threads: int = 2,
    runs: int = 1000,
    repeats: int = 5,
    warmup: int = 20,
    budget_s: float | None = 3.0,
    artefact_dir: str | os.PathLike | None = None,
    calib_dir: str | os.PathLike | None = None,
) -> BenchRow:
    """Measure one (model, runtime, precision) in *this* process."""
    import numpy as np
    import torch

    from ..perf.counting import profile
    from ..perf.latency import flush_denormals, measure_latency, set_threads
    from .zoo import build

    if runtime not in RUNTIMES:
        raise MNv4Error(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    fmt, precisions, _ = RUNTIMES[runtime]
    if precision not in precisions:
        raise MNv4Error(f"{runtime} has no {precision} route; it offers {', '.join(precisions)}")
    set_threads(threads)
    flush_denormals()
    model, entry = build(model_name)
    res = resolution or entry.resolution
    prof = profile(model, res)
    x = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(0))
    parity = ""
    if fmt is None:
        fn = _torch_fn(model, runtime, x)
    else:
        from .calib import random_inputs
        from .export import FORMATS, export
        from .runners import load_runner

        out_dir = Path(artefact_dir or tempfile.mkdtemp(prefix="mnv4-bench-"))
        path = out_dir / f"{model_name}_{res}_{precision}{FORMATS[fmt].suffix}"
        calib = None if calib_dir else random_inputs(32, res, seed=1)
        result = export(
            model,
            fmt,
            path,
            resolution=res,
            precision=precision,
            calib_dir=calib_dir,
            calib_data=calib,
            samples=4,
            calib_samples=64,
            verbose=False,
        )
        rep = result.report
        parity = f"diff {rep.max_abs_diff:.1e}, top-1 {rep.top1_agreement:.0%}"
        run = load_runner(path, fmt, threads=threads, **({"precision": precision} if fmt == "openvino" else {}))
        xn = np.ascontiguousarray(x.numpy())

        def fn():
            return run(xn)

    lat = measure_latency(fn, runs=runs, repeats=repeats, warmup=warmup, budget_s=budget_s, threads=threads)
    return BenchRow(
        model_name,
        runtime,
        precision,
        res,
        lat.median_ms,
        lat.spread,
        lat.runs,
        lat.repeats,
        threads,
        prof.macs,
        prof.params,
        entry.top1,
        entry.top1_source,
        parity,
    )


def _subprocess_row(args: dict, timeout: float) -> BenchRow:
    cmd = [sys.executable, "-m", "mnv4.deploy.bench", json.dumps(args)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args["threads"]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return _error_row(args, f"timed out after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{") and '"median_ms"' in line:
            return BenchRow(**json.loads(line))
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return _error_row(args, err[:200])


def _error_row(args: dict, error: str) -> BenchRow:
    from .zoo import ZOO

    entry = ZOO.get(args["model_name"])
    return BenchRow(
        args["model_name"],
        args["runtime"],
        args["precision"],
        args.get("resolution") or (entry.resolution if entry else 0),
        math.nan,
        math.nan,
        0,
        0,
        args["threads"],
        0,
        0,
        entry.top1 if entry else math.nan,
        entry.top1_source if entry else "",
        "",
        error,
    )


def bench(
    models: Sequence[str],
    runtimes: Sequence[str] | None = None,
    precisions: Sequence[str] = ("fp32", "int8"),
    resolution: int | None = None,
    threads: int = 2,
    runs: int = 1000,
    repeats: int = 5,
    warmup: int = 20,
    budget_s: float | None = 3.0,
    artefact_dir: str | os.PathLike | None = None,
    calib_dir: str | os.PathLike | None = None,
    timeout: float = 900.0,
    progress: bool = True,
) -> list[BenchRow]:
    """Every (model, runtime, precision) combination the installed runtimes support, each in its own process."""
    have = available_runtimes()
    runtimes = [r for r in (runtimes or DEFAULT_RUNTIMES) if r in have]
    if not runtimes:
        raise MNv4Error("none of the requested runtimes is installed")
    artefact_dir = str(artefact_dir or tempfile.mkdtemp(prefix="mnv4-bench-"))
    rows = []
    for model in models:
        for runtime in runtimes:
            for precision in precisions:
                if precision not in RUNTIMES[runtime][1]:
                    continue
                args = dict(
                    model_name=model,
                    runtime=runtime,
                    precision=precision,
                    resolution=resolution,
                    threads=threads,
                    runs=runs,
                    repeats=repeats,
                    warmup=warmup,
                    budget_s=budget_s,
                    artefact_dir=artefact_dir,
                    calib_dir=str(calib_dir) if calib_dir else None,
                )
                row = _subprocess_row(args, timeout)
                if progress:
                    status = f"{row.median_ms:.2f} ms" if not row.error else f"failed: {row.error}"
                    print(f"  {model:20s} {runtime:14s} {precision:5s} {status}", file=sys.stderr, flush=True)
                rows.append(row)
    return rows


_COLUMNS = ("model", "runtime", "precision", "resolution", "median_ms", "spread", "runs", "repeats", "threads")


def write_table(rows: Sequence[BenchRow], md_path: str | os.PathLike | None, csv_path: str | os.PathLike | None) -> str:
    """Markdown table (returned, and written when a path is given) plus a CSV with every field."""
    from ..weights.io import atomic_write

    header = "| model | runtime | prec | res | GMACs | median ms | spread | runs x reps | top-1 (source) | parity |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for r in rows:
        ms = f"{r.median_ms:.2f}" if not r.error else f"failed: {r.error[:60]}"
        top1 = f"{r.top1:.1f} ({r.top1_source})" if r.top1 == r.top1 else "-"
        lines.append(
            f"| {r.model} | {r.runtime} | {r.precision} | {r.resolution} | {r.macs / 1e9:.3f} | {ms} | "
            f"{r.spread:.2f} | {r.runs}x{r.repeats} | {top1} | {r.parity or '-'} |"
        )
    text = "\n".join(lines) + "\n"
    if md_path:
        atomic_write(md_path, lambda tmp: Path(tmp).write_text(text)).chmod(0o644)
    if csv_path:
        buf = io.StringIO()
        fields = list(BenchRow.__dataclass_fields__)
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({f: getattr(r, f) for f in fields})
        atomic_write(csv_path, lambda tmp: Path(tmp).write_text(buf.getvalue())).chmod(0o644)
    return text


def pareto_plot(rows: Sequence[BenchRow], path: str | os.PathLike, title: str = "") -> Path:
    """Latency on this machine (best fp32 route and best route overall per model) vs published top-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..weights.io import atomic_write

    def best(filter_fn):
        out: dict[str, BenchRow] = {}
        for r in rows:
            if r.error or not filter_fn(r) or r.top1 != r.top1:
                continue
            if r.model not in out or r.median_ms < out[r.model].median_ms:
                out[r.model] = r
        return out

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for label, sel, marker in (
        ("best fp32 runtime", best(lambda r: r.precision == "fp32"), "o"),
        ("best runtime, any precision", best(lambda r: True), "^"),
    ):
        if not sel:
            continue
        pts = sorted(sel.values(), key=lambda r: r.median_ms)
        colors = ["tab:red" if r.model.startswith("mnv4") else "tab:blue" for r in pts]
        ax.scatter([r.median_ms for r in pts], [r.top1 for r in pts], c=colors, marker=marker, label=label)
        front, top = [], -1.0
        for r in pts:  # Pareto front: faster points first, keep those that raise accuracy
            if r.top1 > top:
                front.append(r)
                top = r.top1
        ax.plot([r.median_ms for r in front], [r.top1 for r in front], "--", color="gray", lw=0.8)
        for r in pts:
            ax.annotate(f"{r.model} ({r.runtime} {r.precision})", (r.median_ms, r.top1), fontsize=6, alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("latency on this machine, batch 1 (ms, log scale)")
    ax.set_ylabel("published ImageNet-1k top-1 (%)")
    sources = sorted({r.top1_source for r in rows if r.top1_source})
    ax.set_title(title or "MNv4 vs baselines (red: MNv4)")
    fig.text(0.01, 0.005, "top-1 sources: " + "; ".join(sources), fontsize=6)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.03, 1, 1))

    def save(tmp: str) -> None:
        fig.savefig(tmp, dpi=130, format="png")

    out = atomic_write(path, save)
    out.chmod(0o644)
    plt.close(fig)
    return out


def _worker(argv: Sequence[str]) -> int:
    import dataclasses

    args = json.loads(argv[0])
    row = run_one(**args)
    print(json.dumps(dataclasses.asdict(row)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
