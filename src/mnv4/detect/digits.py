"""The built-in offline detection set: scikit-learn's handwritten digit scans placed on canvases.

Each canvas (``canvas`` px square, grey paper with mild noise) holds 1-4 digits, each an 8x8 scan upscaled
to 20-44 px, placed without overlap; the box is the digit's tight ink extent and the class its value.
Training canvases use the scans of a seeded 80 % of the digits, validation canvases the other 20 %, so
validation digits are writing the model has never seen. Everything is drawn from ``numpy`` generators
seeded by ``seed``: the same set on every machine.

The set is written once as a YOLO folder in the data cache (``$MNV4_DATA``, default ``~/.cache/mnv4/data``)
and read back through the YOLO reader, so it exercises the same code path as a user's folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .formats import DetRecord, write_yolo_txt

__all__ = ["digits_detection_folder", "make_digits_detection", "DIGIT_CLASSES", "DIGITS_CANVAS"]

DIGITS_CANVAS = 96  # the canvas side of the built-in set: its natural input size

DIGIT_CLASSES = [str(i) for i in range(10)]
_VERSION = 2  # bump when the generator changes, so old caches are not reused


def _canvas(
    rng: np.random.Generator, scans: np.ndarray, targets: np.ndarray, size: int
) -> tuple[np.ndarray, list, list]:
    paper = rng.uniform(150, 235)
    img = np.clip(rng.normal(paper, 6.0, (size, size)), 0, 255)
    boxes, labels, taken = [], [], np.zeros((size, size), bool)
    for _ in range(int(rng.integers(1, 5))):
        k = int(rng.integers(0, len(scans)))
        side = int(rng.integers(20, 45))
        for _attempt in range(20):
            x, y = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            if not taken[y : y + side, x : x + side].any():
                break
        else:
            continue  # no free spot: fewer digits on this canvas
        ink = Image.fromarray((scans[k] * (255.0 / 16.0)).astype(np.uint8)).resize((side, side), Image.BICUBIC)
        a = np.asarray(ink, np.float64) / 255.0
        rows, cols = np.nonzero(a > 0.25)
        if not len(rows):
            continue
        colour = rng.uniform(0, 70)
        patch = img[y : y + side, x : x + side]
        img[y : y + side, x : x + side] = patch * (1 - a) + colour * a
        taken[y : y + side, x : x + side] = True
        boxes.append([x + cols.min(), y + rows.min(), x + cols.max() + 1, y + rows.max() + 1])
        labels.append(int(targets[k]))
    return img.astype(np.uint8), boxes, labels


def make_digits_detection(
    folder: str | os.PathLike, seed: int = 0, num_train: int = 800, num_val: int = 200, canvas: int = DIGITS_CANVAS
) -> Path:
    """Write the set as a YOLO folder (``data.yaml``, ``{train,valid}/images|labels``) and return it."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng([seed, 0xD161]).permutation(len(digits.target))
    cut = int(0.8 * len(order))
    folder = Path(folder)
    for split, idx, count in (("train", order[:cut], num_train), ("valid", order[cut:], num_val)):
        rng = np.random.default_rng([seed, 0xCA5, 0 if split == "train" else 1])
        (folder / split / "images").mkdir(parents=True, exist_ok=True)
        (folder / split / "labels").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img, boxes, labels = _canvas(rng, digits.images[idx], digits.target[idx], canvas)
            name = f"{split}_{i:05d}"
            Image.fromarray(img, mode="L").convert("RGB").save(folder / split / "images" / f"{name}.png")
            rec = DetRecord(
                name, canvas, canvas, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)
            )
            write_yolo_txt(folder / split / "labels" / f"{name}.txt", rec)
    names = ", ".join(f"'{c}'" for c in DIGIT_CLASSES)
    (folder / "data.yaml").write_text(f"path: .\ntrain: train/images\nval: valid/images\nnames: [{names}]\n")
    return folder


def digits_detection_folder(seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """The built-in set's YOLO folder in the data cache, made on first use (read it with
    :func:`mnv4.detect.data.load_detection_data`, which does so for ``digits``)."""
    from ..data.datasets import default_data_root

    base = Path(root) if root is not None else default_data_root()
    folder = base / f"digits-detection-v{_VERSION}-seed{seed}"
    if not (folder / "data.yaml").is_file():
        base.mkdir(parents=True, exist_ok=True)
        # Made in a temp folder and renamed: a reader never sees half a set, and two makers do not collide.
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=base))
        try:
            make_digits_detection(tmp, seed)
            try:
                os.rename(tmp, folder)
            except OSError:  # another process finished first: use its copy
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
