"""Image folders (one sub-folder per class) that survive real-world files.

Images are read by the one loader of :mod:`mnv4.data.images`. Unreadable, truncated or oversized
files are not fatal: loading returns a :class:`BadImage` marker that the collate function drops and
reports, so one broken JPEG in a 100k-image folder costs one sample, not the run. Structural
problems (empty classes, no images, val classes unknown to train) are
caught before training starts, with one error naming them.
"""

from __future__ import annotations

import os
from pathlib import Path

from torchvision.datasets import ImageFolder

from ..errors import MNv4Error
from .images import IMAGE_SUFFIXES, BadImage, ImageReadError, is_image_file, load_rgb

__all__ = ["BadImage", "SafeImageFolder", "scan_classes"]


def _is_image(name: str) -> bool:
    return is_image_file(name)


def scan_classes(root: str | os.PathLike) -> dict[str, int]:
    """Class folder -> number of image files; raises one error for a missing/empty tree."""
    root = Path(root)
    if not root.is_dir():
        raise MNv4Error(f"no such data folder: {root}")
    counts = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        counts[d.name] = sum(1 for _, _, files in os.walk(d, followlinks=True) for f in files if _is_image(f))
    if not counts:
        raise MNv4Error(f"{root} has no class sub-folders; put each class's images in {root}/<class name>/")
    if not any(counts.values()):
        raise MNv4Error(f"{root} contains no images ({', '.join(IMAGE_SUFFIXES)}); check the path")
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        shown = ", ".join(empty[:5]) + (f" (+{len(empty) - 5} more)" if len(empty) > 5 else "")
        raise MNv4Error(f"{root}: class folder(s) without images: {shown}; add images or remove the folders")
    return counts


class SafeImageFolder(ImageFolder):
    """torchvision's ImageFolder with a fixed class list (so val indices match train's) and
    unreadable files returned as :class:`BadImage` instead of raising."""

    def __init__(self, root: str | os.PathLike, classes: list[str] | None = None) -> None:
        self._fixed_classes = classes
        super().__init__(str(root), loader=load_rgb, is_valid_file=_is_image)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        present = sorted(scan_classes(directory))
        if self._fixed_classes is None:
            return present, {c: i for i, c in enumerate(present)}
        unknown = [c for c in present if c not in self._fixed_classes]
        if unknown:
            raise MNv4Error(
                f"{directory} has classes the training set lacks: {', '.join(unknown[:5])}; "
                "give val/ the same class folders as train/"
            )
        mapping = {c: i for i, c in enumerate(self._fixed_classes)}
        return list(self._fixed_classes), {c: mapping[c] for c in present}

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
        except ImageReadError as e:
            return BadImage(e.path, e.reason), target
        if self.transform is not None:
            sample = self.transform(sample)
        return sample, target
