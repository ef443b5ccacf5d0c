"""Where training data comes from: ``--data`` (a folder, ``cifar10``, ``fashion-mnist`` or
``digits``) to a train/val pair of (PIL image, label) datasets with class names.

Transforms are not applied here; :class:`~mnv4.data.sampling.SeededDataset` adds them, so the
same datasets serve training, evaluation and the tests.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from ..errors import MNv4Error
from .folder import BadImage, SafeImageFolder, scan_classes

__all__ = ["DataBundle", "load_data", "collate_images", "BUILTIN_DATASETS", "DEBIAN_FASHION_MNIST"]

BUILTIN_DATASETS = ("digits", "cifar10", "fashion-mnist")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_VAL_DIRS = ("val", "validation", "valid", "test")


@dataclass
class DataBundle:
    name: str
    train: Dataset
    val: Dataset
    class_names: list[str]
    input_size: int | None  # natural training resolution; None = the model's own


def default_data_root() -> Path:
    return Path(os.environ.get("MNV4_DATA", Path.home() / ".cache" / "mnv4" / "data"))


def load_data(
    data: str | os.PathLike = "digits",
    root: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """Resolve ``data`` to datasets. A folder either holds ``train/`` and ``val/`` (class folders
    inside each) or class folders directly, which are then split by a seeded ``val_fraction``."""
    key = str(data).lower().replace("_", "-")
    root = Path(root) if root is not None else default_data_root()
    if key == "digits":
        from .digits import digits_split

        train, val = digits_split(val_fraction, seed)
        return DataBundle("digits", train, val, list(train.classes), 32)
    if key in ("cifar10", "cifar-10"):
        return _cifar10(root)
    if key in ("fashion-mnist", "fashionmnist"):
        return _fashion_mnist(root)
    path = Path(data)
    if not path.exists():
        raise MNv4Error(f"--data {data}: no such folder, and not one of {', '.join(BUILTIN_DATASETS)}")
    return _folder(path, val_fraction, seed)


def _folder(path: Path, val_fraction: float, seed: int) -> DataBundle:
    train_dir = path / "train"
    val_dir = next((path / d for d in _VAL_DIRS if (path / d).is_dir()), None)
    if train_dir.is_dir():
        if val_dir is None:
            train = SafeImageFolder(train_dir)
            tr, va = _split(train, val_fraction, seed)
            return DataBundle(path.name, tr, va, list(train.classes), None)
        train = SafeImageFolder(train_dir)
        val = SafeImageFolder(val_dir, classes=list(train.classes))
        return DataBundle(path.name, train, val, list(train.classes), None)
    scan_classes(path)  # one clear error for an empty or flat folder before anything else
    full = SafeImageFolder(path)
    tr, va = _split(full, val_fraction, seed)
    return DataBundle(path.name, tr, va, list(full.classes), None)


def _split(ds: SafeImageFolder, val_fraction: float, seed: int) -> tuple[Subset, Subset]:
    """Seeded split, stratified so that every class keeps at least one training image."""
    from sklearn.model_selection import train_test_split

    if not 0 < val_fraction < 1:
        raise MNv4Error(f"--val-split must be between 0 and 1, got {val_fraction}")
    targets = [t for _, t in ds.samples]
    idx = list(range(len(targets)))
    try:
        tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=targets)
    except ValueError:  # a class with a single image cannot be stratified
        tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed)
    return Subset(ds, sorted(tr)), Subset(ds, sorted(va))


class _PILDataset(Dataset):
    """torchvision's tensor-backed sets (CIFAR, MNIST) return PIL already; this just fixes the
    mode to RGB so every source looks the same to the transforms."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        self.classes = list(ds.classes)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        im, t = self.ds[i]
        return im.convert("RGB"), int(t)


def _cifar10(root: Path) -> DataBundle:
    from torchvision.datasets import CIFAR10

    try:
        train = CIFAR10(str(root), train=True, download=True)
        val = CIFAR10(str(root), train=False, download=True)
    except Exception as e:  # URLError, socket errors, corrupt archives: all mean "not available"
        raise MNv4Error(
            f"CIFAR-10 is not in {root} and could not be downloaded ({type(e).__name__}); "
            "run once with network access or pass --data PATH to an image folder"
        ) from None
    return DataBundle("cifar10", _PILDataset(train), _PILDataset(val), list(train.classes), 32)


def _fashion_mnist(root: Path) -> DataBundle:
    from torchvision.datasets import FashionMNIST

    raw = root / "FashionMNIST" / "raw"
    if DEBIAN_FASHION_MNIST.is_dir() and not any(raw.glob("*-ubyte")):
        # Debian's dataset-fashion-mnist ships the IDX files gzipped; torchvision reads them unpacked.
        raw.mkdir(parents=True, exist_ok=True)
        for gz in DEBIAN_FASHION_MNIST.glob("*.gz"):
            with gzip.open(gz, "rb") as src, open(raw / gz.name[:-3], "wb") as dst:
                shutil.copyfileobj(src, dst)
    try:
        train = FashionMNIST(str(root), train=True, download=True)
        val = FashionMNIST(str(root), train=False, download=True)
    except Exception as e:
        raise MNv4Error(
            f"Fashion-MNIST is not in {root} and could not be downloaded ({type(e).__name__}); "
            "install it offline with: apt-get install dataset-fashion-mnist"
        ) from None
    return DataBundle("fashion-mnist", _PILDataset(train), _PILDataset(val), list(train.classes), 32)


class BadImageLog:
    """Collects unreadable files reported by :func:`collate_images`; prints each path once."""

    def __init__(self, verbose: bool = True) -> None:
        self.paths: dict[str, str] = {}
        self.verbose = verbose

    def add(self, bad: list[BadImage]) -> None:
        for b in bad:
            if b.path not in self.paths:
                self.paths[b.path] = b.reason
                if self.verbose:
                    print(f"skipping unreadable image {b.path}: {b.reason}", file=sys.stderr)

    def __len__(self) -> int:
        return len(self.paths)


def collate_images(batch: list[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor, list[BadImage]]:
    """Stack a batch, leaving out unreadable files (returned third, for reporting)."""
    good = [(x, y) for x, y in batch if not isinstance(x, BadImage)]
    bad = [x for x, _ in batch if isinstance(x, BadImage)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    xs, ys = zip(*good)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long), bad
