"""Counting a detector's params and MACs with mnv4.perf, and the paper's Tab. 7 check.

``python -m mnv4.detect.profile`` prints the Tab. 7 residual table of docs/detection.md.

How the paper counts (docs/detection.md "The paper's detector"): its detectors are TF Model Garden
graphs whose MobileNetV4 backbone keeps the classification tail (1x1 conv to 960, pooling, 1x1 conv to
1280) even though RetinaNet reads only the stride-8/16/32 endpoints. mnv4's detector does not build
that dead tail; ``paper_counts`` adds its params and MACs back so the totals compare like for like.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

from ..models.mobilenetv4 import MobileNetV4
from ..perf.counting import Profile
from ..perf.counting import profile as _count
from .model import Detector

__all__ = [
    "DetectorCounts",
    "profile",
    "paper_counts",
    "paper_table",
    "pixel6_latency_ms",
    "PAPER_TAB7",
    "COCO_CLASSES",
]

# Tab. 7 of the paper: whole detector at 384 px, (params in M, MACs in G).
PAPER_TAB7 = {"mnv4_conv_medium": (9.79, 5.06), "mnv4_hybrid_medium": (11.15, 5.62)}
PAPER_TAB7_PIXEL6_MS = {"mnv4_conv_medium": 51.3, "mnv4_hybrid_medium": 60.5}  # Pixel 6 CPU latency
# TF Model Garden's COCO RetinaNet configs use 91 classes (index 0 unused); 90 changes the totals by 0.02%.
COCO_CLASSES = 91


class _RawNetwork(nn.Module):
    """``detector.network`` as a module (what the counters and exporters trace)."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.detector.network(x)


def profile(detector: Detector, batch_size: int = 1, dtype: str = "float32") -> Profile:
    """mnv4.perf's per-layer count of the raw network at the detector's ``image_size``."""
    prof = _count(_RawNetwork(detector), detector.image_size, batch_size=batch_size, dtype=dtype)
    prof.model = f"{detector.head_kind}_{detector.config['backbone']}"
    return prof


@dataclass
class DetectorCounts:
    name: str
    params: int  # the detector as built (BN affine parameters included, running statistics not)
    macs: int
    tail_params: int  # the backbone's classification tail TF keeps in the graph (960 and 1280 convs)
    tail_macs: int

    @property
    def paper_params(self) -> int:
        return self.params + self.tail_params

    @property
    def paper_macs(self) -> int:
        return self.macs + self.tail_macs


def paper_counts(detector: Detector) -> DetectorCounts:
    """The detector's counts, and the same plus the classification tail as the paper's TF graph has it."""
    prof = profile(detector)
    with torch.device("meta"):
        full = MobileNetV4(detector.backbone.spec, num_classes=0)
    tail = (full.final_conv, full.head_conv)
    tail_params = sum(p.numel() for m in tail for p in m.parameters())
    full_prof = _count(full, detector.image_size)
    tail_macs = sum(layer.macs for layer in full_prof.layers if layer.name.startswith(("final_conv", "head_conv")))
    return DetectorCounts(prof.model, prof.params, prof.macs, tail_params, tail_macs)


def pixel6_latency_ms(detector: Detector) -> float:
    """Roofline-predicted latency on the built-in Pixel 6 CPU profile (int8 bytes; mnv4.perf.roofline)."""
    from ..perf.roofline import predict_latency

    return predict_latency(profile(detector, dtype="int8"), "pixel6_cpu").latency_ms


def paper_table(num_classes: int = COCO_CLASSES, image_size: int = 384) -> list[dict]:
    """One row per Tab. 7 MNv4 detector: mnv4's counts, the paper's, and the residuals."""
    from .factory import create_detector

    rows = []
    for backbone, (p_params, p_macs) in PAPER_TAB7.items():
        det = create_detector(backbone, num_classes=num_classes, image_size=image_size)
        c = paper_counts(det)
        pixel6 = pixel6_latency_ms(det)
        rows.append(
            dict(
                detector=c.name,
                params_m=c.params / 1e6,
                macs_g=c.macs / 1e9,
                counted_params_m=c.paper_params / 1e6,
                counted_macs_g=c.paper_macs / 1e9,
                paper_params_m=p_params,
                paper_macs_g=p_macs,
                params_residual_pct=100 * (c.paper_params / 1e6 / p_params - 1),
                macs_residual_pct=100 * (c.paper_macs / 1e9 / p_macs - 1),
                pixel6_roofline_ms=pixel6,
                paper_pixel6_ms=PAPER_TAB7_PIXEL6_MS[backbone],
            )
        )
    return rows


def _markdown(rows: list[dict]) -> str:
    head = (
        "| detector | params (M) | MACs (G) | + TF tail: params | + TF tail: MACs | paper params | paper MACs "
        "| params residual | MACs residual | Pixel 6 CPU roofline ms | paper ms |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['detector']} | {r['params_m']:.2f} | {r['macs_g']:.2f} | {r['counted_params_m']:.2f} "
        f"| {r['counted_macs_g']:.2f} | {r['paper_params_m']:.2f} | {r['paper_macs_g']:.2f} "
        f"| {r['params_residual_pct']:+.1f}% | {r['macs_residual_pct']:+.1f}% "
        f"| {r['pixel6_roofline_ms']:.1f} | {r['paper_pixel6_ms']:.1f} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mnv4.detect.profile", description="the paper's Tab. 7 params/MACs check (docs/detection.md)"
    )
    parser.add_argument("--num-classes", type=int, default=COCO_CLASSES, help="COCO class count (TF: 91)")
    parser.add_argument("--input-size", type=int, default=384, help="square input side (the paper: 384)")
    args = parser.parse_args(argv)
    print(_markdown(paper_table(args.num_classes, args.input_size)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
