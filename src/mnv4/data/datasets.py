"""Where training data comes from: ``data`` (a folder, ``cifar10``, ``fashion-mnist`` or
``digits``) to a train/val pair of (PIL image, label) datasets with class names.

Transforms are not applied here; :class:`~mnv4.data.sampling.SeededDataset` adds them, so the
same datasets serve training, evaluation and the tests.
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from ..errors import MNv4Error, check_float
from ..files import atomic_write
from .folder import SafeImageFolder, scan_classes
from .images import BadImage, BadImageLog

__all__ = [
    "DataBundle",
    "load_data",
    "collate_images",
    "align_classes",
    "Relabelled",
    "BadImageLog",
    "BUILTIN_DATASETS",
    "DEBIAN_FASHION_MNIST",
]

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
        raise MNv4Error(f"`data` {data}: no such folder, and not one of {', '.join(BUILTIN_DATASETS)}")
    return _folder(path, val_fraction, seed)


def _folder(path: Path, val_fraction: float, seed: int) -> DataBundle:
    train_dir = path / "train"
    val_dir = next((path / d for d in _VAL_DIRS if (path / d).is_dir()), None)
    if train_dir.is_dir():
        train = SafeImageFolder(train_dir)
        size = small_image_size(train.samples)
        if val_dir is None:
            tr, va = _split(train, val_fraction, seed)
            return DataBundle(path.name, tr, va, list(train.classes), size)
        val = SafeImageFolder(val_dir, classes=list(train.classes))
        return DataBundle(path.name, train, val, list(train.classes), size)
    scan_classes(path)  # one clear error for an empty or flat folder before anything else
    full = SafeImageFolder(path)
    tr, va = _split(full, val_fraction, seed)
    return DataBundle(path.name, tr, va, list(full.classes), small_image_size(full.samples))


SMALL_IMAGES = 64  # px: a folder of images no larger than this trains at their own size, as CIFAR does


def small_image_size(samples: list[tuple[str, int]], probes: int = 16) -> int | None:
    """The natural resolution of a folder of small images (the median longer side of a spread of ``probes``
    files, rounded up to a multiple of 8), or None when they are larger than :data:`SMALL_IMAGES` px: such
    images upscaled to a model's 224 px would cost ~50x the compute for no detail (what `--recipe
    small-photos` is for). Only the file headers are read."""
    from PIL import Image

    n = len(samples)
    idx = range(n) if n <= probes else sorted({round(i * (n - 1) / (probes - 1)) for i in range(probes)})
    sides = []
    for i in idx:
        try:
            with Image.open(samples[i][0]) as im:
                sides.append(max(im.size))
        except Exception:  # unreadable files are the loader's business
            continue
    if not sides or max(sides) > SMALL_IMAGES:
        return None
    median = sorted(sides)[len(sides) // 2]
    return max(16, -(-median // 8) * 8)


def _split(ds: SafeImageFolder, val_fraction: float, seed: int) -> tuple[Subset, Subset]:
    """Seeded split, stratified so that every class keeps at least one training image."""
    from sklearn.model_selection import train_test_split

    check_float("val_split", val_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
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
            "run once with network access or pass `data` as an image folder"
        ) from None
    return DataBundle("cifar10", _PILDataset(train), _PILDataset(val), list(train.classes), 32)


def _fashion_mnist(root: Path) -> DataBundle:
    from torchvision.datasets import FashionMNIST

    raw = root / "FashionMNIST" / "raw"
    if DEBIAN_FASHION_MNIST.is_dir() and not any(raw.glob("*-ubyte")):
        # Debian's dataset-fashion-mnist ships the IDX files gzipped; torchvision reads them unpacked.
        raw.mkdir(parents=True, exist_ok=True)
        for gz in DEBIAN_FASHION_MNIST.glob("*.gz"):

            def unpack(tmp: str, gz: Path = gz) -> None:
                with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)

            atomic_write(raw / gz.name[:-3], unpack)  # a half-unpacked file would pass for a whole one next time
    try:
        train = FashionMNIST(str(root), train=True, download=True)
        val = FashionMNIST(str(root), train=False, download=True)
    except Exception as e:
        raise MNv4Error(
            f"Fashion-MNIST is not in {root} and could not be downloaded ({type(e).__name__}); "
            "install it offline with: apt-get install dataset-fashion-mnist"
        ) from None
    return DataBundle("fashion-mnist", _PILDataset(train), _PILDataset(val), list(train.classes), 32)


def collate_images(batch: list[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor, list[BadImage]]:
    """Stack a batch, leaving out unreadable files (returned third, for reporting).

    Targets are int labels (stacked to ``[B]`` long) or probability vectors (stacked to ``[B, C]``)."""
    good = [(x, y) for x, y in batch if not isinstance(x, BadImage)]
    bad = [x for x, _ in batch if isinstance(x, BadImage)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    xs, ys = zip(*good)
    if isinstance(ys[0], torch.Tensor) and ys[0].dim() > 0:
        return torch.stack(xs), torch.stack(ys), bad
    return torch.stack(xs), torch.tensor([int(y) for y in ys], dtype=torch.long), bad


class Relabelled(Dataset):
    """A view of a labelled dataset whose labels follow another class order (a checkpoint's)."""

    def __init__(self, ds: Dataset, remap: list[int]) -> None:
        self.ds, self.remap = ds, remap

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.ds[i]
        return x, self.remap[y]


def align_classes(ds: Dataset, data_classes: list[str], model_classes: list[str] | None, num_classes: int) -> Dataset:
    """``ds`` with labels in the model's class order.

    With class names on both sides, labels are remapped by name (the folder may hold a subset, in
    any order); without, the class counts must match. Anything else is an error naming the problem.
    """
    if model_classes and list(model_classes) != list(data_classes):
        unknown = [c for c in data_classes if c not in model_classes]
        if unknown:
            raise MNv4Error(
                f"the data has classes the model was not trained on: {', '.join(unknown[:5])}; "
                "evaluate on the classes it knows"
            )
        return Relabelled(ds, [list(model_classes).index(c) for c in data_classes])
    if not model_classes and len(data_classes) != num_classes:
        raise MNv4Error(
            f"the model has {num_classes} classes but the data has {len(data_classes)}; "
            "evaluate on the dataset it was trained on"
        )
    return ds
