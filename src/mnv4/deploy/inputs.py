"""Sample inputs for parity checks and INT8 calibration: image folders, or seeded noise.

Images are read with :mod:`mnv4.data.images`, the loader every mnv4 command uses: any PIL mode
becomes RGB, and a file that cannot be read is skipped, named with its reason and counted (the
parity report carries the count), never the end of an export.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..data.images import BadImage, BadImageLog, find_images, try_load_rgb
from ..errors import MNv4Error

if TYPE_CHECKING:
    from ..models.registry import Preprocess

__all__ = ["ImageSet", "load_images", "random_inputs"]


@dataclass
class ImageSet:
    images: torch.Tensor  # [N, 3, R, R], preprocessed like the model's eval transform
    labels: np.ndarray | None  # class indices when the folder is ImageFolder-style
    class_names: list[str] | None
    unreadable: list[BadImage] = field(default_factory=list)  # skipped files, with the reason


def _label_map(class_dirs: list[str], model_classes: list[str] | None) -> dict[str, int] | None:
    if model_classes:
        lookup = {c: i for i, c in enumerate(model_classes)}
        if all(c in lookup for c in class_dirs):
            return {c: lookup[c] for c in class_dirs}
        return None  # the folder's classes are not the model's: no accuracy, agreement only
    return {c: i for i, c in enumerate(class_dirs)}


def _candidates(root: Path, seed: int) -> tuple[list[tuple[Path, str | None]], list[str]]:
    """(file, class) in reading order: round-robin over the class folders, or the flat folder."""
    class_dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        return [(p, None) for p in find_images([root], recursive=False)], []
    per_class = [find_images([root / c]) for c in class_dirs]
    rng = random.Random(seed)
    for paths in per_class:
        rng.shuffle(paths)
    files: list[tuple[Path, str | None]] = []
    # Round-robin over classes so a small limit still sees every class.
    for i in range(max((len(p) for p in per_class), default=0)):
        files += [(paths[i], c) for c, paths in zip(class_dirs, per_class) if i < len(paths)]
    return files, class_dirs


def load_images(
    root: str | os.PathLike,
    preprocess: Preprocess,
    input_size: int | None = None,
    limit: int | None = 256,
    seed: int = 0,
    model_classes: list[str] | None = None,
    bad_log: BadImageLog | None = None,
    progress: bool | None = False,
    what: str = "image",
) -> ImageSet:
    """Load up to ``limit`` readable images from ``root`` (flat, or one sub-folder per class), spread
    evenly over the classes, preprocessed with ``preprocess`` (a :class:`mnv4.models.registry.Preprocess`).

    Unreadable files are skipped (and reported to ``bad_log``); the next file takes their place.
    ``what`` names the folder's role in error messages (``calibration``, ``evaluation``).
    """
    from tqdm import tqdm

    from ..data.transforms import eval_transform

    root = Path(root)
    if root.is_file():
        raise MNv4Error(f"the {what} folder {root} is a file; pass the folder that holds the images")
    if not root.is_dir():
        raise MNv4Error(f"{what} folder not found: {root}")
    files, class_dirs = _candidates(root, seed)
    if not files:
        from ..data.images import IMAGE_SUFFIXES

        raise MNv4Error(
            f"no images found in the {what} folder {root} (looked for {', '.join(IMAGE_SUFFIXES)} files, "
            "directly in it or one folder per class); give a folder of images"
        )
    tf = eval_transform(preprocess, input_size=input_size)
    log = bad_log if bad_log is not None else BadImageLog(verbose=False)
    tensors, classes, unreadable = [], [], []
    total = min(limit, len(files)) if limit is not None else len(files)
    bar = tqdm(total=total, desc=f"{what} images", unit="img", disable=None if progress is None else not progress)
    with bar:
        for path, c in files:
            if limit is not None and len(tensors) >= limit:
                break
            im = try_load_rgb(path)
            if isinstance(im, BadImage):
                log.add(im)
                unreadable.append(im)
                continue
            tensors.append(tf(im))
            classes.append(c)
            bar.update(1)
    if not tensors:
        first = f" (e.g. {unreadable[0].path}: {unreadable[0].reason})" if unreadable else ""
        raise MNv4Error(f"none of the {len(unreadable)} image files in {root} could be read{first}")
    labels = None
    mapping = _label_map(class_dirs, model_classes) if class_dirs else None
    if mapping is not None:
        labels = np.array([mapping[c] for c in classes], dtype=np.int64)
    return ImageSet(torch.stack(tensors), labels, class_dirs or None, unreadable)


def random_inputs(n: int, input_size: int, in_chans: int = 3, seed: int = 0) -> torch.Tensor:
    """Seeded standard-normal inputs (what normalised images look like to the network, roughly)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, in_chans, input_size, input_size, generator=g)
