"""COCO detection metrics with ``faster-coco-eval`` (the ``detect`` extra), and the PR-curve plot.

Ground truth and predictions are compared in the original images' pixels (predictions are mapped back
through :func:`~mnv4.detect.transforms.unletterbox` first), so COCO's small / medium / large areas
(under 32², 32²-96², over 96² pixels) mean what they mean on COCO. ``faster-coco-eval`` implements
pycocotools' algorithm in C++; tests/test_detect_metrics.py checks every number against pycocotools.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import missing_extra
from .formats import DetRecord

__all__ = ["DetectionMetrics", "coco_metrics", "coco_dicts", "plot_pr_curve", "STAT_NAMES"]

# pycocotools' ``stats`` order
STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100", "AR_small")
STAT_NAMES = STAT_NAMES + ("AR_medium", "AR_large")


@dataclass
class DetectionMetrics:
    """COCO box metrics in [0, 1] (-1 where COCO has nothing to measure, e.g. no large objects)."""

    AP: float = 0.0
    AP50: float = 0.0
    AP75: float = 0.0
    AP_small: float = -1.0
    AP_medium: float = -1.0
    AP_large: float = -1.0
    AR1: float = 0.0
    AR10: float = 0.0
    AR100: float = 0.0
    AR_small: float = -1.0
    AR_medium: float = -1.0
    AR_large: float = -1.0
    per_class_AP: dict[str, float | None] = field(default_factory=dict)  # None: no ground truth of that class
    num_images: int = 0
    num_boxes: int = 0
    num_detections: int = 0
    # precision at IoU 0.5 over COCO's 101 recall points, per class ([C, 101], -1 where undefined)
    pr50: np.ndarray | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("pr50")
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


def coco_dicts(
    records: list[DetRecord], predictions: list[dict[str, Any]], classes: list[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(ground-truth dataset dict, detection list) in COCO's JSON form; category id = label + 1.

    ``predictions[i]`` belongs to ``records[i]``: ``boxes`` xyxy in the original image's pixels, ``scores``,
    ``labels``. Image ids are the records' positions (+1), so duplicate ids in the records do not matter.
    """
    images, anns, dets = [], [], []
    for i, (r, p) in enumerate(zip(records, predictions)):
        images.append({"id": i + 1, "width": int(r.width), "height": int(r.height)})
        areas = getattr(r, "areas", None)
        for j, ((x1, y1, x2, y2), label) in enumerate(zip(np.asarray(r.boxes).tolist(), np.asarray(r.labels).tolist())):
            w, h = x2 - x1, y2 - y1
            ann = {"id": len(anns) + 1, "image_id": i + 1, "category_id": int(label) + 1, "bbox": [x1, y1, w, h]}
            anns.append({**ann, "area": float(areas[j]) if areas is not None else w * h, "iscrowd": 0})
        # COCO crowd regions: a detection matched to one is neither a true nor a false positive.
        crowd = zip(np.asarray(r.crowd_boxes).tolist(), np.asarray(r.crowd_labels).tolist())
        for (x1, y1, x2, y2), label in crowd:
            w, h = x2 - x1, y2 - y1
            ann = {"id": len(anns) + 1, "image_id": i + 1, "category_id": int(label) + 1, "bbox": [x1, y1, w, h]}
            anns.append({**ann, "area": w * h, "iscrowd": 1})
        boxes, scores, labels = (_numpy(p[k]) for k in ("boxes", "scores", "labels"))
        for (x1, y1, x2, y2), s, label in zip(boxes.reshape(-1, 4).tolist(), scores.tolist(), labels.tolist()):
            det = {"image_id": i + 1, "category_id": int(label) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1]}
            dets.append({**det, "score": float(s)})
    cats = [{"id": k + 1, "name": name} for k, name in enumerate(classes)]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def coco_metrics(records: list[DetRecord], predictions: list[dict[str, Any]], classes: list[str]) -> DetectionMetrics:
    """COCO box AP/AR of ``predictions`` against ``records`` (see :func:`coco_dicts` for the pairing)."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError:
        raise missing_extra("faster-coco-eval", "detect") from None
    if len(records) != len(predictions):
        raise ValueError(f"{len(records)} images but {len(predictions)} predictions")
    gt_dict, dets = coco_dicts(records, predictions, classes)
    boxes = [a for a in gt_dict["annotations"] if not a["iscrowd"]]
    out = DetectionMetrics(num_images=len(records), num_boxes=len(boxes), num_detections=len(dets))
    present = {a["category_id"] for a in boxes}
    out.per_class_AP = {c: (0.0 if k + 1 in present else None) for k, c in enumerate(classes)}
    if not dets or not boxes:
        return out  # nothing detected (or nothing to find): every AP is 0, as COCO would give
    gt = COCO(gt_dict)
    ev = COCOeval_faster(gt, gt.loadRes(dets), iouType="bbox", print_function=lambda *a, **k: None)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    for name, value in zip(STAT_NAMES, ev.stats):
        setattr(out, name, float(value))
    precision = np.asarray(ev.eval["precision"])  # [T iou, R recall, K class, A area, M max dets]
    for k, c in enumerate(classes):
        if k + 1 in present:
            p = precision[:, :, k, 0, -1]
            out.per_class_AP[c] = float(p[p > -1].mean()) if (p > -1).any() else 0.0
    out.pr50 = precision[0, :, :, 0, -1].T.copy()
    return out


def plot_pr_curve(metrics: DetectionMetrics, classes: list[str], path: str | os.PathLike, title: str = "") -> Path:
    """Precision-recall at IoU 0.5: one line per class with ground truth, and their mean (thick)."""
    from ..plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    recall = np.linspace(0, 1, 101)
    if metrics.pr50 is not None:
        curves = []
        for k, c in enumerate(classes):
            p = metrics.pr50[k]
            if (p > -1).any():
                p = np.where(p > -1, p, 0.0)
                curves.append(p)
                ap = metrics.per_class_AP.get(c)
                ax.plot(recall, p, lw=1, alpha=0.7, label=f"{c} (AP {ap:.3f})" if ap is not None else c)
        if curves:
            ax.plot(recall, np.mean(curves, axis=0), lw=2.5, color="black", label=f"mean (AP50 {metrics.AP50:.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title(title or f"PR curve at IoU 0.5 - AP {metrics.AP:.3f}, AP50 {metrics.AP50:.3f}")
    ax.grid(alpha=0.3)
    if len(classes) <= 20 and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return save_figure(fig, path)


def finite_or_none(x: float) -> float | None:
    """A metric for JSON: -1 (COCO's "undefined") and NaN become None."""
    return None if x is None or not math.isfinite(x) or x < 0 else x
