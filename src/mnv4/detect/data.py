"""Detection datasets: a folder in COCO, Pascal VOC or YOLO layout (detected from what it holds) or the
built-in digits set, as splits of :class:`~mnv4.detect.formats.DetRecord` and a torch ``Dataset``.

Layouts (docs/detection.md "Data formats"):

* YOLO: a ``data.yaml`` (or another ``*.yaml`` with ``names``) whose ``train`` / ``val`` / ``test`` name
  image folders or list files; each ``.../images/.../NAME.jpg`` has its boxes in ``.../labels/.../NAME.txt``.
* VOC: ``Annotations/*.xml`` and ``JPEGImages/``; splits from ``ImageSets/Main/{train,val,test}.txt``.
* COCO: one JSON per split, either ``annotations/*{train,val,test}*.json`` or ``{train,valid,val,test}/*.json``
  (Roboflow's ``_annotations.coco.json``); image files are looked up next to the JSON, under the root,
  ``images/`` or the split's folder.

Without a validation split, a seeded fraction of the training images is held out. Images go through the
one image loader (mnv4/data/images.py); bad boxes are fixed or dropped and counted (formats.py).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.images import BadImage, is_image_file, try_load_rgb
from ..data.sampling import sample_seed
from ..errors import MNv4Error, check_float
from ..files import read_mapping
from ..threads import sample_threads
from .formats import (
    BoxIssues,
    DetRecord,
    coco_boxes,
    image_size,
    read_coco_json,
    read_voc_xml,
    read_yolo_txt,
    sanitize_boxes,
    sanitize_boxes_kept,
)

__all__ = ["DetectionData", "DetectionDataset", "collate_detection", "detect_format", "load_detection_data"]

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


@dataclass
class DetectionData:
    """A detection dataset as splits of records; ``issues`` counts what the readers fixed or left out."""

    name: str
    format: str
    classes: list[str]
    splits: dict[str, list[DetRecord]]
    issues: BoxIssues = field(default_factory=BoxIssues)
    input_size: int | None = None  # natural input size (the digits set's canvas); None: the model's

    def split(self, name: str) -> list[DetRecord]:
        if name not in self.splits:
            have = ", ".join(self.splits) or "none"
            raise MNv4Error(f"{self.name} has no {name} split (it has: {have}); choose another `split`")
        return self.splits[name]


# ---------------------------------------------------------------------------------------------- detection
def detect_format(root: Path) -> str:
    """``yolo``, ``voc`` or ``coco`` from what ``root`` holds; an error naming the three layouts otherwise."""
    if _yolo_yaml(root) is not None:
        return "yolo"
    if (root / "Annotations").is_dir():
        return "voc"
    if _coco_files(root):
        return "coco"
    raise MNv4Error(
        f"{root} is not a detection dataset: expected a YOLO data.yaml, a VOC Annotations/ folder, or COCO "
        "JSON files (annotations/*.json or SPLIT/*.json); see docs/detection.md"
    )


def load_detection_data(
    data: str | os.PathLike | None = None,
    classes: list[str] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    warn: bool = True,
) -> DetectionData:
    """Read a detection folder (or ``digits``/None: the built-in set). ``classes`` (a detector's) fixes the
    class order; boxes of other classes are then dropped and counted."""
    if data is None or str(data).lower() == "digits":
        from .digits import DIGITS_CANVAS, digits_detection_folder

        out = load_detection_data(digits_detection_folder(seed=seed), classes, val_fraction, seed, warn)
        out.name, out.input_size = "digits", DIGITS_CANVAS
        return out
    root = Path(data)
    if not root.is_dir():
        raise MNv4Error(f"`data` {data}: no such folder (give a COCO, VOC or YOLO dataset folder, or omit it)")
    fmt = detect_format(root)
    issues = BoxIssues()
    reader = {"yolo": _read_yolo, "voc": _read_voc, "coco": _read_coco}[fmt]
    found, splits = reader(root, classes, issues)
    splits = {k: v for k, v in splits.items() if v}
    if "train" in splits and "val" not in splits:
        splits["train"], splits["val"] = _hold_out(splits["train"], val_fraction, seed)
    if not splits:
        raise MNv4Error(f"{root}: found no images in any split; check the {fmt.upper()} layout (docs/detection.md)")
    _number(splits)
    out = DetectionData(root.name, fmt, list(classes or found), splits, issues)
    line = issues.line(f"{root.name} ({fmt})")
    if warn and line:
        warnings.warn(line, stacklevel=2)
    return out


def _hold_out(records: list[DetRecord], fraction: float, seed: int) -> tuple[list[DetRecord], list[DetRecord]]:
    check_float("val_split", fraction, 0.0, 1.0, lo_open=True, hi_open=True)
    if len(records) < 2:
        raise MNv4Error("the dataset has fewer than 2 images; it cannot be split into train and val")
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = min(len(records) - 1, max(1, round(len(records) * fraction)))
    val = set(order[:n_val].tolist())
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


def _number(splits: dict[str, list[DetRecord]]) -> None:
    """Give every record an image id unique within its split (COCO evaluation keys on it)."""
    for records in splits.values():
        for i, r in enumerate(records):
            r.image_id = i + 1


def _label_map(found: list[str], wanted: list[str] | None) -> dict[str, int]:
    """class name -> label (``wanted``'s order when given, else ``found``'s)."""
    order = wanted if wanted else found
    return {name: i for i, name in enumerate(order)}


def _record(path: Path, boxes, labels, issues: BoxIssues, size: tuple[int, int] | None = None) -> DetRecord | None:
    size = size or image_size(path)
    if size is None:
        issues.add("missing_image" if not path.exists() else "unreadable_image")
        return None
    b, lab = sanitize_boxes(boxes, labels, size[0], size[1], issues)
    return DetRecord(str(path), size[0], size[1], b, lab)


# ---------------------------------------------------------------------------------------------- YOLO
def _yolo_yaml(root: Path) -> Path | None:
    if (root / "data.yaml").is_file():
        return root / "data.yaml"
    for p in sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml")):
        try:
            if "names" in read_mapping(p, "YOLO data file", "names, train, val"):
                return p
        except MNv4Error:
            continue
    return None


def _yolo_names(meta: dict[str, Any], path: Path) -> list[str]:
    names = meta.get("names")
    if isinstance(names, dict):
        # The ids in the label files index this mapping; compacting ids with gaps would give boxes the wrong
        # names, so the ids must be exactly 0..N-1 (as Ultralytics requires).
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise MNv4Error(f"{path}: `names` keys must be class ids 0..N-1; got {list(names)[:5]}") from None
        if ids != list(range(len(ids))):
            raise MNv4Error(
                f"{path}: `names` ids must be 0..{len(ids) - 1} without gaps (got {ids[:8]}); renumber the "
                "classes in the data file and the label files"
            )
        names = [names[k] for k in sorted(names, key=int)]
    if not isinstance(names, list) or not names:
        raise MNv4Error(f"{path}: `names` must list the class names (a list, or a mapping id: name)")
    return [str(n) for n in names]


def _yolo_images(base: Path, entry: Any) -> list[Path]:
    """Image files of one split entry: a folder, a list file of image paths, or a list of either."""
    out: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        p = (base / str(item)).resolve() if not Path(str(item)).is_absolute() else Path(str(item))
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and is_image_file(q.name))
        elif p.is_file() and p.suffix == ".txt":
            lines = [s.strip() for s in p.read_text().splitlines() if s.strip()]
            out += [(p.parent / s).resolve() if not Path(s).is_absolute() else Path(s) for s in lines]
        else:
            raise MNv4Error(f"YOLO split {item!r}: no such folder or list file under {base}; fix the data.yaml")
    return out


def _yolo_label_path(image: Path) -> Path:
    parts = list(image.parts)
    idx = max((i for i, s in enumerate(parts) if s == "images"), default=None)
    if idx is None:
        return image.with_suffix(".txt")  # labels next to the images
    parts[idx] = "labels"
    return Path(*parts).with_suffix(".txt")


def _read_yolo(root: Path, classes: list[str] | None, issues: BoxIssues):
    yaml_path = _yolo_yaml(root)
    meta = read_mapping(yaml_path, "YOLO data file", "names, train, val")
    names = _yolo_names(meta, yaml_path)
    base = yaml_path.parent / str(meta.get("path") or ".")
    remap = _remap(names, classes)
    splits: dict[str, list[DetRecord]] = {}
    for split in SPLITS:
        if not meta.get(split):
            continue
        records = []
        for img in _yolo_images(base, meta[split]):
            size = image_size(img)
            if size is None:
                issues.add("missing_image" if not img.exists() else "unreadable_image")
                continue
            label_file = _yolo_label_path(img)
            if label_file.is_file():
                try:
                    boxes, labels = read_yolo_txt(label_file, size[0], size[1], len(names), issues)
                except (OSError, ValueError):  # not text: its boxes are unknown, so the image is no negative
                    issues.add("unreadable_label_file")
                    continue
            else:
                issues.add("missing_label_file")
                boxes, labels = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
            rec = _record(img, boxes, remap[labels] if len(labels) else labels, issues, size)
            if rec is not None:
                records.append(rec)
        splits[split] = records
    return names, splits


def _remap(names: list[str], classes: list[str] | None) -> np.ndarray:
    """File label -> our label (-1: a class the given ``classes`` do not have)."""
    if not classes:
        return np.arange(len(names), dtype=np.int64)
    index = _label_map(names, classes)
    return np.asarray([index.get(n, -1) for n in names], dtype=np.int64)


# ---------------------------------------------------------------------------------------------- VOC
def _voc_split_ids(root: Path) -> dict[str, list[str]]:
    main = root / "ImageSets" / "Main"
    out = {}
    for split in SPLITS:
        for alias in _SPLIT_ALIASES[split]:
            f = main / f"{alias}.txt"
            if f.is_file():
                out[split] = [line.split()[0] for line in f.read_text().splitlines() if line.strip()]
                break
    if not out:  # no split files: every annotation is training data (a val split is held out)
        out["train"] = sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    return out


def _voc_image(root: Path, stem: str, filename: str | None) -> Path:
    folder = root / "JPEGImages"
    if filename and (folder / filename).is_file():
        return folder / filename
    for suffix in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp"):
        if (folder / (stem + suffix)).is_file():
            return folder / (stem + suffix)
    return folder / (filename or stem + ".jpg")


def _read_voc(root: Path, classes: list[str] | None, issues: BoxIssues):
    ids = _voc_split_ids(root)
    parsed: dict[str, tuple[str | None, list] | None] = {}
    for stem in sorted({s for v in ids.values() for s in v}):
        xml = root / "Annotations" / f"{stem}.xml"
        try:
            parsed[stem] = read_voc_xml(xml) if xml.is_file() else (None, [])
        except Exception:  # ElementTree raises ParseError and others for a broken file
            parsed[stem] = None  # its boxes are unknown, so the image is no negative: dropped, counted
            issues.add("unreadable_label_file")
        if not xml.is_file():
            issues.add("missing_label_file")
    found = sorted({name for entry in parsed.values() if entry for name, _ in entry[1] if name})
    index = _label_map(found, classes)
    splits = {}
    for split, stems in ids.items():
        records = []
        for stem in stems:
            if parsed[stem] is None:
                continue
            filename, objs = parsed[stem]
            boxes = np.asarray([c for _, c in objs], np.float64).reshape(-1, 4)
            labels = np.asarray([index.get(n, -1) for n, _ in objs], np.int64)
            rec = _record(_voc_image(root, stem, filename), boxes, labels, issues)
            if rec is not None:
                records.append(rec)
        splits[split] = records
    return found, splits


# ---------------------------------------------------------------------------------------------- COCO
# COCO's own annotations/ folder holds other tasks' files per split beside the boxes: captions and keypoints
# (no boxes of their own categories), stuff and panoptic (segments). Boxes come from instances_*.json.
_COCO_OTHER_TASKS = ("captions", "person_keypoints", "stuff", "panoptic", "image_info")


def _coco_files(root: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    ann = root / "annotations"
    jsons = sorted(ann.glob("*.json")) if ann.is_dir() else []
    # instances_* first, the other tasks' files last: a split takes the first file that names it
    jsons = sorted(jsons, key=lambda p: (not p.stem.startswith("instances"), p.stem.startswith(_COCO_OTHER_TASKS)))
    for split in SPLITS:
        for alias in _SPLIT_ALIASES[split]:
            hit = [p for p in jsons if re.search(rf"(^|[_\-.]){alias}(\d*|[_\-.])", p.stem)]
            folder = sorted((root / alias).glob("*.json")) if (root / alias).is_dir() else []
            if hit or folder:
                out[split] = (hit or folder)[0]
                break
    return out


def _coco_image_folders(json_path: Path, root: Path) -> list[Path]:
    """Where a COCO file's images may be: next to the JSON, the root, ``images/``, and for a file named like
    ``instances_train2017.json`` the split's folder (``train2017/``, ``images/train2017/``)."""
    folders = [json_path.parent, root, root / "images"]
    for part in dict.fromkeys([json_path.parent.name, *re.split(r"[_\-.]", json_path.stem)]):
        if part and part != "annotations":
            folders += [root / part, root / "images" / part]
    return [f for f in dict.fromkeys(folders) if f.is_dir()]


def _coco_image(folders: list[Path], name: str) -> Path | None:
    for base in folders:
        if (base / name).is_file():
            return base / name
    return None


def _read_coco(root: Path, classes: list[str] | None, issues: BoxIssues):
    files = _coco_files(root)
    found: list[str] | None = None
    splits = {}
    for split, path in files.items():
        try:
            coco = read_coco_json(path)
        except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise MNv4Error(f"{path}: cannot read it as COCO JSON ({' '.join(str(e).split())[:200]})") from None
        cats = sorted(coco["categories"], key=lambda c: (isinstance(c["id"], str), str(c["id"]).zfill(12)))
        names = [str(c["name"]) for c in cats]
        found = found or names
        index = _label_map(found, classes)
        cat_to_label = {c["id"]: index.get(str(c["name"]), -1) for c in cats}
        by_image: dict[Any, list[dict]] = {}
        for a in coco["annotations"]:
            if isinstance(a, dict):
                by_image.setdefault(a.get("image_id"), []).append(a)
            else:
                issues.add("malformed_label")
        folders = _coco_image_folders(path, root)
        records = []
        for im in coco["images"]:
            if not isinstance(im, dict):
                issues.add("malformed_label")
                continue
            boxes, labels, areas, crowd, crowd_labels = coco_boxes(by_image.get(im.get("id"), []), cat_to_label, issues)
            path_i = _coco_image(folders, str(im.get("file_name", "")))
            if path_i is None:
                issues.add("missing_image")
                continue
            # The file's stated size saves opening 100k+ headers; a wrong one is corrected when the image is
            # loaded (DetectionDataset) and evaluation compares in the stated frame (evaluate.predict_records).
            size = (_positive_int(im.get("width")), _positive_int(im.get("height")))
            size = image_size(path_i) if None in size else size
            if size is None:
                issues.add("unreadable_image")
                continue
            b, lab, keep = sanitize_boxes_kept(boxes, labels, size[0], size[1], issues)
            rec = DetRecord(str(path_i), size[0], size[1], b, lab, areas=areas[keep])
            rec.crowd_boxes, rec.crowd_labels = crowd, crowd_labels
            records.append(rec)
        splits[split] = records
    return found or [], splits


def _positive_int(value: Any) -> int | None:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


# ---------------------------------------------------------------------------------------------- torch side
Transform = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]]


class DetectionDataset(Dataset):
    """``(epoch, i)`` (or ``i``) -> (float image [3, S, S] or :class:`BadImage`, target dict of the contract).

    The transform's random draws are seeded by (seed, epoch, i), as classification's SeededDataset does,
    so a sample is the same in any worker, process count or resumed run.
    """

    def __init__(self, records: list[DetRecord], transform: Transform, seed: int = 0) -> None:
        self.records, self.transform, self.seed = records, transform, seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, dict[str, Any]]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        r = self.records[i]
        with sample_threads():
            im = try_load_rgb(r.path)
            if isinstance(im, BadImage):
                return im, {"image_id": r.image_id}
            from torchvision.transforms.v2.functional import pil_to_tensor

            image = pil_to_tensor(im)
            boxes = torch.from_numpy(r.boxes).float().reshape(-1, 4)
            if len(boxes) and (im.width, im.height) != (r.width, r.height):  # the annotation's size was wrong
                boxes = boxes * torch.tensor([im.width / r.width, im.height / r.height] * 2)
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(sample_seed(self.seed, epoch, i, 0xDE7))
                x, b, lab, lb = self.transform(image, boxes, torch.from_numpy(r.labels).long())
        return x, {"boxes": b, "labels": lab.long(), "image_id": r.image_id, "letterbox": lb}


def collate_detection(
    batch: list[tuple[Any, dict[str, Any]]],
) -> tuple[torch.Tensor, list[dict[str, Any]], list[BadImage]]:
    """Stack a batch's images ([B, 3, S, S]) and keep the targets as a list, leaving out unreadable files."""
    good = [(x, t) for x, t in batch if not isinstance(x, BadImage)]
    bad = [x for x, _ in batch if isinstance(x, BadImage)]
    if not good:
        return torch.empty(0), [], bad
    return torch.stack([x for x, _ in good]), [t for _, t in good], bad
