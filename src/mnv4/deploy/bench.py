"""``mnv4 bench``: the paper's latency protocol across runtimes and models, one process per measurement.

Each (model, runtime, precision) runs in a fresh subprocess (``python -m mnv4.deploy.bench``):
several runtimes in one process inflate every figure because idle thread pools spin on the few
cores. Exported runtimes benchmark the very artefact that passed its parity check.

Runtimes: the in-process torch ones of :data:`TORCH_RUNTIMES` (``torch``, ``torch-fused``,
``torch-compile``) and the runtime of every export format (``Format.runtime`` in
:data:`mnv4.deploy.formats.FORMATS`: ``onnxruntime``, ``openvino``, ``litert``, ``executorch``, ...),
at the precisions each format offers. Models have random weights with BatchNorm statistics
estimated (:func:`mnv4.deploy.zoo.build`), and every runtime flushes denormals.
"""

from __future__ import annotations

import csv
import dataclasses
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

from ..errors import InvalidValue, MNv4Error, check_float, check_int
from ..files import atomic_write_text
from ..plotting import pyplot, save_figure
from .formats import FORMATS, PRECISIONS, Format, format_for_runtime

__all__ = [
    "TORCH_RUNTIMES",
    "DEFAULT_RUNTIMES",
    "BenchRow",
    "Measurement",
    "all_runtimes",
    "denormal_table",
    "runtime_precisions",
    "available_runtimes",
    "check_bench_request",
    "bench",
    "run_one",
    "measure_in_subprocess",
    "error_row",
    "write_table",
    "pareto_plot",
    "NOISY_SPREAD",
    "is_noisy",
    "machine_load_warning",
]

# In-process torch runtimes (no artefact): name -> what runs. Exported runtimes come from FORMATS.
TORCH_RUNTIMES: dict[str, str] = {
    "torch": "eager PyTorch, the model as built",
    "torch-fused": "mnv4.deploy.cpu.optimize_for_cpu for MNv4 (fuse + pre-packed oneDNN convs), BN folding for others",
    "torch-compile": "torch.compile (inductor, freezing) of the fused model",
}
TORCH_DENORMALS = "`torch.set_flush_denormal(True)` in the measuring process (mnv4.perf.latency.flush_denormals)"
DEFAULT_RUNTIMES = ("torch", "torch-fused", *(f.runtime for f in FORMATS.values() if f.bench_default))


def denormal_table() -> str:
    """How every runtime ``bench`` drives is made to flush denormals (Markdown, for docs/deploy.md)."""
    lines = ["| bench runtime | denormals flushed by |", "|---|---|"]
    lines.append(f"| {', '.join(f'`{r}`' for r in TORCH_RUNTIMES)} | {TORCH_DENORMALS} |")
    lines += [f"| `{f.runtime}` | {f.denormals} |" for f in FORMATS.values()]
    return "\n".join(lines) + "\n"


def all_runtimes() -> list[str]:
    """Every runtime name ``bench`` knows, installed or not."""
    return [*TORCH_RUNTIMES, *(f.runtime for f in FORMATS.values())]


def runtime_precisions(runtime: str) -> tuple[str, ...]:
    fmt = format_for_runtime(runtime)
    return fmt.precisions if fmt is not None else ("fp32",)


def _runtime_format(runtime: str) -> Format | None:
    if runtime not in all_runtimes():
        raise InvalidValue("runtimes", runtime, f"choose from {', '.join(all_runtimes())}")
    return format_for_runtime(runtime)


def available_runtimes() -> list[str]:
    """The runtimes that are installed and can run on this platform."""
    return [*TORCH_RUNTIMES, *(f.runtime for f in FORMATS.values() if f.installed() and f.can_run())]


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
    weights: str = ""


@dataclass
class Measurement:
    """One (model, runtime, precision) to time; the arguments of :func:`run_one`."""

    model_name: str
    runtime: str
    precision: str = "fp32"
    input_size: int | None = None
    threads: int = 2
    runs: int = 1000
    repeats: int = 5
    warmup: int = 20
    budget_s: float | None = 3.0
    artefact_dir: str | None = None
    calib_dir: str | None = None


def _torch_fn(model, runtime: str, x):
    import torch

    from .cpu import optimize_for_cpu
    from .fusion import fuse

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
    input_size: int | None = None,
    threads: int = 2,
    runs: int = 1000,
    repeats: int = 5,
    warmup: int = 20,
    budget_s: float | None = 3.0,
    artefact_dir: str | os.PathLike | None = None,
    calib_dir: str | os.PathLike | None = None,
) -> BenchRow:
    """Measure one (model, runtime, precision) in *this* process (``bench`` runs each in its own)."""
    import numpy as np
    import torch

    from ..perf.counting import profile
    from ..perf.latency import flush_denormals, measure_latency, set_threads
    from .zoo import build

    check_bench_request([model_name], [runtime], [precision], input_size, threads, runs, repeats, warmup, budget_s)
    fmt = _runtime_format(runtime)
    set_threads(threads)
    flush_denormals()
    model, entry = build(model_name, input_size)
    res = input_size or entry.resolution
    prof = profile(model, res)
    x = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(0))
    parity = ""
    if fmt is None:
        fn = _torch_fn(model, runtime, x)
    else:
        from .export import export
        from .inputs import random_inputs
        from .runners import load_runner

        out_dir = Path(artefact_dir or tempfile.mkdtemp(prefix="mnv4-bench-"))
        path = out_dir / f"{model_name}_{res}_{precision}{fmt.suffix}"
        calib = None if calib_dir else random_inputs(32, res, seed=1)
        result = export(
            model,
            fmt.name,
            path,
            input_size=res,
            precision=precision,
            calib_dir=calib_dir,
            calib_data=calib,
            samples=4,
            calib_samples=64,
            verbose=False,
        )
        rep = result.report
        parity = f"diff {rep.max_abs_diff:.1e}, top-1 {rep.top1_agreement:.0%}"
        run = load_runner(path, fmt.name, threads=threads, precision=precision)
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
        weights=getattr(model, "weights_note", ""),
    )


def measure_in_subprocess(m: Measurement, timeout: float = 900.0) -> BenchRow:
    """:func:`run_one` in a fresh ``python -m mnv4.deploy.bench`` process; a crash or a timeout
    becomes a row with ``error`` set."""
    cmd = [sys.executable, "-m", "mnv4.deploy.bench", json.dumps(dataclasses.asdict(m))]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(m.threads))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return error_row(m, f"timed out after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{") and '"median_ms"' in line:
            return BenchRow(**json.loads(line))
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return error_row(m, err[:200])


def error_row(m: Measurement, error: str) -> BenchRow:
    """The row of a measurement that failed: NaN latency, the error, and what the zoo knows."""
    from .zoo import zoo_entry

    try:
        entry = zoo_entry(m.model_name)
    except MNv4Error:
        entry = None
    return BenchRow(
        m.model_name,
        m.runtime,
        m.precision,
        m.input_size or (entry.resolution if entry else 0),
        math.nan,
        math.nan,
        0,
        0,
        m.threads,
        0,
        0,
        entry.top1 if entry else math.nan,
        entry.top1_source if entry else "",
        "",
        error,
    )


def check_bench_request(
    models: Sequence[str],
    runtimes: Sequence[str] | None = None,
    precisions: Sequence[str] = ("fp32", "int8"),
    input_size: int | None = None,
    threads: int = 2,
    runs: int = 1000,
    repeats: int = 5,
    warmup: int = 20,
    budget_s: float | None = 3.0,
    timeout: float = 900.0,
) -> list[Measurement]:
    """Validate a benchmark request in one place; returns the measurements it asks for.

    Unknown models, runtimes or precisions and out-of-range numbers are one clear error each; a
    runtime named explicitly must be installed (the defaults skip the ones that are not); a
    request that leaves nothing to measure is an error too.
    """
    from .export import MAX_INPUT_SIZE, MIN_INPUT_SIZE
    from .zoo import zoo_entry

    if isinstance(models, str) or not models:
        raise MNv4Error("no models to benchmark; pass at least one model name as `models`")
    for m in models:
        zoo_entry(m)
    if isinstance(precisions, str) or not precisions:
        raise MNv4Error(f"no precisions to benchmark; pass some of {', '.join(PRECISIONS)} as `precisions`")
    for p in precisions:
        if p not in PRECISIONS:
            raise InvalidValue("precisions", p, f"choose from {', '.join(PRECISIONS)}")
    if input_size is not None:
        check_int("input_size", input_size, MIN_INPUT_SIZE, MAX_INPUT_SIZE)
    check_int("threads", threads, 1)
    check_int("runs", runs, 1)
    check_int("repeats", repeats, 1)
    check_int("warmup", warmup, 0)
    if budget_s is not None:
        check_float("budget_s", budget_s, 0.0, lo_open=True)
    check_float("timeout", timeout, 0.0, lo_open=True)
    if runtimes is None:
        have = available_runtimes()
        chosen = [r for r in DEFAULT_RUNTIMES if r in have]
    else:
        if isinstance(runtimes, str) or not runtimes:
            raise MNv4Error(f"no runtimes to benchmark; pass some of {', '.join(all_runtimes())} as `runtimes`")
        chosen = list(runtimes)
        for r in chosen:
            fmt = _runtime_format(r)
            if fmt is not None and not fmt.can_run():
                raise MNv4Error(f"{r} cannot run on this platform (it needs {', '.join(fmt.predicts_on)})")
            if fmt is not None:
                fmt.require("fp32")
    todo = [
        Measurement(m, r, p, input_size, threads, runs, repeats, warmup, budget_s)
        for m in models
        for r in chosen
        for p in precisions
        if p in runtime_precisions(r) and (format_for_runtime(r) is None or format_for_runtime(r).installed(p))  # type: ignore[union-attr]
    ]
    if not todo:
        offers = "; ".join(f"{r}: {', '.join(runtime_precisions(r))}" for r in chosen)
        raise MNv4Error(f"nothing to measure: no runtime offers precision {', '.join(precisions)} ({offers})")
    return todo


def bench(
    models: Sequence[str],
    runtimes: Sequence[str] | None = None,
    precisions: Sequence[str] = ("fp32", "int8"),
    input_size: int | None = None,
    threads: int = 2,
    runs: int = 1000,
    repeats: int = 5,
    warmup: int = 20,
    budget_s: float | None = 3.0,
    artefact_dir: str | os.PathLike | None = None,
    calib_dir: str | os.PathLike | None = None,
    timeout: float = 900.0,
    progress: bool | None = None,
) -> list[BenchRow]:
    """Every (model, runtime, precision) combination the chosen runtimes support, each in its own process.

    The request is validated first (:func:`check_bench_request`): a request that names nothing to
    measure is an error. A measurement that fails is a row with ``error`` set, so one broken
    runtime does not cost the others; callers decide what a table without a success means.
    """
    from tqdm import tqdm

    todo = check_bench_request(
        models, runtimes, precisions, input_size, threads, runs, repeats, warmup, budget_s, timeout
    )
    if calib_dir is not None and not Path(calib_dir).is_dir():
        raise MNv4Error(f"calibration folder not found: {calib_dir} (`calib`)")
    artefact_dir = str(artefact_dir or tempfile.mkdtemp(prefix="mnv4-bench-"))
    rows = []
    bar = tqdm(todo, desc="bench", unit="run", disable=None if progress is None else not progress)
    for m in bar:
        m.artefact_dir, m.calib_dir = artefact_dir, str(calib_dir) if calib_dir else None
        bar.set_postfix_str(f"{m.model_name} {m.runtime} {m.precision}")
        row = measure_in_subprocess(m, timeout)
        status = f"{row.median_ms:.2f} ms" if not row.error else f"failed: {row.error}"
        if row.error or not bar.disable:
            tqdm.write(f"  {m.model_name:20s} {m.runtime:14s} {m.precision:5s} {status}", file=sys.stderr)
        rows.append(row)
    return rows


# (max - min) / median of the repeats' means above which a row is flagged: on an idle machine
# repeats agree within a few percent; a busy one swings them by 2-5x.
NOISY_SPREAD = 0.25
_NOISY_NOTE = (
    f"noisy: the repeats' means differ by more than {NOISY_SPREAD:.0%} of their median, so the machine was "
    "busy while they ran; rerun on an idle machine with --threads set"
)


def is_noisy(row: BenchRow) -> bool:
    """Did this row's repeats disagree (spread above :data:`NOISY_SPREAD`)?"""
    return not row.error and row.spread > NOISY_SPREAD


def machine_load_warning(threads: int) -> str | None:
    """A warning when other work already occupies the cores ``threads`` timing threads need (the
    1-minute load average exceeds the idle cores), since timings then swing with that load."""
    if not hasattr(os, "getloadavg"):
        return None
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load <= max(cpus - threads, 0.5):
        return None
    return (
        f"the machine is busy (load average {load:.1f} on {cpus} CPUs) and --threads is unset (using {threads}); "
        "timings will swing with the load: pass --threads and rerun when the machine is idle"
    )


def write_table(rows: Sequence[BenchRow], md_path: str | os.PathLike | None, csv_path: str | os.PathLike | None) -> str:
    """Markdown table (returned, and written when a path is given) plus a CSV with every field.

    ``spread`` is (max - min) / median over the repeats; rows above :data:`NOISY_SPREAD` are marked
    ``noisy`` and a note under the table says what that means."""
    header = "| model | runtime | prec | res | GMACs | median ms | spread | runs x reps | top-1 (source) | parity |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for r in rows:
        ms = f"{r.median_ms:.2f}" if not r.error else f"failed: {r.error[:60]}"
        spread = "-" if r.error else f"{r.spread:.0%}" + (" noisy" if is_noisy(r) else "")
        top1 = f"{r.top1:.1f} ({r.top1_source})" if r.top1 == r.top1 else "-"
        lines.append(
            f"| {r.model} | {r.runtime} | {r.precision} | {r.resolution} | {r.macs / 1e9:.3f} | {ms} | "
            f"{spread} | {r.runs}x{r.repeats} | {top1} | {r.parity or '-'} |"
        )
    if any(is_noisy(r) for r in rows):
        lines += ["", _NOISY_NOTE]
    text = "\n".join(lines) + "\n"
    if md_path:
        atomic_write_text(md_path, text)
    if csv_path:
        buf = io.StringIO()
        fields = list(BenchRow.__dataclass_fields__)
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({f: getattr(r, f) for f in fields})
        atomic_write_text(csv_path, buf.getvalue())
    return text


def pareto_plot(rows: Sequence[BenchRow], path: str | os.PathLike, title: str = "") -> Path:
    """Latency on this machine (best fp32 route and best route overall per model) vs published top-1."""
    plt = pyplot()

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
    if ax.get_legend_handles_labels()[0]:  # nothing to plot when no model has a published top-1
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.03, 1, 1))

    return save_figure(fig, path, dpi=130)


def _worker(argv: Sequence[str]) -> int:
    import dataclasses

    args = json.loads(argv[0])
    row = run_one(**args)  # the fields of Measurement
    print(json.dumps(dataclasses.asdict(row)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
