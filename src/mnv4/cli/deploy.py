"""``mnv4 export``, ``mnv4 bench`` and ``mnv4 roofline predict | sweep | calibrate``."""

from __future__ import annotations

import argparse
import sys

from ..errors import MNv4Error
from . import args as A

__all__ = ["register"]


def _progress(args: argparse.Namespace) -> bool | None:
    """Library ``progress``: None shows bars on terminals only; --no-progress turns them off."""
    return False if args.no_progress else None


def _cmd_export(args: argparse.Namespace) -> int:
    from ..deploy.export import export
    from .models import announce_weights, load_model

    if args.fp16 and args.int8:
        raise MNv4Error("choose one of --fp16 and --int8")
    precision = "int8" if args.int8 else "fp16" if args.fp16 else "fp32"
    from .detect_tools import export_detector_cli, is_detector_request

    if is_detector_request(args):
        return export_detector_cli(args, precision, _progress(args))
    model = load_model(args)
    announce_weights(model, "the artefact is only good for latency and parity checks")
    result = export(
        model,
        args.format,
        args.output,
        input_size=args.input_size,
        precision=precision,
        calib_dir=args.calib,
        eval_dir=args.eval,
        samples=args.samples,
        calib_samples=args.calib_samples,
        min_top1=args.min_top1,
        int8_all_layers=args.int8_all_layers,
        threads=args.threads,
        progress=_progress(args),
    )
    print(f"wrote {result.path} and {result.path}.parity.json")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..deploy.bench import available_runtimes, bench, pareto_plot, write_table
    from ..deploy.zoo import default_models

    models = A.resolve_models(args) or default_models()
    runtimes = A.model_list(args.runtimes) if args.runtimes else None
    print(f"runtimes installed: {', '.join(available_runtimes())}", file=sys.stderr)
    out = Path(args.output)
    rows = bench(
        models,
        runtimes,
        precisions=A.model_list(args.precisions),
        input_size=args.input_size,
        threads=args.threads,
        runs=args.runs,
        repeats=args.repeats,
        warmup=args.warmup,
        budget_s=None if args.budget_s == 0 else args.budget_s,
        artefact_dir=out / "artefacts",
        calib_dir=args.calib,
        progress=_progress(args),
    )
    ok = [r for r in rows if not r.error]
    print(write_table(rows, out / "bench.md", out / "bench.csv"))
    if not ok:
        raise MNv4Error("no measurement succeeded (see the errors in the table above)")
    png = pareto_plot(rows, out / "pareto.png")
    print(f"wrote {out / 'bench.md'}, {out / 'bench.csv'} and {png}")
    return 0


def _profiles_for(models: list[str], res: int | None, dtype: str):
    from ..deploy.zoo import build, is_baseline, native_resolution
    from ..perf.counting import profile

    out = []
    for name in models:
        target = build(name, realistic=False)[0] if is_baseline(name) else name  # counting needs no weights
        prof = profile(target, res or native_resolution(name), dtype=dtype)
        prof.model = name
        out.append(prof)
    return out


def _cmd_roofline_predict(args: argparse.Namespace) -> int:
    from ..models.registry import PUBLISHED
    from ..perf.hardware import BUILTIN_PROFILES, get_profile
    from ..perf.roofline import predict_latency

    models = A.resolve_models(args) or list(PUBLISHED)
    hardware = [get_profile(h) for h in (args.hardware or list(BUILTIN_PROFILES))]
    header = ["model", "res", "GMACs"] + [f"{h.name} (RP {h.ridge_point:.1f}) ms" for h in hardware]
    rows = []
    for name in models:
        cells = None
        for h in hardware:
            prof = _profiles_for([name], args.input_size, args.dtype or h.dtype)[0]
            if cells is None:
                cells = [name, str(prof.resolution[0]), f"{prof.macs / 1e9:.3f}"]
            pred = predict_latency(prof, h)
            cells.append(f"{pred.latency_ms:.2f} ({pred.memory_bound_fraction:.0%} mem)")
        rows.append(cells)
    A.print_table(header, rows)
    return 0


def _cmd_roofline_sweep(args: argparse.Namespace) -> int:
    from ..models.registry import PUBLISHED
    from ..perf.roofline import plot_sweep, sweep_points, sweep_table

    models = A.resolve_models(args) or list(PUBLISHED)
    profiles = _profiles_for(models, args.input_size, args.dtype)
    out = args.output or "roofline_sweep.png"
    if not str(out).lower().endswith(".png"):
        raise MNv4Error(f"`output` {out} must be a .png file")
    _, rps, rel = plot_sweep(profiles, out, max_ridge=args.max_ridge, normalize=args.normalize)
    table = sweep_table(rps, rel, sweep_points(args.max_ridge))
    A.print_table(table[0], table[1:])
    print(f"wrote {out}")
    return 0


def _cmd_roofline_calibrate(args: argparse.Namespace) -> int:
    from ..deploy.roofline_fit import calibrate

    result = calibrate(
        A.resolve_models(args) or None,
        runtime=args.runtime,
        threads=args.threads,
        runs=args.runs,
        repeats=args.repeats,
        dtype=args.dtype,
        progress=_progress(args),
    )
    print(result.table())
    print(result.summary())
    if args.output:
        path = result.hardware.save(args.output)
        print(f"saved the fitted profile to {path} (use it with --hardware {path})")
    return 0


def register(sub) -> None:
    # The format table and runtime list are read without torch (mnv4 --help stays fast).
    from ..deploy.bench import all_runtimes
    from ..deploy.formats import FORMATS, PRECISIONS
    from ..deploy.roofline_fit import FIT_RUNTIMES

    def having(what: str) -> str:
        return ", ".join(f.name for f in FORMATS.values() if getattr(f, what))

    p = sub.add_parser(
        "export",
        help="export to onnx/openvino/litert/executorch/coreml/torchscript/pt2 and check parity with eager",
        description="Fuses the model, writes the artefact, runs it in its runtime against eager PyTorch and "
        "saves <artefact>.parity.json; a failed check exits non-zero.",
    )
    A.add_model(p)
    A.add_spec(p)
    A.add_weights(p, checkpoint_help="weights to export (default: random init, announced)")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="artefact format / runtime")
    p.add_argument("--fp16", action="store_true", help=f"half precision ({having('fp16')})")
    p.add_argument("--int8", action="store_true", help=f"post-training INT8 ({having('int8')})")
    p.add_argument("--calib", default=None, help="calibration image folder for --int8 (flat or one folder per class)")
    p.add_argument(
        "--int8-all-layers",
        action="store_true",
        help=f"{having('float_ends')}: quantize the stem conv and head too (default: kept float; others: always int8)",
    )
    p.add_argument("--eval", default=None, help="labelled image folder to compare on and report accuracy delta")
    A.add_input_size(p, help="input resolution (default: the model's)")
    A.add_output(p, help="artefact path (default: <model>_<res>_<precision>.<ext>)")
    p.add_argument("--samples", type=A.positive_int, default=16, help="inputs used for the parity check")
    p.add_argument("--calib-samples", type=A.positive_int, default=128, help="calibration images for --int8")
    p.add_argument("--min-top1", type=float, default=None, help="also require this top-1 agreement (0-1)")
    p.add_argument("--with-nms", action="store_true", help="detectors: decoding + NMS in the graph (onnx, openvino)")
    A.add_threads(p)
    A.add_progress(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "bench",
        help="latency with the paper's protocol across installed runtimes and models; table + Pareto plot",
        description="Warm-up, mean of --runs runs, median of --repeats repeats, fixed threads, batch 1; each "
        "(model, runtime, precision) in its own process. Models without real weights are benchmarked with "
        "BatchNorm statistics re-estimated, so their activations have a realistic scale.",
    )
    A.add_models(p, "models, repeatable or comma-separated (default: MNv4 family + torchvision + timm baselines)")
    p.add_argument("--runtimes", default=None, help=f"comma list of {','.join(all_runtimes())} (default: installed)")
    p.add_argument("--precisions", default="fp32", help=f"comma list of {','.join(PRECISIONS)}")
    A.add_input_size(p, help="resolution for all models (default: each model's)")
    A.add_threads(p, default=2)
    p.add_argument("--runs", type=A.positive_int, default=1000, help="runs per repeat (paper: ~1000)")
    p.add_argument("--repeats", type=A.positive_int, default=5, help="repeats; the median of their means is reported")
    p.add_argument("--warmup", type=A.nonneg_int, default=20, help="untimed runs first")
    p.add_argument(
        "--budget", dest="budget_s", type=float, default=3.0, help="max seconds per repeat (0 = always --runs)"
    )
    p.add_argument("--calib", default=None, help="calibration images for INT8 routes (default: noise)")
    A.add_output(p, help="folder for bench.md, bench.csv, pareto.png and the artefacts", default="bench_out")
    A.add_progress(p)
    p.set_defaults(func=_cmd_bench)

    g = sub.add_group(
        "roofline",
        help="roofline latency model: predict on hardware profiles, sweep ridge points, calibrate this machine",
    )
    p = g.add_parser("predict", help="predicted latency of models on hardware profiles")
    A.add_models(p, "models, repeatable or comma-separated (default: the five MNv4 models)")
    p.add_argument("--hardware", action="append", help="built-in profile or .yaml/.json file (repeatable)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "float16", "bfloat16", "int8"),
        help="element width for bytes moved (default: the hardware profile's)",
    )
    A.add_input_size(p)
    p.set_defaults(func=_cmd_roofline_predict)

    p = g.add_parser("sweep", help="plot relative latency as the ridge point goes 0..max (the paper's analysis)")
    A.add_models(p, "models, repeatable or comma-separated (default: the five MNv4 models)")
    p.add_argument(
        "--dtype",
        default="int8",
        choices=("float32", "float16", "bfloat16", "int8"),
        help="element width for bytes moved",
    )
    A.add_input_size(p)
    p.add_argument("--max-ridge", type=A.positive_float, default=500.0, help="largest ridge point (MACs/byte)")
    p.add_argument("--normalize", default="macs", help="'macs' (own MAC-only latency) or a model name")
    A.add_output(p, help="plot path (.png)", default="roofline_sweep.png")
    p.set_defaults(func=_cmd_roofline_sweep)

    p = g.add_parser("calibrate", help="time models on this machine, fit its roofline, report rank correlation")
    A.add_models(p, "models to time (default: 8 MNv4 + 4 torchvision models)")
    p.add_argument(
        "--runtime", default="auto", choices=FIT_RUNTIMES, help="auto: onnxruntime when installed, else torch-fused"
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16", "bfloat16", "int8"),
        help="element width for bytes moved",
    )
    A.add_threads(p, default=2)
    p.add_argument("--runs", type=A.positive_int, default=100, help="runs per repeat")
    p.add_argument("--repeats", type=A.positive_int, default=3, help="repeats (median of means)")
    A.add_output(p, help="write the fitted profile (.yaml/.json) for --hardware")
    add_hidden = A.add_hidden_alias
    add_hidden(p, "--save", dest="output")
    A.add_progress(p)
    p.set_defaults(func=_cmd_roofline_calibrate)
