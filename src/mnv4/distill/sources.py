"""Where the images to label come from: ``data`` to a random-access list of images.

* a labelled folder: class sub-folders (``PATH/<class>/*.jpg``), or ``PATH/train/<class>/`` (train/ is used);
* an unlabelled folder: images directly in it (sub-folders are searched too, but no class folders);
* a ``.tar`` / ``.tar.gz`` / ``.tgz`` / ``.tar.bz2`` / ``.tar.xz`` archive of images (unlabelled); an
  uncompressed tar is read in place by offset, a compressed one is read into memory once;
* the built-in datasets (``digits``, ``cifar10``, ``fashion-mnist``): their training split, labelled.

Every image is read through :mod:`mnv4.data.images`, so an unreadable file is a :class:`BadImage` with
its path and reason, skipped and counted by the caller.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.images import BadImage, find_images, is_image_file, try_load_rgb
from ..errors import MNv4Error

__all__ = ["ImageSource", "open_source", "to_uint8", "ARCHIVE_SUFFIXES", "map_classes"]

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_WNID = re.compile(r"^n\d{8}$")


def to_uint8(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 [3, H, W]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


@dataclass
class ImageSource:
    """Images with stable ids (relative paths, archive members, built-in indices) and optional labels."""

    name: str
    kind: str  # folder | flat | archive | builtin
    location: str
    ids: list[str]
    labels: list[int] | None = None
    class_names: list[str] | None = None
    _reader: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def load(self, i: int) -> Image.Image | BadImage:
        return self._reader(i)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "location": self.location,
            "images": len(self),
            "labelled": self.labelled,
            "classes": len(self.class_names) if self.class_names else None,
        }


class _FileReader:
    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __call__(self, i: int) -> Image.Image | BadImage:
        return try_load_rgb(self.paths[i])


def _from_bytes(data: bytes | None, where: str) -> Image.Image | BadImage:
    if data is None:
        return BadImage(where, "cannot be read from the archive")
    res = try_load_rgb(io.BytesIO(data))
    return BadImage(where, res.reason) if isinstance(res, BadImage) else res


class _TarReader:
    """Random access into an uncompressed tar by member offsets (a file handle per process)."""

    def __init__(self, path: Path, entries: list[tuple[str, int, int]]) -> None:
        self.path, self.entries = path, entries
        self._fd: int | None = None
        self._pid = -1

    def __call__(self, i: int) -> Image.Image | BadImage:
        name, offset, size = self.entries[i]
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        try:
            data = os.pread(self._fd, size, offset)
        except OSError:
            data = None
        return _from_bytes(data if data is not None and len(data) == size else None, f"{self.path}::{name}")

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "entries": self.entries, "_fd": None, "_pid": -1}


class _MemoryReader:
    def __init__(self, path: Path, names: list[str], blobs: list[bytes | None]) -> None:
        self.path, self.names, self.blobs = path, names, blobs

    def __call__(self, i: int) -> Image.Image | BadImage:
        return _from_bytes(self.blobs[i], f"{self.path}::{self.names[i]}")


class _BuiltinReader:
    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __call__(self, i: int) -> Image.Image | BadImage:
        im, _ = self.ds[i]
        return im if isinstance(im, BadImage) else im.convert("RGB")


def _archive(path: Path) -> ImageSource:
    names, offsets, blobs = [], [], []
    compressed = not path.name.lower().endswith(".tar")
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                if not m.isfile() or not is_image_file(m.name) or Path(m.name).name.startswith("._"):
                    continue
                names.append(m.name)
                if compressed:
                    f = tar.extractfile(m)
                    blobs.append(f.read() if f is not None else None)
                else:
                    offsets.append((m.name, m.offset_data, m.size))
    except (tarfile.TarError, OSError, EOFError) as e:
        # tarfile lists every compression it tried, one per line: the first line says enough
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(":")
        raise MNv4Error(f"cannot read archive {path} ({first}); pass a .tar/.tar.gz of images, or a folder") from None
    if not names:
        raise MNv4Error(f"archive {path} holds no images ({', '.join(s for s in ('.jpg', '.png', '.webp'))}, ...)")
    order = sorted(range(len(names)), key=lambda i: names[i])  # stable ids whatever the archive order
    names = [names[i] for i in order]
    if compressed:
        reader: Any = _MemoryReader(path, names, [blobs[i] for i in order])
    else:
        reader = _TarReader(path, [offsets[i] for i in order])
    return ImageSource(path.name, "archive", str(path), names, None, None, reader)


def _folder(path: Path) -> ImageSource:
    root = path / "train" if (path / "train").is_dir() else path
    direct = [p for p in root.iterdir() if p.is_file() and is_image_file(p.name)]
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if direct or not class_dirs:
        files = find_images([root])
        if not files:
            raise MNv4Error(f"{path} contains no images; check the path")
        ids = [str(p.relative_to(root)) for p in files]
        return ImageSource(path.name, "flat", str(root), ids, None, None, _FileReader(files))
    from ..data.folder import scan_classes

    scan_classes(root)  # one clear error for empty class folders
    files, labels = [], []
    for c, d in enumerate(class_dirs):
        found = find_images([d])
        files += found
        labels += [c] * len(found)
    ids = [str(p.relative_to(root)) for p in files]
    names = [d.name for d in class_dirs]
    return ImageSource(path.name, "folder", str(root), ids, labels, names, _FileReader(files))


def open_source(data: str | os.PathLike, data_root: str | os.PathLike | None = None) -> ImageSource:
    """Resolve ``data`` (see the module docstring) to an :class:`ImageSource`."""
    from ..data.datasets import BUILTIN_DATASETS, load_data

    key = str(data).lower().replace("_", "-")
    path = Path(data)
    if key in BUILTIN_DATASETS or key == "cifar-10" or key == "fashionmnist":
        bundle = load_data(key, data_root)
        train = bundle.train
        labels = _builtin_labels(train)
        ids = [f"{bundle.name}:train:{i}" for i in range(len(train))]
        return ImageSource(
            bundle.name, "builtin", bundle.name, ids, labels, list(bundle.class_names), _BuiltinReader(train)
        )
    if not path.exists():
        raise MNv4Error(f"`data` {data}: no such folder or archive, and not one of {', '.join(BUILTIN_DATASETS)}")
    if path.is_file():
        if not path.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise MNv4Error(f"`data` {data} is a file but not an archive ({', '.join(ARCHIVE_SUFFIXES)})")
        return _archive(path)
    return _folder(path)


def _builtin_labels(ds: Any) -> list[int]:
    # the built-in sets keep their targets; avoid decoding every image for them
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = getattr(getattr(ds, "ds", None), "targets", None)
    if targets is not None:
        return [int(t) for t in targets]
    return [int(ds[i][1]) for i in range(len(ds))]


def map_classes(source_names: list[str], teacher_names: list[str] | None, num_classes: int) -> tuple[list[int], str]:
    """Teacher class index for each source class, and how they were matched; raises when they cannot be.

    Matched by name (a teacher fine-tuned on this folder stores its class names), by ImageNet WordNet id
    (folders ``n01440764`` ... against a 1000-class teacher, in the standard sorted-wnid order), or by
    position when neither side has usable names and the counts agree.
    """
    if teacher_names:
        index = {n: i for i, n in enumerate(teacher_names)}
        if all(n in index for n in source_names):
            return [index[n] for n in source_names], "by class name"
    if num_classes == 1000 and source_names and all(_WNID.match(n) for n in source_names):
        from .wnids import imagenet_wnids

        order = {w: i for i, w in enumerate(imagenet_wnids())}
        unknown = [n for n in source_names if n not in order]
        if unknown:
            raise MNv4Error(f"class folders {', '.join(unknown[:3])} are not ImageNet-1k WordNet ids")
        return [order[n] for n in source_names], "by ImageNet WordNet id"
    if teacher_names is None and len(source_names) == num_classes:
        return list(range(num_classes)), "by position (the teacher has no class names)"
    raise MNv4Error(
        f"the data's {len(source_names)} classes ({', '.join(source_names[:3])}, ...) do not map onto the "
        f"teacher's {num_classes} classes by name or WordNet id"
    )
