"""Do a detector's anchors fit a dataset's boxes? (docs/detection.md "Anchors that fit the data").

Both heads learn only from anchors matched to a box: SSD matches an anchor whose IoU with a box is at
least 0.5 (plus each box's single best anchor, however poor), RetinaNet at 0.5 (plus the best one under
0.4 when ``allow_low_quality_matches``). A box whose best IoU with every anchor is far below 0.5 is
learnt through one badly fitting anchor at most. SSD's default boxes start at 20% of the image side
(64 px at 320 px), so small objects (platelets, distant fish) are such boxes.

:func:`anchor_coverage` measures, on the training boxes letterboxed as the trainer sees them, the share
of boxes that some anchor overlaps with IoU >= 0.5, in total and per class; :func:`coverage_advice` turns
a low share into the options that would raise it. :func:`fit_anchor_options` resolves the head options
given as ``"auto"`` (SSDLite's ``min_ratio`` and ``levels``, RetinaNet's ``anchor_scale``) from the same
boxes, so the smallest anchor sits at the small end of the data instead of at a COCO-sized default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchvision.ops import box_iou

from ..errors import MNv4Error
from .formats import DetRecord
from .transforms import letterbox_geometry

__all__ = [
    "AUTO",
    "AUTO_OPTIONS",
    "AnchorCoverage",
    "anchor_coverage",
    "coverage_advice",
    "fit_anchor_options",
    "MATCH_IOU",
    "LOW_COVERAGE",
]

MATCH_IOU = 0.5  # the positive-match threshold of both heads (torchvision's SSD and RetinaNet matchers)
LOW_COVERAGE = 0.9  # below this share of matchable boxes, the trainer says which options would help
AUTO = "auto"
# The head options that may be "auto" (resolved from the training boxes by fit_anchor_options).
AUTO_OPTIONS = {"ssdlite": ("min_ratio", "levels", "scales"), "retinanet": ("anchor_scale",)}
# The smallest anchor is fitted to this quantile of the box sides: all but the smallest 5% of boxes are
# at least its size, and on bccd it lands on the platelets (16 px at 320 px), the smallest class.
FIT_QUANTILE = 0.05
# A square box of side s on a map of stride t, its centre up to t/2 off the nearest anchor centre in x and
# y, keeps IoU >= 0.5 with a same-sized anchor only while t <= about s/4 ... s/2; a map of stride t is
# therefore given to boxes from 2t up: smaller smallest boxes get the stride-8 map (levels [2, 3, 4]).
FINE_STRIDE_BELOW = 32.0
FIT_BOXES = 1000  # boxes the SSD scales are fitted on (evenly spaced over the training boxes)


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


def _sides(boxes: torch.Tensor) -> torch.Tensor:
    """sqrt(area) of xyxy boxes."""
    return ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()


def _sample(records: list[DetRecord], max_images: int) -> list[DetRecord]:
    """At most ``max_images`` evenly spaced records: a COCO-sized set is estimated, not swept."""
    if len(records) <= max_images:
        return records
    step = len(records) / max_images
    return [records[int(i * step)] for i in range(max_images)]


def fit_anchor_options(
    head: str,
    options: dict,
    records: list[DetRecord],
    size: int,
    mode: str = "letterbox",
    max_images: int = 2000,
) -> tuple[dict, str]:
    """``options`` with every ``"auto"`` value of ``AUTO_OPTIONS[head]`` resolved from the training boxes,
    and one line for the log saying what was chosen and why ("" when nothing was ``"auto"``).

    SSDLite: ``levels`` = ``[2, 3, 4]`` (adds the stride-8 map) when the ``FIT_QUANTILE`` box side is
    under ``FINE_STRIDE_BELOW`` px, else ``[3, 4]``; ``min_ratio`` = that side / ``size`` (SSD's smallest
    square box there), but no smaller than twice the first map's stride (smaller anchors on that grid
    match nothing at IoU 0.5), at most 0.5 and below ``max_ratio``. RetinaNet: ``anchor_scale`` = that
    side / 8 (the smallest anchor, on the stride-8 map, is ``anchor_scale * 8`` px), between 2 and 8.
    SSDLite ``scales``: each map's scale fitted to the boxes (:func:`_fit_ssd_scales`), from ``min_ratio``.
    """
    wanted = [k for k in AUTO_OPTIONS.get(head, ()) if options.get(k) == AUTO]
    if not wanted:
        return dict(options), ""
    sample = [r for r in _sample(records, max_images) if len(r.boxes)]
    boxes_labels = (
        (
            torch.cat([_letterboxed(r, size, mode) for r in sample]),
            torch.cat([torch.as_tensor(r.labels) for r in sample]),
        )
        if sample
        else (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    )
    sides = _sides(boxes_labels[0])
    if len(sides) == 0:
        raise MNv4Error(
            f"{', '.join(wanted)}: auto fits the anchors to the training boxes, and the training split has none; "
            'give numbers instead (docs/detection.md "Anchors that fit the data")'
        )
    small = torch.quantile(sides, FIT_QUANTILE).item()
    out = dict(options)
    chosen = []
    if head == "ssdlite":
        if "levels" in wanted:
            out["levels"] = [2, 3, 4] if small < FINE_STRIDE_BELOW else [3, 4]
            chosen.append(f"levels {out['levels']}")
        if "min_ratio" in wanted:
            # no smaller than the first map serves (2 x its stride; a backbone level L has stride 2^(L+1))
            floor = 2.0 * 2 ** (int(list(out.get("levels", [3, 4]))[0]) + 1)
            hi = float(out.get("max_ratio", 0.95))
            out["min_ratio"] = round(min(max(small, floor) / size, 0.5, hi - 0.05), 3)
            chosen.append(f"min_ratio {out['min_ratio']:g}")
        if "scales" in wanted:
            out["scales"] = _fit_ssd_scales(out, boxes_labels, size)
            chosen.append(f"scales {out['scales']}")
    else:
        # the smallest anchor, on the stride-8 map, is anchor_scale * 8 px: from 2 (16 px) to 8
        out["anchor_scale"] = round(min(max(small / 8.0, 2.0), 8.0), 2)
        chosen.append(f"anchor_scale {out['anchor_scale']:g}")
    line = (
        f"anchors fitted to {len(sides)} training boxes: {', '.join(chosen)} "
        f"(the smallest {FIT_QUANTILE:.0%} of boxes are under {small:.0f} px at {size} px)"
    )
    return out, line


def _class_mean_iou(boxes: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor) -> float:
    """Mean over classes of the mean best-anchor IoU of their boxes (COCO's AP averages over classes)."""
    best = box_iou(boxes, anchors).amax(dim=1)
    return torch.stack([best[labels == c].mean() for c in labels.unique()]).mean().item()


def _fit_ssd_scales(options: dict, boxes_labels: tuple[torch.Tensor, torch.Tensor], size: int) -> list[float]:
    """SSD scales for ``options``' maps that maximise the class-mean best-anchor IoU of the boxes.

    Starts from the linear spread min_ratio..max_ratio (SSD's) and moves one inner scale at a time to the
    best of 8 values between its neighbours, two sweeps; the first scale (min_ratio, fitted or given)
    and the last stay. Deterministic, on at most ``FIT_BOXES`` boxes.
    """
    from torchvision.models.detection.image_list import ImageList

    from .model import SSDLITE_OPTIONS, feature_sizes, ssd_default_boxes

    boxes, labels = boxes_labels
    if len(boxes) > FIT_BOXES:  # evenly spaced, so the fit is deterministic and takes seconds
        keep = torch.linspace(0, len(boxes) - 1, FIT_BOXES).long()
        boxes, labels = boxes[keep], labels[keep]
    levels = list(options.get("levels", SSDLITE_OPTIONS["levels"]))
    count = len(levels) + len(options.get("extra_widths", SSDLITE_OPTIONS["extra_widths"]))
    grid = feature_sizes(size, 2 ** (levels[0] + 1), count)
    images = ImageList(torch.empty(1, 3, size, size), [(size, size)])
    maps = [torch.empty(1, 1, g, g) for g in grid]

    def score(scales: list[float]) -> float:
        return _class_mean_iou(boxes, labels, ssd_default_boxes({"scales": scales}, count)(images, maps)[0])

    lo, hi = float(options.get("min_ratio", 0.2)), float(options.get("max_ratio", 0.95))
    scales = [lo + (hi - lo) * k / (count - 1) for k in range(count)] + [1.0]
    best = score(scales)
    for _ in range(2):
        for k in range(1, count):
            a, b = scales[k - 1], scales[k + 1]
            for v in (a + (b - a) * j / 9 for j in range(1, 9)):
                trial = [*scales[:k], v, *scales[k + 1 :]]
                value = score(trial)
                if value > best + 1e-6:
                    best, scales = value, trial
    return [round(v, 3) for v in scales]


def anchor_coverage(
    anchors: torch.Tensor,
    records: list[DetRecord],
    classes: list[str],
    size: int,
    mode: str = "letterbox",
    max_images: int = 2000,
) -> AnchorCoverage:
    """How many of ``records``' boxes an anchor (``[A, 4]`` xyxy, e.g. ``Detector.anchors()``) matches
    (on at most ``max_images`` evenly spaced images)."""
    anchors = anchors.float()
    records = [r for r in _sample(records, max_images) if len(r.boxes)]
    a_side = ((anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])).sqrt().min().item()
    if not records:
        return AnchorCoverage(0, 1.0, smallest_anchor=a_side, size=size)
    boxes = [_letterboxed(r, size, mode) for r in records]
    ok = torch.cat([box_iou(b, anchors).amax(dim=1) for b in boxes]) >= MATCH_IOU
    lab = torch.cat([torch.as_tensor(r.labels, dtype=torch.int64) for r in records])
    side = _sides(torch.cat(boxes))
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
        fix += ", or fit both to the data: `{min_ratio: auto, levels: auto}`"
    else:
        fix = f"lower `anchor_scale` (now {options.get('anchor_scale', 4.0):g}), or `{{anchor_scale: auto}}`"
    return f"{line}; small boxes learn poorly: {fix} (--set head_options=...; docs/detection.md)"
