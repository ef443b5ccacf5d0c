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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidValue, MNv4Error
from ..files import atomic_write_text
from ..host import cpu_description, int8_support
from ..perf.latency import LatencyProtocol
from ..plotting import pyplot, save_figure
from .formats import FORMATS, PRECISIONS, Format, format_for_runtime
from .requests import ALL_RUNTIMES, TORCH_RUNTIMES, BenchRequest

__all__ = [
    "BenchRequest",
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
    return list(ALL_RUNTIMES)


def runtime_precisions(runtime: str) -> tuple[str, ...]:
    fmt = format_for_runtime(runtime)
    if fmt is not None:
        return fmt.precisions
    return ("fp32", "bf16") if runtime == "torch" else ("fp32",)  # eager torch runs bf16 (oneDNN where the CPU has it)


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
    """One (model, runtime, precision) of a :class:`BenchRequest` to time; what :func:`run_one` takes."""

    model_name: str
    runtime: str
    precision: str
    request: BenchRequest = field(default_factory=BenchRequest)

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "request": self.request.to_dict()})

    @classmethod
    def from_json(cls, text: str) -> Measurement:
        d = json.loads(text)
        return cls(d["model_name"], d["runtime"], d["precision"], BenchRequest.from_dict(d["request"]))


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


def run_one(m: Measurement) -> BenchRow:
    """Measure one (model, runtime, precision) in *this* process (``bench`` runs each in its own)."""
    import numpy as np
    import torch

    from ..models.meta import weights_meta
    from ..perf.counting import profile
    from ..perf.latency import flush_denormals, measure_latency, set_threads
    from .zoo import build

    req = m.request
    check_bench_request(
        dataclasses.replace(req, models=(m.model_name,), runtimes=(m.runtime,), precisions=(m.precision,))
    )
    fmt = _runtime_format(m.runtime)
    if fmt is not None and req.artefact_dir is None:  # the artefact is only a means: removed when timed
        with tempfile.TemporaryDirectory(prefix="mnv4-bench-") as tmp:
            return run_one(dataclasses.replace(m, request=dataclasses.replace(req, artefact_dir=tmp)))
    threads = req.thread_count
    set_threads(threads)
    flush_denormals()
    model, entry = build(m.model_name, req.input_size)
    res = req.input_size or entry.resolution
    prof = profile(model, res)
    x = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(0))
    parity = ""
    if fmt is None:
        if m.precision == "bf16":
            model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
        fn = _torch_fn(model, m.runtime, x)
    else:
        from .export import export
        from .formats import load_runner
        from .inputs import random_inputs

        path = Path(req.artefact_dir) / f"{m.model_name}_{res}_{m.precision}{fmt.suffix}"
        calib = None if req.calib_dir else random_inputs(32, res, seed=1)
        result = export(
            model,
            fmt.name,
            path,
            input_size=res,
            precision=m.precision,
            calib_dir=req.calib_dir,
            calib_data=calib,
            samples=4,
            calib_samples=64,
            verbose=False,
        )
        rep = result.report
        parity = f"diff {rep.max_abs_diff:.1e}, top-1 {rep.top1_agreement:.0%}"
        run = load_runner(path, fmt.name, threads=threads, precision=m.precision)
        xn = np.ascontiguousarray(x.numpy())

        def fn():
            return run(xn)

    p = req.protocol
    lat = measure_latency(fn, runs=p.runs, repeats=p.repeats, warmup=p.warmup, budget_s=p.budget_s, threads=threads)
    return BenchRow(
        m.model_name,
        m.runtime,
        m.precision,
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
        weights=weights_meta(model).describe(),
    )


def measure_in_subprocess(m: Measurement, timeout: float | None = None) -> BenchRow:
    """:func:`run_one` in a fresh ``python -m mnv4.deploy.bench`` process; a crash or a timeout (default:
    the request's) becomes a row with ``error`` set."""
    timeout = m.request.timeout if timeout is None else timeout
    cmd = [sys.executable, "-m", "mnv4.deploy.bench", m.to_json()]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(m.request.thread_count))
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
        m.request.input_size or (entry.resolution if entry else 0),
        math.nan,
        math.nan,
        0,
        0,
        m.request.thread_count,
        0,
        0,
        entry.top1 if entry else math.nan,
        entry.top1_source if entry else "",
        "",
        error,
    )


def check_bench_request(request: BenchRequest) -> list[Measurement]:
    """Validate a benchmark request in one place; returns the measurements it asks for.

    Unknown models, runtimes or precisions and out-of-range numbers are one clear error each; a
    runtime named explicitly must be installed (the defaults skip the ones that are not); a
    request that leaves nothing to measure is an error too.
    """
    from .zoo import zoo_entry

    models, runtimes, precisions = request.models, request.runtimes, request.precisions
    if isinstance(models, str) or not models:
        raise MNv4Error("no models to benchmark; pass at least one model name as `models`")
    for m in models:
        zoo_entry(m)
    if isinstance(precisions, str) or not precisions:
        raise MNv4Error(f"no precisions to benchmark; pass some of {', '.join(PRECISIONS)} as `precisions`")
    for p in precisions:
        if p not in PRECISIONS:
            raise InvalidValue("precisions", p, f"choose from {', '.join(PRECISIONS)}")
    request.checked_numbers()
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
                # a precision the runtime offers but whose package is missing (OpenVINO INT8 needs nncf):
                # named with its extra, as a missing runtime is, rather than left out of the table
                for p in precisions:
                    if p in runtime_precisions(r):
                        fmt.require(p)
    todo = [
        Measurement(m, r, p, request)
        for m in models
        for r in chosen
        for p in precisions
        if p in runtime_precisions(r) and (format_for_runtime(r) is None or format_for_runtime(r).installed(p))  # type: ignore[union-attr]
    ]
    if not todo:
        offers = "; ".join(f"{r}: {', '.join(runtime_precisions(r))}" for r in chosen)
        raise MNv4Error(f"nothing to measure: no runtime offers precision {', '.join(precisions)} ({offers})")
    return todo


def bench(request: BenchRequest | None = None, *, progress: bool | None = None, **fields: Any) -> list[BenchRow]:
    """Every (model, runtime, precision) combination the chosen runtimes support, each in its own process.

    Pass a :class:`BenchRequest`, or its fields as keyword arguments (``models``, ``runtimes``,
    ``precisions``, ``protocol``...; ``runs``, ``repeats``, ``warmup`` and ``budget_s`` are folded into the
    protocol). The request is validated first (:func:`check_bench_request`): a request that names nothing
    to measure is an error. With ``threads`` unset, a busy machine gets a warning
    (:func:`machine_load_warning`). A measurement that fails is a row with ``error`` set, so one broken
    runtime does not cost the others; callers decide what a table without a success means.
    """
    request = _request_of(request, fields)
    todo = check_bench_request(request)
    if request.threads is None and (warning := machine_load_warning(request.thread_count)):
        warnings.warn(warning, stacklevel=2)
    if request.artefact_dir is None:  # the artefacts are only a means here: removed when the table is done
        with tempfile.TemporaryDirectory(prefix="mnv4-bench-") as tmp:
            return _measure_all(todo, tmp, progress)
    return _measure_all(todo, request.artefact_dir, progress)


def _measure_all(todo: list[Measurement], artefact_dir: str, progress: bool | None) -> list[BenchRow]:
    from tqdm import tqdm

    todo = [dataclasses.replace(m, request=dataclasses.replace(m.request, artefact_dir=artefact_dir)) for m in todo]
    rows = []
    bar = tqdm(todo, desc="bench", unit="run", disable=None if progress is None else not progress)
    for m in bar:
        bar.set_postfix_str(f"{m.model_name} {m.runtime} {m.precision}")
        row = measure_in_subprocess(m)
        status = f"{row.median_ms:.2f} ms" if not row.error else f"failed: {row.error}"
        if row.error or not bar.disable:
            tqdm.write(f"  {m.model_name:20s} {m.runtime:14s} {m.precision:5s} {status}", file=sys.stderr)
        rows.append(row)
    return rows


def _request_of(request: BenchRequest | None, fields: dict[str, Any]) -> BenchRequest:
    """A request from keyword arguments, the protocol's own fields folded into ``protocol``."""
    request = request or BenchRequest()
    proto = {k: fields.pop(k) for k in list(fields) if k in LatencyProtocol.__dataclass_fields__}
    for key in ("models", "runtimes", "precisions"):
        if isinstance(fields.get(key), list):
            fields[key] = tuple(fields[key])
    if "artefact_dir" in fields and fields["artefact_dir"] is not None:
        fields["artefact_dir"] = str(fields["artefact_dir"])
    if "calib_dir" in fields and fields["calib_dir"] is not None:
        fields["calib_dir"] = str(fields["calib_dir"])
    protocol = dataclasses.replace(fields.pop("protocol", request.protocol), **proto)
    return dataclasses.replace(request, protocol=protocol, **fields)


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
    # The CPU beside every figure: its name alone ("AMD EPYC" in a VM) covers CPUs years apart, and
    # whether it has VNNI decides what INT8 gains (docs/deploy.md, "INT8 on CPUs without VNNI").
    lines += ["", f"CPU: {cpu_description()}"]
    if any(r.precision == "int8" for r in rows):
        lines.append(int8_support()[1])
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

    row = run_one(Measurement.from_json(argv[0]))
    print(json.dumps(dataclasses.asdict(row)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
