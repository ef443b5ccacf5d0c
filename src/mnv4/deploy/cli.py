"""``mnv4 export``, ``mnv4 bench`` and ``mnv4 roofline`` (``--sweep``, ``calibrate``).

Imported by the main CLI at start-up, so every heavy import lives inside the command functions.
"""

from __future__ import annotations

import argparse
import sys

from ..cli import print_table
from ..errors import MNv4Error

__all__ = ["register"]

_EXPORT_FORMATS = ("onnx", "openvino", "litert", "executorch", "coreml", "torchscript", "pt2")
_MNV4 = ("mnv4_conv_small", "mnv4_conv_medium", "mnv4_hybrid_medium", "mnv4_conv_large", "mnv4_hybrid_large")


def _cmd_export(args: argparse.Namespace) -> None:
    from ..factory import create_model
    from .export import export

    if args.fp16 and args.int8:
        raise MNv4Error("choose one of --fp16 and --int8")
    precision = "int8" if args.int8 else "fp16" if args.fp16 else "fp32"
    model = create_model(args.model, checkpoint=args.checkpoint)
    result = export(
        model,
        args.format,
        args.output,
        resolution=args.res,
        precision=precision,
        calib_dir=args.calib,
        eval_dir=args.eval,
        samples=args.samples,
        calib_samples=args.calib_samples,
        min_top1=args.min_top1,
        int8_all_layers=args.int8_all_layers,
    )
    print(f"wrote {result.path} and {result.path}.parity.json")


def _cmd_bench(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .bench import available_runtimes, bench, pareto_plot, write_table
    from .zoo import DEFAULT_MODELS

    models = args.models or list(DEFAULT_MODELS)
    if "timm" not in sys.modules:
        import importlib.util

        if importlib.util.find_spec("timm") is None:
            from .zoo import ZOO

            models = [m for m in models if ZOO.get(m) is None or ZOO[m].source != "timm"]
    runtimes = args.runtimes.split(",") if args.runtimes else None
    print(f"runtimes installed: {', '.join(available_runtimes())}", file=sys.stderr)
    rows = bench(
        models,
        runtimes,
        precisions=args.precisions.split(","),
        resolution=args.res,
        threads=args.threads,
        runs=args.runs,
        repeats=args.repeats,
        warmup=args.warmup,
        budget_s=args.budget if args.budget > 0 else None,
        artefact_dir=Path(args.output_dir) / "artefacts",
        calib_dir=args.calib,
    )
    out = Path(args.output_dir)
    print(write_table(rows, out / "bench.md", out / "bench.csv"))
    png = pareto_plot(rows, out / "pareto.png")
    print(f"wrote {out / 'bench.md'}, {out / 'bench.csv'} and {png}")


def _cmd_roofline(args: argparse.Namespace) -> None:
    if args.targets and args.targets[0] == "calibrate":
        return _cmd_calibrate(args)
    from ..perf.counting import profile
    from ..perf.hardware import BUILTIN_PROFILES, get_profile
    from ..perf.roofline import predict_latency

    models = args.targets or list(_MNV4)
    hardware = [get_profile(h) for h in (args.hardware or list(BUILTIN_PROFILES))]
    if args.sweep:
        return _sweep(models, args)
    header = ["model", "res", "GMACs"] + [f"{h.name} (RP {h.ridge_point:.1f}) ms" for h in hardware]
    rows = []
    for name in models:
        res = args.res or _native_res(name)
        cells = [name, str(res), ""]
        if _is_zoo_baseline(name):  # torchvision / timm baselines are built, as in --sweep
            from .zoo import build

            target = build(name)[0]
        else:
            target = name
        for h in hardware:
            prof = profile(target, res, dtype=args.dtype or h.dtype)
            cells[2] = f"{prof.macs / 1e9:.3f}"
            pred = predict_latency(prof, h)
            cells.append(f"{pred.latency_ms:.2f} ({pred.memory_bound_fraction:.0%} mem)")
        rows.append(cells)
    print_table(header, rows)


def _native_res(name: str) -> int:
    from ..models.registry import MODELS, get_entry
    from .zoo import ZOO

    if name in ZOO:
        return ZOO[name].resolution
    if name in MODELS or name.replace("mobilenetv4_", "mnv4_") in MODELS:
        return get_entry(name).default_preprocess.input_size
    return 224


def _sweep(models: list[str], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..perf.roofline import ridge_sweep
    from ..weights.io import atomic_write
    from .zoo import build

    profiles = []
    for name in models:
        from ..perf.counting import profile

        target = name if not _is_zoo_baseline(name) else build(name)[0]
        prof = profile(target, args.res or _native_res(name), dtype=args.dtype or "int8")
        prof.model = name
        profiles.append(prof)
    rps, rel = ridge_sweep(profiles, np.linspace(0, args.max_ridge, 251), normalize=args.normalize)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, y in rel.items():
        ax.plot(rps, y, label=name, lw=2 if name.startswith("mnv4") else 1)
    for label, rp in (("Pixel 6 CPU", 31.2), ("S23 CPU", 39.7), ("Pixel 4 DSP", 347.3), ("Pixel 8 EdgeTPU", 433.8)):
        ax.axvline(rp, color="gray", ls=":", lw=0.8)
        ax.text(rp, ax.get_ylim()[1], label, rotation=90, va="top", ha="right", fontsize=7)
    ax.set_xlabel("ridge point (MACs / byte)")
    unit = "own MAC-only latency" if args.normalize == "macs" else args.normalize
    ax.set_ylabel(f"roofline latency relative to {unit}")
    ax.set_title(f"Roofline sweep ({args.dtype or 'int8'} bytes)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = atomic_write(args.output or "roofline_sweep.png", lambda tmp: fig.savefig(tmp, dpi=130, format="png"))
    out.chmod(0o644)
    plt.close(fig)
    picks = [0, 31.2, 39.7, 100, 347.3, 433.8, args.max_ridge]
    rows = []
    for name, y in rel.items():
        rows.append([name] + [f"{np.interp(rp, rps, y):.2f}" for rp in picks])
    print_table(["model"] + [f"RP {rp:g}" for rp in picks], rows)
    print(f"wrote {out}")


def _is_zoo_baseline(name: str) -> bool:
    from .zoo import ZOO

    return name in ZOO and ZOO[name].source != "mnv4"


def _cmd_calibrate(args: argparse.Namespace) -> None:
    from .calibrate import calibrate

    models = args.targets[1:] or None
    result = calibrate(
        models,
        runtime=args.runtime,
        threads=args.threads,
        runs=args.runs,
        repeats=args.repeats,
        dtype=args.dtype or "float32",
        progress=True,
    )
    print(result.table())
    print(result.summary())
    if args.save:
        path = result.hardware.save(args.save)
        print(f"saved the fitted profile to {path} (use it with --hardware {path})")


def register(subparsers) -> None:
    """Add ``export``, ``bench`` and ``roofline`` to the ``mnv4`` command."""
    p = subparsers.add_parser(
        "export",
        help="export to onnx/openvino/litert/executorch/coreml/torchscript/pt2 and check parity with eager",
        description="Fuses the model, writes the artefact, runs it in its runtime against eager PyTorch and "
        "saves <artefact>.parity.json; a failed check exits non-zero.",
    )
    p.add_argument("model", help="model name, e.g. mnv4_conv_small (or omit with --checkpoint naming it)", nargs="?")
    p.add_argument("--checkpoint", default=None, help="weights to export (default: random init)")
    p.add_argument("--format", required=True, choices=_EXPORT_FORMATS)
    p.add_argument("--fp16", action="store_true", help="half precision (onnx, openvino, coreml, torchscript, pt2)")
    p.add_argument("--int8", action="store_true", help="post-training INT8 (onnx, openvino, litert, executorch)")
    p.add_argument("--calib", default=None, help="calibration image folder (flat or one folder per class)")
    p.add_argument(
        "--int8-all-layers",
        action="store_true",
        help="onnx/openvino: quantize the stem conv and head too (default: kept float; litert/executorch: always int8)",
    )
    p.add_argument("--eval", default=None, help="labelled image folder to compare on and report accuracy delta")
    p.add_argument("--res", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--output", default=None, help="artefact path (default: <model>_<res>_<precision>.<ext>)")
    p.add_argument("--samples", type=int, default=16, help="inputs used for the parity check")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration images for --int8")
    p.add_argument("--min-top1", type=float, default=None, help="also require this top-1 agreement (0-1)")
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser(
        "bench",
        help="latency with the paper's protocol across installed runtimes and models; table + Pareto plot",
        description="Warm-up, mean of --runs runs, median of --repeats repeats, fixed threads, batch 1; each "
        "(model, runtime, precision) in its own process.",
    )
    p.add_argument("models", nargs="*", help="models (default: MNv4 family + torchvision + timm baselines)")
    p.add_argument("--runtimes", default=None, help="comma list: torch,torch-fused,torch-compile,onnxruntime,...")
    p.add_argument("--precisions", default="fp32,int8", help="comma list of fp32,fp16,int8")
    p.add_argument("--res", type=int, default=None, help="resolution for all models (default: each model's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=1000, help="runs per repeat (paper: ~1000)")
    p.add_argument("--repeats", type=int, default=5, help="repeats; the median of their means is reported")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--budget", type=float, default=3.0, help="max seconds per repeat (0 = always --runs)")
    p.add_argument("--calib", default=None, help="calibration images for INT8 routes (default: noise)")
    p.add_argument("--output-dir", default="bench_out")
    p.set_defaults(func=_cmd_bench)

    p = subparsers.add_parser(
        "roofline",
        help="roofline latency on hardware profiles; --sweep over ridge points; 'calibrate' fits this machine",
        description="mnv4 roofline [MODELS] [--hardware H]... | mnv4 roofline --sweep [MODELS] | "
        "mnv4 roofline calibrate [MODELS] [--save FILE]",
    )
    p.add_argument("targets", nargs="*", help="models, or 'calibrate' followed by optional models")
    p.add_argument("--hardware", action="append", help="built-in profile or .yaml/.json file (repeatable)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16", "int8"))
    p.add_argument("--res", type=int, default=None)
    p.add_argument("--sweep", action="store_true", help="plot relative latency as the ridge point goes 0..500")
    p.add_argument("--max-ridge", type=float, default=500.0)
    p.add_argument("--normalize", default="macs", help="'macs' (own MAC-only latency) or a model name")
    p.add_argument("--output", default=None, help="sweep plot path (default roofline_sweep.png)")
    p.add_argument("--runtime", default="auto", help="calibrate: onnxruntime, torch-fused or torch (auto)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--save", default=None, help="calibrate: write the fitted profile (.yaml/.json)")
    p.set_defaults(func=_cmd_roofline)
