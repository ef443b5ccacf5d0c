"""Running a detector over records: predictions in original-image pixels, and COCO metrics of them.

:func:`evaluate_artefact` does the same for an exported raw network (``mnv4.detect.export``): the runtime
computes the network, and :class:`ArtefactDetector` hands its outputs to the detector's own decoding
(``Detector.decode``, torchvision's box coder, top-k and NMS, at the eager model's thresholds), so the eager
detector and its artefact are scored by one evaluator on the same letterboxed images.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data.images import BadImage, BadImageLog, find_images
from ..errors import MNv4Error
from .data import DetectionData, DetectionDataset, collate_detection, load_detection_data
from .formats import DetRecord
from .metrics import DetectionMetrics, coco_metrics
from .model import Detector
from .transforms import DetectionAugment, unletterbox

__all__ = [
    "predict_records",
    "evaluate_detector",
    "image_records",
    "letterboxed_images",
    "ArtefactDetector",
    "evaluate_artefact",
    "sidecar_path",
]


@torch.no_grad()
def predict_records(
    model: nn.Module,
    records: list[DetRecord],
    size: int,
    mode: str | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    workers: int = 0,
    bad: BadImageLog | None = None,
) -> list[dict[str, Any] | None]:
    """One ``{"boxes", "scores", "labels"}`` (CPU tensors, boxes in the original image's pixels) per record,
    None for an unreadable image (named in ``bad``). ``model`` is any torchvision-style detector taking a list
    of [0, 1] images of ``size`` x ``size``; ``mode`` (letterbox | fixed) defaults to the detector's own
    (``Detector.resize``, the mode it was trained with)."""
    ds = DetectionDataset(records, DetectionAugment(size, mode=mode or resize_mode(model)))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_detection)
    was_training = model.training
    model.eval()
    out: dict[int, dict[str, Any]] = {}
    by_id = {r.image_id: r for r in records}
    try:
        for images, targets, broken in loader:
            if bad is not None:
                bad.add(broken)
            if not targets:
                continue
            preds = model(list(images.to(device)))
            for p, t in zip(preds, targets):
                boxes = unletterbox(p["boxes"].float().cpu(), t["letterbox"])
                r = by_id[t["image_id"]]
                w, h = t["letterbox"][3:]
                if r.width and r.height and (w, h) != (r.width, r.height):
                    # the annotation file stated another size (COCO's width/height): its boxes, the ground
                    # truth, are in that frame, so the predictions go there too
                    boxes = boxes * torch.tensor([r.width / w, r.height / h] * 2)
                out[t["image_id"]] = {"boxes": boxes, "scores": p["scores"].float().cpu(), "labels": p["labels"].cpu()}
    finally:
        model.train(was_training)
    return [out.get(r.image_id) for r in records]


def resize_mode(model: nn.Module) -> str:
    """The resize mode a detector (or an :class:`ArtefactDetector` of one) was trained with."""
    inner = getattr(model, "detector", model)
    return getattr(inner, "resize", None) or "letterbox"


def evaluate_detector(
    model: nn.Module, records: list[DetRecord], classes: list[str], size: int, **predict_options: Any
) -> tuple[DetectionMetrics, list[dict[str, Any] | None]]:
    """COCO metrics of ``model`` on ``records`` (unreadable images left out of both sides), and the predictions;
    ``predict_options`` are :func:`predict_records`' (``mode``, ``device``, ``batch_size``, ``workers``, ``bad``)."""
    preds = predict_records(model, records, size, **predict_options)
    kept = [(r, p) for r, p in zip(records, preds) if p is not None]
    metrics = coco_metrics([r for r, _ in kept], [p for _, p in kept], classes)
    return metrics, preds


def image_records(paths: list[Path]) -> list[DetRecord]:
    """Records without boxes for image files (prediction, calibration): sizes are read with the image."""
    empty, none = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    return [DetRecord(str(p), 0, 0, empty, none, image_id=i + 1) for i, p in enumerate(paths)]


def letterboxed_images(
    detector: Detector, folder: str | os.PathLike, limit: int, seed: int = 0, bad: BadImageLog | None = None
) -> torch.Tensor:
    """Up to ``limit`` readable images of ``folder`` (searched recursively, a seeded draw), letterboxed and
    normalised as the detector's evaluation sees them: ``[N, 3, S, S]``, what its raw network takes.
    INT8 calibration and parity inputs of a detector come from here (a classifier's resize + centre crop
    would show the network inputs it never gets)."""
    if not Path(folder).is_dir():
        raise MNv4Error(f"image folder not found: {folder}")
    paths = find_images([folder])
    if not paths:
        raise MNv4Error(f"no images found in {folder}")
    random.Random(seed).shuffle(paths)
    ds = DetectionDataset(image_records(paths), DetectionAugment(detector.image_size, mode=detector.resize))
    images: list[torch.Tensor] = []
    for i in range(len(ds)):
        if len(images) >= limit:
            break
        x, _ = ds[i]
        if isinstance(x, BadImage):
            if bad is not None:
                bad.add(x)
            continue
        images.append(x)
    if not images:
        raise MNv4Error(f"none of the {len(paths)} image files in {folder} could be read")
    with torch.no_grad():
        return detector.model.transform(images)[0].tensors


def sidecar_path(artefact: str | os.PathLike) -> Path:
    """``<artefact>.detector.json``: what running an exported detector needs besides the artefact."""
    artefact = Path(artefact)
    return artefact.with_name(artefact.name + ".detector.json")


class ArtefactDetector(nn.Module):
    """An exported raw network in the eager detector's place: ``model(images)`` -> one ``{"boxes", "scores",
    "labels"}`` per image, so :func:`predict_records` and :func:`evaluate_detector` take it unchanged.

    Only the network runs in the runtime; normalisation and decoding are ``detector``'s own (its input stage,
    ``Detector.decode`` at the thresholds its eager forward uses)."""

    def __init__(self, detector: Detector, run, input_format, batch: int | None, classes: int) -> None:
        super().__init__()
        self.detector, self.run, self.input_format = detector, run, input_format
        self.batch, self.class_columns = batch, classes  # batch: the artefact's fixed batch, None: dynamic

    @torch.no_grad()
    def forward(self, images: list[torch.Tensor], targets: Any = None) -> list[dict[str, torch.Tensor]]:
        from ..deploy.parity import run_batches

        x = self.detector.model.transform(images)[0].tensors
        raw = self.input_format.to_raw(x).numpy()
        out = torch.from_numpy(run_batches(self.run, raw, self.batch or len(raw), fixed=self.batch is not None))
        m = self.detector.model
        cls_logits, box_regression = out[..., : self.class_columns], out[..., self.class_columns :]
        return self.detector.decode(
            cls_logits.float(), box_regression.float(), m.score_thresh, m.nms_thresh, m.detections_per_img
        )


def _read_sidecar(path: Path) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.is_file():
        raise MNv4Error(f"{side.name} not found next to {path}: evaluate an artefact written by a detector export")
    info = json.loads(side.read_text())
    if "anchors" not in info:
        raise MNv4Error(
            f"{path} holds decoding + NMS (--with-nms); AP is measured on the raw network's export (drop --with-nms)"
        )
    return info


def evaluate_artefact(
    path: str | os.PathLike,
    data: str | os.PathLike | DetectionData | None = "digits",
    split: str = "val",
    *,
    threads: int | None = None,
    detector: Detector | None = None,
    batch_size: int = 16,
    val_fraction: float = 0.2,
    seed: int = 0,
    bad: BadImageLog | None = None,
) -> DetectionMetrics:
    """COCO metrics of an exported raw detector network (``export_detector``'s artefact) on a dataset split.

    ``data``: a COCO / VOC / YOLO folder, ``digits`` or a loaded :class:`DetectionData`; ``val_fraction`` /
    ``seed`` split a set without a val split as training did. The detector is rebuilt from
    ``<artefact>.detector.json`` (its weights are not needed: decoding uses the anchors and thresholds only)
    unless given.
    """
    from ..deploy.formats import load_runner
    from ..deploy.layout import InputFormat
    from .factory import build_from_config

    path = Path(path)
    info = _read_sidecar(path)
    detector = (detector or build_from_config(info["config"])).eval()
    if not np.allclose(np.asarray(info["anchors"]), detector.anchors().numpy(), atol=1e-3):
        raise MNv4Error(f"{path}'s anchors are not those of the detector given; pass the detector it was exported from")
    pre = info["config"]["preprocess"]
    fmt_in = InputFormat(info.get("input_layout", "nchw"), info.get("input_dtype", "float32"), pre["mean"], pre["std"])
    precision = info.get("precision", "fp32")
    run = load_runner(path, threads=threads, precision=precision)
    columns = detector.num_classes + (detector.head_kind == "ssdlite")
    model = ArtefactDetector(detector, run, fmt_in, info.get("batch"), columns)
    if not isinstance(data, DetectionData):
        data = load_detection_data(data, detector.classes, val_fraction, seed, warn=False)
    records = data.split(split)
    size = detector.image_size
    metrics, _ = evaluate_detector(model, records, detector.classes, size, batch_size=batch_size, bad=bad)
    return metrics
