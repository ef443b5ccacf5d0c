"""Box file formats (COCO JSON, Pascal VOC XML, YOLO txt) to and from one internal form.

The internal form is a :class:`DetRecord` per image: its path, its size as the image loader sees it
(after the EXIF orientation), and its boxes as ``float32 [N, 4]`` xyxy pixels with ``int64 [N]`` labels
in ``0..C-1`` (an index into the class list). Readers never crash on a bad box: :func:`sanitize_boxes`
clips boxes that reach outside the image and drops inverted, degenerate, outside, non-finite and
unknown-class ones, counting each kind by name in a :class:`BoxIssues` (one summary line at the end).
The writers exist so a dataset can be exported and so the tests can round-trip each format.

Coordinates are taken as the files state them, without VOC's 1-based shift: VOC ``xmin..xmax``, COCO
``x, y, x + w, y + h`` and YOLO's normalised centre/size times the image size are all read as xyxy pixels.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..files import atomic_write_json, atomic_write_text

__all__ = [
    "DetRecord",
    "BoxIssues",
    "sanitize_boxes",
    "image_size",
    "read_voc_xml",
    "read_yolo_txt",
    "read_coco_json",
    "write_voc_xml",
    "write_yolo_txt",
    "write_coco_json",
]

# Why a box or an image was changed or left out; the summary line uses these descriptions.
ISSUES = {
    "clipped_box": "boxes clipped to the image",
    "degenerate_box": "degenerate boxes (under 1 px wide or high) dropped",
    "inverted_box": "inverted boxes (max < min) dropped",
    "outside_box": "boxes wholly outside the image dropped",
    "non_finite_box": "boxes with non-finite coordinates dropped",
    "unknown_class": "boxes of unknown classes dropped",
    "class_out_of_range": "boxes with a class id out of range dropped",
    "malformed_label": "malformed label lines dropped",
    "unreadable_label_file": "images whose label file cannot be parsed dropped",
    "crowd_box": "COCO crowd regions kept out of training (ignored in evaluation)",
    "missing_label_file": "images without a label file (used as negatives)",
    "missing_image": "annotated images whose file is missing dropped",
    "unreadable_image": "unreadable images dropped",
}


@dataclass
class DetRecord:
    """One image and its boxes, in the internal form (module docstring)."""

    path: str
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4] xyxy pixels of the (EXIF-oriented) image
    labels: np.ndarray  # int64 [N], 0..C-1
    image_id: int = 0
    # COCO only. areas: the annotations' own `area` (a segment's area), which COCO's small / medium / large
    # split uses; None: box areas. crowd: iscrowd regions, never trained on; evaluation ignores detections
    # on them as COCO's does, instead of counting them as false positives.
    areas: np.ndarray | None = None  # float32 [N]
    crowd_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    crowd_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))


@dataclass
class BoxIssues:
    """Counts of everything the readers fixed or left out, by name (keys of ``ISSUES``)."""

    counts: Counter = field(default_factory=Counter)

    def add(self, name: str, n: int = 1) -> None:
        if n:
            self.counts[name] += n

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.counts.items())}

    def line(self, what: str) -> str:
        """One line for the user ("" when nothing happened)."""
        if not self.counts:
            return ""
        parts = [f"{n} {ISSUES.get(k, k)}" for k, n in sorted(self.counts.items())]
        return f"{what}: " + "; ".join(parts)


def sanitize_boxes(
    boxes: np.ndarray, labels: np.ndarray, width: int, height: int, issues: BoxIssues, min_size: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to the image and drop the unusable ones (counted in ``issues``); labels < 0 mark unknown classes."""
    b, lab, _ = sanitize_boxes_kept(boxes, labels, width, height, issues, min_size)
    return b, lab


def sanitize_boxes_kept(
    boxes: np.ndarray, labels: np.ndarray, width: int, height: int, issues: BoxIssues, min_size: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`sanitize_boxes` plus the boolean mask of the input boxes kept (to filter per-box extras)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    keep = lab >= 0
    issues.add("unknown_class", int((~keep).sum()))
    finite = np.isfinite(b).all(axis=1)
    issues.add("non_finite_box", int((keep & ~finite).sum()))
    keep &= finite
    b = np.where(np.isfinite(b), b, 0.0)
    inverted = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    issues.add("inverted_box", int((keep & inverted).sum()))
    keep &= ~inverted
    outside = (b[:, 0] >= width) | (b[:, 1] >= height) | (b[:, 2] <= 0) | (b[:, 3] <= 0)
    issues.add("outside_box", int((keep & outside).sum()))
    keep &= ~outside
    clipped = b.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    was_clipped = (np.abs(clipped - b) > 1e-6).any(axis=1)
    small = ((clipped[:, 2] - clipped[:, 0]) < min_size) | ((clipped[:, 3] - clipped[:, 1]) < min_size)
    issues.add("degenerate_box", int((keep & small).sum()))
    keep &= ~small
    issues.add("clipped_box", int((keep & was_clipped).sum()))
    return clipped[keep].astype(np.float32), lab[keep], keep


_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) as the image loader will see the image (after EXIF orientation), from the header only;
    None when the file is missing or unreadable."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None
    return (h, w) if orientation in _TRANSPOSED else (w, h)


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)


# ---------------------------------------------------------------------------------------------- VOC
def read_voc_xml(path: str | os.PathLike) -> tuple[str | None, list[tuple[str, list[float]]]]:
    """(file name named in the XML or None, [(class name, [xmin, ymin, xmax, ymax])]) of one VOC annotation.
    A box with missing or non-numeric coordinates gets NaNs (dropped later as non-finite)."""
    root = ET.parse(path).getroot()
    objects = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        coords = []
        for key in ("xmin", "ymin", "xmax", "ymax"):
            try:
                coords.append(float((bb.findtext(key) if bb is not None else None) or "nan"))
            except ValueError:
                coords.append(float("nan"))
        objects.append((name, coords))
    filename = root.findtext("filename")
    return (filename.strip() if filename else None), objects


def write_voc_xml(path: str | os.PathLike, record: DetRecord, classes: list[str]) -> Path:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = Path(record.path).name
    size = ET.SubElement(root, "size")
    for key, v in (("width", record.width), ("height", record.height), ("depth", 3)):
        ET.SubElement(size, key).text = str(v)
    for box, label in zip(record.boxes.tolist(), record.labels.tolist()):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = classes[label]
        ET.SubElement(obj, "difficult").text = "0"
        bb = ET.SubElement(obj, "bndbox")
        for key, v in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(bb, key).text = f"{v:.6g}"
    ET.indent(root)
    return atomic_write_text(path, ET.tostring(root, encoding="unicode") + "\n")


# ---------------------------------------------------------------------------------------------- YOLO
def read_yolo_txt(
    path: str | os.PathLike, width: int, height: int, num_classes: int, issues: BoxIssues
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (xyxy pixels, unsanitised) and labels of one YOLO label file; out-of-range class ids get -1
    (counted as ``class_out_of_range``). Lines of more than 5 numbers are polygons (YOLO segmentation
    labels): their bounding box is used."""
    boxes, labels = [], []
    # utf-8-sig: a byte-order mark (Windows editors) is not part of the first class id. Another encoding
    # raises UnicodeDecodeError (a ValueError): the reader drops that image and counts it.
    for line in Path(path).read_text(encoding="utf-8-sig").splitlines():
        parts = line.split()
        if not parts:
            continue
        try:
            cls_f, nums = float(parts[0]), [float(p) for p in parts[1:]]
        except ValueError:
            issues.add("malformed_label")
            continue
        if len(nums) < 4 or (len(nums) > 4 and len(nums) % 2) or not cls_f.is_integer():
            issues.add("malformed_label")
            continue
        if len(nums) == 4:
            cx, cy, w, h = nums
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        else:
            xs, ys = nums[0::2], nums[1::2]
            box = [min(xs), min(ys), max(xs), max(ys)]
        cls = int(cls_f)
        if not 0 <= cls < num_classes:
            issues.add("class_out_of_range")
            continue
        boxes.append([box[0] * width, box[1] * height, box[2] * width, box[3] * height])
        labels.append(cls)
    if not boxes:
        return _empty()
    return np.asarray(boxes, np.float32), np.asarray(labels, np.int64)


def write_yolo_txt(path: str | os.PathLike, record: DetRecord) -> Path:
    lines = []
    for (x1, y1, x2, y2), label in zip(record.boxes.tolist(), record.labels.tolist()):
        w, h = record.width, record.height
        cx, cy, bw, bh = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h
        lines.append(f"{label} {cx:.8f} {cy:.8f} {bw:.8f} {bh:.8f}")
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------------------- COCO
def read_coco_json(path: str | os.PathLike) -> dict:
    """The parsed COCO file (``images``, ``annotations``, ``categories``); a broken file raises ValueError
    naming what is wrong (the reader turns it into one line naming the file)."""
    with open(path, encoding="utf-8-sig") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError("not a COCO detection file (no `images` list)")
    for key in ("annotations", "categories"):
        if data.get(key) is None:
            data[key] = []
        if not isinstance(data[key], list):
            raise ValueError(f"`{key}` must be a list, not {type(data[key]).__name__}")
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "name" not in c or not isinstance(c.get("id"), int | str):
            raise ValueError(f"categories[{i}] must be an object with `id` and `name`; got {str(c)[:80]}")
    return data


def coco_boxes(
    anns: list[dict], cat_to_label: dict[int, int], issues: BoxIssues
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image's COCO annotations as (xyxy boxes (unsanitised), labels (-1: unknown category), areas (the
    annotation's ``area``, else the box's), crowd boxes, crowd labels). Malformed entries are counted."""
    boxes, labels, areas, crowd, crowd_labels = [], [], [], [], []
    for a in anns:
        bbox = a.get("bbox") if isinstance(a, dict) else None
        if not isinstance(bbox, list | tuple) or len(bbox) != 4:
            issues.add("malformed_label")
            continue
        try:
            x, y, w, h = (float(v) for v in bbox)
            area = float(a["area"]) if isinstance(a.get("area"), int | float) else w * h
        except (TypeError, ValueError):
            issues.add("malformed_label")
            continue
        label = cat_to_label.get(a.get("category_id"), -1)
        if a.get("iscrowd", 0):
            issues.add("crowd_box")
            if label >= 0:
                crowd.append([x, y, x + w, y + h])
                crowd_labels.append(label)
            continue
        boxes.append([x, y, x + w, y + h])
        labels.append(label)
        areas.append(area)
    b, lab = (np.asarray(boxes, np.float32), np.asarray(labels, np.int64)) if boxes else _empty()
    cb, cl = (np.asarray(crowd, np.float32), np.asarray(crowd_labels, np.int64)) if crowd else _empty()
    return b, lab, np.asarray(areas, np.float32), cb, cl


def write_coco_json(
    path: str | os.PathLike,
    records: list[DetRecord],
    classes: list[str],
    root: str | os.PathLike | None = None,
    scores: list[np.ndarray] | None = None,
) -> Path:
    """A COCO file of ``records`` (category id = label + 1, file names relative to ``root`` when given); with
    ``scores`` (one array per record) the annotations are detections, as COCO result files hold them."""
    images, anns = [], []
    ids = [int(r.image_id) for r in records]
    if len(set(ids)) != len(ids) or 0 in ids:  # records not numbered by a dataset: number them here
        ids = list(range(1, len(records) + 1))
    for r, image_id in zip(records, ids):
        name = os.path.relpath(r.path, root) if root is not None else r.path
        images.append({"id": image_id, "file_name": name, "width": int(r.width), "height": int(r.height)})
        for j, ((x1, y1, x2, y2), label) in enumerate(zip(r.boxes.tolist(), r.labels.tolist())):
            w, h = x2 - x1, y2 - y1
            ann = {
                "id": len(anns) + 1,
                "image_id": image_id,
                "category_id": int(label) + 1,
                "bbox": [x1, y1, w, h],
                "area": float(r.areas[j]) if r.areas is not None else w * h,
                "iscrowd": 0,
            }
            if scores is not None:
                ann["score"] = float(scores[len(images) - 1][j])
            anns.append(ann)
        if scores is None:
            for (x1, y1, x2, y2), label in zip(r.crowd_boxes.tolist(), r.crowd_labels.tolist()):
                box = [x1, y1, x2 - x1, y2 - y1]
                crowd = {"id": len(anns) + 1, "image_id": image_id, "category_id": int(label) + 1, "bbox": box}
                anns.append({**crowd, "area": box[2] * box[3], "iscrowd": 1})
    cats = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    return atomic_write_json(path, {"images": images, "annotations": anns, "categories": cats})
