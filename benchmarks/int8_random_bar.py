"""What the INT8 parity check sees on random weights (docs/deploy.md, "Pass thresholds"): per model and
INT8 route, the plain cosine, the centred cosine and the top-1 agreement of a real export, next to an
artefact that ignores its input (every output the mean of the eager outputs), side by side in one run.

    python benchmarks/int8_random_bar.py --calib DATA/cifar10-mini \
        [--models mnv4_conv_small,mnv4_hybrid_medium] [--routes onnx,openvino,litert] [--res 96]

The bars (``mnv4.deploy.export.RANDOM_INT8_MIN_COSINE`` and ``RANDOM_INT8_MIN_CENTRED_COSINE``) must
pass every real row and fail every "ignores input" row. Exports go to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import mnv4  # noqa: E402
from mnv4.deploy.export import RANDOM_INT8_MIN_CENTRED_COSINE, RANDOM_INT8_MIN_COSINE, export  # noqa: E402
from mnv4.deploy.formats import FORMATS  # noqa: E402
from mnv4.deploy.inputs import random_inputs  # noqa: E402
from mnv4.deploy.parity import CRITERIA, ParityReport, compare  # noqa: E402
from mnv4.deploy.zoo import build  # noqa: E402
from mnv4.host import cpu_description  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib", required=True, help="calibration images (a folder, searched per class)")
    ap.add_argument("--models", default="mnv4_conv_small,mnv4_hybrid_medium")
    ap.add_argument("--routes", default="onnx,openvino,litert")
    ap.add_argument("--res", type=int, default=96)
    ap.add_argument("--calib-samples", type=int, default=32)
    args = ap.parse_args()
    from dataclasses import replace

    bar = replace(
        CRITERIA["int8"],
        min_cosine=RANDOM_INT8_MIN_COSINE,
        min_top1=None,
        min_centred_cosine=RANDOM_INT8_MIN_CENTRED_COSINE,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for route in args.routes.split(","):
                if not FORMATS[route].installed("int8"):
                    rows.append((name, route, "not installed", "", "", ""))
                    continue
                model = mnv4.create_model(name, num_classes=10)
                result = export(
                    model,
                    route,
                    f"{tmp}/{name}/",
                    precision="int8",
                    input_size=args.res,
                    calib_dir=args.calib,
                    calib_samples=args.calib_samples,
                    verbose=False,
                )
                r = result.report
                verdict = "PASS" if r.passed else "FAIL"
                rows.append((name, route, "export", f"{r.cosine:.3f}", f"{r.centred_cosine:.3f}", verdict))
            # the same check on an artefact that ignores its input: every row the mean of the eager outputs
            # of the random network with realistic activations (BatchNorm statistics estimated, as export does)
            net, _ = build(name, args.res)
            with torch.no_grad():
                ref = net(random_inputs(16, args.res, seed=7)).numpy()
            const = np.repeat(ref.mean(0, keepdims=True), len(ref), 0)
            c = compare(ref, const, ParityReport("-", "int8", "-", len(ref), [3, args.res, args.res]), bar)
            verdict = "PASS" if c.passed else "FAIL"
            rows.append((name, "-", "ignores input", f"{c.cosine:.3f}", f"{c.centred_cosine:.3f}", verdict))
    print(
        f"CPU: {cpu_description()}; input {args.res} px; bars: cosine {RANDOM_INT8_MIN_COSINE}, "
        f"centred {RANDOM_INT8_MIN_CENTRED_COSINE}"
    )
    print("| model | route | artefact | cosine | centred cosine | verdict |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
