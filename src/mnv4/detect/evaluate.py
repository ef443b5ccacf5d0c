"""Running a detector over records: predictions in original-image pixels, and COCO metrics of them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.images import BadImageLog
from .data import DetectionDataset, collate_detection
from .formats import DetRecord
from .metrics import DetectionMetrics, coco_metrics
from .transforms import DetectionAugment, unletterbox

__all__ = ["predict_records", "evaluate_detector"]


@torch.no_grad()
def predict_records(
    model: nn.Module,
    records: list[DetRecord],
    size: int,
    mode: str = "letterbox",
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    workers: int = 0,
    bad: BadImageLog | None = None,
) -> list[dict[str, Any] | None]:
    """One ``{"boxes", "scores", "labels"}`` (CPU tensors, boxes in the original image's pixels) per record,
    None for an unreadable image (named in ``bad``). ``model`` is any torchvision-style detector taking a list
    of [0, 1] images of ``size`` x ``size``."""
    ds = DetectionDataset(records, DetectionAugment(size, mode=mode))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_detection)
    was_training = model.training
    model.eval()
    out: dict[int, dict[str, Any]] = {}
    try:
        for images, targets, broken in loader:
            if bad is not None:
                bad.add(broken)
            if not targets:
                continue
            preds = model(list(images.to(device)))
            for p, t in zip(preds, targets):
                boxes = unletterbox(p["boxes"].float().cpu(), t["letterbox"])
                out[t["image_id"]] = {"boxes": boxes, "scores": p["scores"].float().cpu(), "labels": p["labels"].cpu()}
    finally:
        model.train(was_training)
    return [out.get(r.image_id) for r in records]


def evaluate_detector(
    model: nn.Module, records: list[DetRecord], classes: list[str], size: int, **predict_options: Any
) -> tuple[DetectionMetrics, list[dict[str, Any] | None]]:
    """COCO metrics of ``model`` on ``records`` (unreadable images left out of both sides), and the predictions;
    ``predict_options`` are :func:`predict_records`' (``mode``, ``device``, ``batch_size``, ``workers``, ``bad``)."""
    preds = predict_records(model, records, size, **predict_options)
    kept = [(r, p) for r, p in zip(records, preds) if p is not None]
    metrics = coco_metrics([r for r, _ in kept], [p for _, p in kept], classes)
    return metrics, preds
