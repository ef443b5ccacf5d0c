"""``mnv4 quantize analyze``: the per-layer INT8 sensitivity report (mnv4.deploy.sensitivity)."""

from __future__ import annotations

import argparse

from . import args as A

__all__ = ["register"]


def _cmd_analyze(args: argparse.Namespace) -> int:
    from ..deploy.sensitivity import analyze_folders
    from .models import announce_weights, load_model

    model = load_model(args)
    announce_weights(model, "the ranking is of a random network, not of trained weights")
    progress = False if args.no_progress else None
    report, js, png = analyze_folders(
        model, args.calib, args.output, args.eval, args.calib_samples, args.input_size, progress
    )
    print(report.table(args.top))
    if report.accuracy_fp32 is not None:
        print(f"fp32 accuracy {report.accuracy_fp32:.2%}; per layer in {js}")
    print(f"wrote {js} and {png}")
    return 0


def register(sub) -> None:
    g = sub.add_group("quantize", help="INT8 tools: the per-layer sensitivity report")
    p = g.add_parser(
        "analyze",
        help="quantize each conv/linear layer alone (fake-quant, the INT8 routes' scheme); rank by output SNR",
        description="Quantizes each conv/linear layer of the fused model alone (weights per-channel int8, input "
        "per-tensor uint8, min-max) and reports the output SNR and top-1 agreement it costs (accuracy with "
        "labelled --eval), worst first; writes sensitivity.json and sensitivity.png. The worst layers are the "
        "ones to keep float: `mnv4 export --int8 --keep-float N`.",
    )
    A.add_model(p)
    A.add_spec(p)
    A.add_weights(p)
    p.add_argument("--calib", required=True, metavar="DIR", help="calibration image folder (flat or per class)")
    p.add_argument("--eval", default=None, metavar="DIR", help="labelled image folder to measure accuracy on")
    A.add_hidden_alias(p, "--eval-data", dest="eval")
    p.add_argument("--calib-samples", type=A.positive_int, default=64, metavar="N", help="images used (each set)")
    A.add_input_size(p, help="input resolution (default: the model's)")
    p.add_argument("--top", type=A.positive_int, default=15, metavar="N", help="layers printed")
    A.add_output(p, help="folder for sensitivity.json and sensitivity.png", default="sensitivity", kind="folder")
    A.add_threads(p)
    A.add_progress(p)
    p.set_defaults(func=_cmd_analyze)
