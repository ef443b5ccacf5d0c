"""``mnv4 export``, ``mnv4 bench`` and ``mnv4 roofline predict | sweep | calibrate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import MNv4Error
from . import args as A

__all__ = ["register"]


def _progress(args: argparse.Namespace) -> bool | None:
    """Library ``progress``: None shows bars on terminals only; --no-progress turns them off."""
    return False if args.no_progress else None


def _cmd_export(args: argparse.Namespace) -> int:
    from ..deploy.export import export
    from ..deploy.requests import ExportRequest
    from .models import announce_weights, load_model

    request = A.request_from_args(ExportRequest, args)
    from .detect_tools import check_classifier_eval, export_detector_cli, is_detector_request

    if is_detector_request(args):
        return export_detector_cli(args, request, _progress(args))
    check_classifier_eval(request.eval_dir)
    request.validated()  # every option's error before the model loads and its weights are announced
    model = load_model(args)
    announce_weights(model, "the artefact is only good for latency and parity checks")
    result = export(model, request, progress=_progress(args))
    print(f"wrote {result.path} and {result.path}.parity.json")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:

    from ..deploy.bench import available_runtimes, bench, pareto_plot, write_table
    from ..deploy.requests import BenchRequest
    from ..deploy.zoo import default_models
    from ..perf.latency import LatencyProtocol

    out = Path(args.output)  # checked before the command ran (kind="folder")
    protocol = A.request_from_args(LatencyProtocol, args, budget_s=args.budget_s or None)  # --budget 0: none
    models = tuple(A.resolve_models(args) or default_models())
    request = A.request_from_args(
        BenchRequest, args, models=models, protocol=protocol, artefact_dir=str(out / "artefacts")
    )
    print(f"runtimes installed: {', '.join(available_runtimes())}", file=sys.stderr)
    rows = bench(request, progress=_progress(args))
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

    out = []  # res: --input-size, already in range (mnv4.cli.args.input_size_int)
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
    from ..perf.hardware import BUILTIN_PROFILES
    from ..perf.roofline import plot_sweep, sweep_points, sweep_table

    models = A.resolve_models(args) or list(PUBLISHED)
    out = args.output or "roofline_sweep.png"
    if not str(out).lower().endswith(".png"):  # checked before counting every model
        raise MNv4Error(f"`output` {out} must be a .png file")
    if args.normalize != "macs" and args.normalize not in models:
        raise MNv4Error(
            f"`normalize` {args.normalize!r} is invalid: give 'macs' or one of the models ({', '.join(models)})"
        )
    profiles = _profiles_for(models, args.input_size, args.dtype)
    _, rps, rel = plot_sweep(profiles, out, max_ridge=args.max_ridge, normalize=args.normalize)
    table = sweep_table(rps, rel, sweep_points(args.max_ridge))
    A.print_table(table[0], table[1:])
    beyond = [h for h in BUILTIN_PROFILES.values() if h.ridge_point > args.max_ridge]
    if beyond:
        names = ", ".join(f"{h.name} (RP {h.ridge_point:g})" for h in beyond)
        print(f"beyond --max-ridge {args.max_ridge:g}, not in the table: {names}; raise --max-ridge to include them")
    print(f"wrote {out}")
    return 0


def _cmd_roofline_calibrate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..deploy.roofline_fit import CALIBRATION_PROTOCOL, calibrate

    # checked before minutes of measuring: --hardware reads .yaml / .yml / .json only (the path itself was
    # checked before the command ran, kind="file")
    if args.output and Path(args.output).suffix.lower() not in (".yaml", ".yml", ".json"):
        raise MNv4Error(f"`output` {args.output} must end in .yaml, .yml or .json (what --hardware reads)")
    result = calibrate(
        A.resolve_models(args) or None,
        runtime=args.runtime,
        threads=args.threads,
        protocol=replace(CALIBRATION_PROTOCOL, runs=args.runs, repeats=args.repeats),
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
    # The format table, runtime list and requests are read without torch (mnv4 --help stays fast).
    _add_export(sub)
    _add_bench(sub)
    _add_roofline(sub)


def _add_export(sub) -> None:
    from ..deploy.formats import FORMATS
    from ..deploy.requests import ExportRequest

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
    A.add_weights(p, checkpoint_help="weights to export, as given (default: random init, announced)")
    A.add_request_flags(p, ExportRequest)
    A.add_hidden_alias(p, "--eval-data", dest="eval_dir")
    short = p.add_mutually_exclusive_group()
    short.add_argument(
        "--fp16", dest="precision", action="store_const", const="fp16", help=f"--precision fp16 ({having('fp16')})"
    )
    short.add_argument(
        "--int8", dest="precision", action="store_const", const="int8", help=f"--precision int8 ({having('int8')})"
    )
    A.add_input_size(p, help="input resolution (default: the model's)")
    A.add_output(p, help="artefact path, or a folder for the default name <model>_<res>_<precision>.<ext>")
    A.add_threads(p, help="CPU threads of the runtime running the parity check", process=False)
    p.add_argument("--with-nms", action="store_true", help="detectors: decoding + NMS in the graph (onnx, openvino)")
    p.add_argument(
        "--split", default="val", choices=("train", "val", "test"),
        help="detectors: the split of --eval DATASET (COCO/VOC/YOLO folder or digits) scored for AP before -> after",
    )  # fmt: skip
    A.add_progress(p)
    p.set_defaults(func=_cmd_export)


def _add_bench(sub) -> None:
    from ..deploy.requests import DEFAULT_BENCH_THREADS, BenchRequest
    from ..perf.latency import LatencyProtocol

    p = sub.add_parser(
        "bench",
        help="latency with the paper's protocol across installed runtimes and models; table + Pareto plot",
        description="Warm-up, mean of --runs runs, median of --repeats repeats, fixed threads, batch 1; each "
        "(model, runtime, precision) in its own process. Models without real weights are benchmarked with "
        "BatchNorm statistics re-estimated, so their activations have a realistic scale.",
    )
    A.add_models(p, "models, repeatable or comma-separated (default: MNv4 family + torchvision + timm baselines)")
    A.add_request_flags(p, BenchRequest)
    A.add_input_size(p, help="resolution for all models (default: each model's)")
    p.add_argument(
        "--threads",
        type=A.threads_int,
        default=None,
        metavar="N",
        help=f"CPU threads (default: {DEFAULT_BENCH_THREADS}, with a warning when the machine is busy)",
    )
    A.add_request_flags(p, LatencyProtocol)
    A.add_output(
        p, help="folder for bench.md, bench.csv, pareto.png and the artefacts", default="bench_out", kind="folder"
    )
    A.add_progress(p)
    p.set_defaults(func=_cmd_bench)


def _add_roofline(sub) -> None:
    from ..deploy.requests import DEFAULT_BENCH_THREADS
    from ..deploy.roofline_fit import CALIBRATION_PROTOCOL, FIT_RUNTIMES
    from ..perf.dtypes import DTYPE_BYTES
    from ..perf.latency import LatencyProtocol

    dtypes = tuple(DTYPE_BYTES)
    g = sub.add_group(
        "roofline",
        help="roofline latency model: predict on hardware profiles, sweep ridge points, calibrate this machine",
    )
    p = g.add_parser("predict", help="predicted latency of models on hardware profiles")
    A.add_models(p, "models, repeatable or comma-separated (default: the five MNv4 models)")
    p.add_argument("--hardware", action="append", help="built-in profile or .yaml/.json file (repeatable)")
    p.add_argument(
        "--dtype", default=None, choices=dtypes, help="element width for bytes moved (default: the hardware profile's)"
    )
    A.add_input_size(p)
    p.set_defaults(func=_cmd_roofline_predict)

    p = g.add_parser("sweep", help="plot relative latency as the ridge point goes 0..max (the paper's analysis)")
    A.add_models(p, "models, repeatable or comma-separated (default: the five MNv4 models)")
    p.add_argument("--dtype", default="int8", choices=dtypes, help="element width for bytes moved")
    A.add_input_size(p)
    p.add_argument("--max-ridge", type=A.positive_float, default=500.0, help="largest ridge point (MACs/byte)")
    p.add_argument("--normalize", default="macs", help="'macs' (own MAC-only latency) or a model name")
    A.add_output(p, help="plot path (.png)", default="roofline_sweep.png", kind="file")
    p.set_defaults(func=_cmd_roofline_sweep)

    p = g.add_parser("calibrate", help="time models on this machine, fit its roofline, report rank correlation")
    A.add_models(p, "models to time (default: 8 MNv4 + 4 torchvision models)")
    p.add_argument(
        "--runtime", default="auto", choices=FIT_RUNTIMES, help="auto: onnxruntime when installed, else torch-fused"
    )
    p.add_argument("--dtype", default="float32", choices=dtypes, help="element width for bytes moved")
    A.add_threads(p, default=DEFAULT_BENCH_THREADS, help="CPU threads of each measurement", process=False)
    A.add_request_flags(p, LatencyProtocol, only=("runs", "repeats"), defaults=CALIBRATION_PROTOCOL)
    A.add_output(p, help="write the fitted profile (.yaml/.json) for --hardware", kind="file")
    A.add_hidden_alias(p, "--save", dest="output")
    A.add_progress(p)
    p.set_defaults(func=_cmd_roofline_calibrate)
