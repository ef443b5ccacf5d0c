"""Do a detector's anchors fit a dataset's boxes? (docs/detection.md "Anchors that fit the data").

Both heads learn only from anchors matched to a box: SSD matches an anchor whose IoU with a box is at
least 0.5 (plus each box's single best anchor, however poor), RetinaNet at 0.5 (plus the best one under
0.4 when ``allow_low_quality_matches``). A box whose best IoU with every anchor is far below 0.5 is
learnt through one badly fitting anchor at most. SSD's default boxes start at 20% of the image side
(64 px at 320 px), so small objects (platelets, distant fish) are such boxes.

:func:`anchor_coverage` measures, on the training boxes letterboxed as the trainer sees them, the share
of boxes that some anchor overlaps with IoU >= 0.5, in total and per class; :func:`coverage_advice` turns
a low share into the options that would raise it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchvision.ops import box_iou

from .formats import DetRecord
from .transforms import letterbox_geometry

__all__ = ["AnchorCoverage", "anchor_coverage", "coverage_advice", "MATCH_IOU", "LOW_COVERAGE"]

MATCH_IOU = 0.5  # the positive-match threshold of both heads (torchvision's SSD and RetinaNet matchers)
LOW_COVERAGE = 0.9  # below this share of matchable boxes, the trainer says which options would help


@dataclass
class AnchorCoverage:
    """Share of boxes some anchor matches (IoU >= ``MATCH_IOU``); per class by name."""

    boxes: int
    covered: float
    per_class: dict[str, float] = field(default_factory=dict)
    median_side: float = 0.0  # median sqrt(area) of the boxes, in input pixels
    small_side: float = 0.0  # 10th percentile of the same: where the smallest anchor should sit
    smallest_anchor: float = 0.0  # sqrt(area) of the smallest anchor, in input pixels
    size: int = 0  # the input side the boxes were measured at


def _letterboxed(record: DetRecord, size: int, mode: str) -> torch.Tensor:
    """The record's xyxy boxes where the trainer's resize puts them."""
    (sx, sy), px, py, _, _ = letterbox_geometry(record.width, record.height, size, mode)
    b = torch.as_tensor(record.boxes, dtype=torch.float32).reshape(-1, 4)
    return b * torch.tensor([sx, sy, sx, sy]) + torch.tensor([px, py, px, py])


def anchor_coverage(
    anchors: torch.Tensor,
    records: list[DetRecord],
    classes: list[str],
    size: int,
    mode: str = "letterbox",
    max_images: int = 2000,
) -> AnchorCoverage:
    """How many of ``records``' boxes an anchor (``[A, 4]`` xyxy, e.g. ``Detector.anchors()``) matches
    (on at most ``max_images`` evenly spaced images: a COCO-sized set is estimated, not swept)."""
    anchors = anchors.float()
    if len(records) > max_images:
        step = len(records) / max_images
        records = [records[int(i * step)] for i in range(max_images)]
    best, labels, sides = [], [], []
    for r in records:
        if len(r.boxes) == 0:
            continue
        boxes = _letterboxed(r, size, mode)
        best.append(box_iou(boxes, anchors).amax(dim=1))
        labels.append(torch.as_tensor(r.labels, dtype=torch.int64))
        sides.append(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt())
    a_side = ((anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])).sqrt().min().item()
    if not best:
        return AnchorCoverage(0, 1.0, smallest_anchor=a_side, size=size)
    ok = torch.cat(best) >= MATCH_IOU
    lab = torch.cat(labels)
    side = torch.cat(sides)
    per_class = {name: ok[lab == i].float().mean().item() for i, name in enumerate(classes) if (lab == i).any()}
    return AnchorCoverage(
        boxes=len(ok),
        covered=ok.float().mean().item(),
        per_class=per_class,
        median_side=side.median().item(),
        small_side=torch.quantile(side, 0.1).item(),
        smallest_anchor=a_side,
        size=size,
    )


def coverage_advice(cov: AnchorCoverage, head: str, options: dict) -> str:
    """One line for the training log: the coverage, and when low, the options that lower the anchors."""
    worst = sorted(cov.per_class.items(), key=lambda kv: kv[1])[:3]
    per = ", ".join(f"{name} {share:.0%}" for name, share in worst)
    line = (
        f"anchors: {cov.covered:.0%} of {cov.boxes} training boxes have an anchor with IoU >= {MATCH_IOU} "
        f"(lowest: {per}; median box {cov.median_side:.0f} px, smallest anchor {cov.smallest_anchor:.0f} px)"
    )
    if cov.covered >= LOW_COVERAGE or cov.boxes == 0:
        return line
    if head == "ssdlite":
        # SSD's smallest square box has side min_ratio * size: put it at the 10th-percentile box side
        hint = max(0.01, min(0.2, round(cov.small_side / max(cov.size, 1), 2)))
        fix = f"lower `min_ratio` (now {options.get('min_ratio', 0.2):g}; {hint:g} fits the smallest tenth of boxes)"
        if list(options.get("levels", [3, 4]))[0] > 2:
            fix += " and/or add a stride-8 map with `levels: [2, 3, 4]`"
    else:
        fix = f"lower `anchor_scale` (now {options.get('anchor_scale', 4.0):g})"
    return f"{line}; small boxes learn poorly: {fix} (--set head_options=...; docs/detection.md)"
