"""Sample inputs for parity checks and INT8 calibration: image folders, or seeded noise."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MNv4Error

__all__ = ["ImageSet", "load_images", "random_inputs"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass
class ImageSet:
    images: torch.Tensor  # [N, 3, R, R], preprocessed like the model's eval transform
    labels: np.ndarray | None  # class indices when the folder is ImageFolder-style
    class_names: list[str] | None


def _label_map(class_dirs: list[str], model_classes: list[str] | None) -> dict[str, int] | None:
    if model_classes:
        lookup = {c: i for i, c in enumerate(model_classes)}
        if all(c in lookup for c in class_dirs):
            return {c: lookup[c] for c in class_dirs}
        return None  # the folder's classes are not the model's: no accuracy, agreement only
    return {c: i for i, c in enumerate(class_dirs)}


def load_images(
    root: str | os.PathLike,
    preprocess,
    resolution: int | None = None,
    limit: int | None = 256,
    seed: int = 0,
    model_classes: list[str] | None = None,
) -> ImageSet:
    """Load up to ``limit`` images from ``root`` (flat, or one sub-folder per class), spread evenly
    over the classes, preprocessed with ``preprocess`` (a :class:`mnv4.models.registry.Preprocess`)."""
    from PIL import Image

    from ..data.transforms import eval_transform

    root = Path(root)
    if not root.is_dir():
        raise MNv4Error(f"calibration folder not found: {root}")
    class_dirs = sorted(d.name for d in root.iterdir() if d.is_dir())
    files: list[tuple[Path, str | None]] = []
    if class_dirs:
        per_class = [sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) for c in class_dirs]
        rng = random.Random(seed)
        for paths in per_class:
            rng.shuffle(paths)
        # Round-robin over classes so a small limit still sees every class.
        for i in range(max((len(p) for p in per_class), default=0)):
            files += [(paths[i], c) for c, paths in zip(class_dirs, per_class) if i < len(paths)]
    else:
        files = [(p, None) for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if limit is not None:
        files = files[:limit]
    if not files:
        raise MNv4Error(f"no images found in {root}")
    tf = eval_transform(preprocess, input_size=resolution)
    tensors = []
    for path, _ in files:
        with Image.open(path) as im:
            tensors.append(tf(im))
    labels = None
    mapping = _label_map(class_dirs, model_classes) if class_dirs else None
    if mapping is not None:
        labels = np.array([mapping[c] for _, c in files], dtype=np.int64)
    return ImageSet(torch.stack(tensors), labels, class_dirs or None)


def random_inputs(n: int, resolution: int, in_chans: int = 3, seed: int = 0) -> torch.Tensor:
    """Seeded standard-normal inputs (what normalised images look like to the network, roughly)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, in_chans, resolution, resolution, generator=g)
