"""Prediction output: rows of boxes (JSON lines or CSV) and images with their boxes drawn."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..data.images import load_rgb
from ..files import atomic_write, atomic_write_text
from .formats import DetRecord

__all__ = ["prediction_rows", "write_rows", "draw_predictions"]

CSV_FIELDS = ("path", "label", "class", "score", "x1", "y1", "x2", "y2")


def _kept(p: dict[str, Any], threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    keep = p["scores"] >= threshold
    return p["boxes"][keep], p["scores"][keep], p["labels"][keep]


def prediction_rows(
    records: list[DetRecord], preds: list[dict[str, Any] | None], classes: list[str], threshold: float
) -> list[dict[str, Any]]:
    """One dict per readable image: ``path`` and its ``detections`` (class, label, score, box in original pixels)."""
    rows = []
    for r, p in zip(records, preds):
        if p is None:
            continue
        boxes, scores, labels = _kept(p, threshold)
        dets = [
            {
                "label": int(lab),
                "class": classes[int(lab)],
                "score": round(float(s), 5),
                "box": [round(v, 2) for v in b],
            }
            for b, s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist())
        ]
        rows.append({"path": r.path, "detections": dets})
    return rows


def write_rows(rows: list[dict[str, Any]], fmt: str, output: str | os.PathLike | None) -> None:
    """``jsonl``: one JSON object per image; ``csv``: one line per box (CSV_FIELDS). To ``output`` or stdout."""
    buf = io.StringIO()
    if fmt == "jsonl":
        for row in rows:
            buf.write(json.dumps(row) + "\n")
    else:
        w = csv.writer(buf)
        w.writerow(CSV_FIELDS)
        for row in rows:
            for d in row["detections"]:
                w.writerow([row["path"], d["label"], d["class"], d["score"], *d["box"]])
    if output:
        atomic_write_text(output, buf.getvalue())
    else:
        sys.stdout.write(buf.getvalue())


def drawn_paths(images: list[str | os.PathLike], folder: str | os.PathLike) -> list[Path]:
    """Where :func:`draw_predictions` writes each image: ``folder/STEM.png``, clashing stems suffixed ``-2``,
    ``-3``... (known before predicting, so a command can refuse a folder that would overwrite an input)."""
    used: set[str] = set()
    out = []
    for path in images:
        stem = name = Path(path).stem
        n = 1
        while f"{name}.png" in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(f"{name}.png")
        out.append(Path(folder) / f"{name}.png")
    return out


def check_drawn_paths(images: list[str | os.PathLike], folder: str | os.PathLike) -> None:
    """Refuse a ``folder`` where a drawn image would replace one of the ``images`` being read."""
    from ..errors import MNv4Error

    inputs = {Path(p).resolve() for p in images}
    for source, target in zip(images, drawn_paths(images, folder)):
        if target.resolve() in inputs:
            raise MNv4Error(
                f"`save_images` {folder}: the drawn {target.name} would replace the input image {source}; "
                "choose another folder"
            )


def draw_predictions(
    records: list[DetRecord],
    preds: list[dict[str, Any] | None],
    classes: list[str],
    threshold: float,
    folder: str | os.PathLike,
) -> int:
    """Write each readable image with its boxes drawn (torchvision's draw_bounding_boxes) to ``folder``;
    returns how many were written. Names keep the source's stem; clashes get a numeric suffix
    (:func:`drawn_paths`); a name that is one of the images read is refused (:func:`check_drawn_paths`)."""
    from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image
    from torchvision.utils import draw_bounding_boxes

    folder = Path(folder)
    check_drawn_paths([r.path for r in records], folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for r, p, target in zip(records, preds, drawn_paths([r.path for r in records], folder)):
        if p is None:
            continue
        boxes, scores, labels = _kept(p, threshold)
        image = pil_to_tensor(load_rgb(r.path))
        text = [f"{classes[int(lab)]} {float(s):.2f}" for lab, s in zip(labels, scores)]
        width = max(1, round(max(image.shape[-2:]) / 320))
        drawn = draw_bounding_boxes(image, boxes, text, colors="red", width=width) if len(boxes) else image
        pil = to_pil_image(drawn)
        atomic_write(target, lambda tmp, im=pil: im.save(tmp, format="PNG"))
        written += 1
    return written
