"""The student's side of the offline recipe: soft-label datasets, read back and mixed by ratio.

* :class:`SoftLabelSet` opens one labelled folder (``manifest.json`` + shards) for random access.
* :class:`MixingSampler` builds each global batch from several sets in fixed proportions (``1:1:2``):
  global batch ``b`` holds ``floor(b*B*c_k/R) - floor(b*B*c_(k-1)/R)``-style shares, so every batch is
  within one sample of the ratio per set and the run is exact over time; inside a set, samples follow a
  seeded permutation per pass over that set. Everything is a function of (seed, batch index), so a
  resumed run draws exactly the batches the uninterrupted run would have, and DDP ranks take
  consecutive slices of each global batch like :class:`~mnv4.data.sampling.GlobalBatchSampler`.
* :class:`MixedSoftLabels` turns a key ``(set, pass, index)`` into the student's input (the stored
  JPEG decoded, resized to the student's resolution, flipped at random, normalised) and the teacher's
  probabilities; the flip is seeded by the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.sampling import GlobalBatchKeys, parse_mix, sample_seed
from ..errors import MNv4Error
from ..files import file_sha256
from .jpeg import decode_jpeg
from .labelling import CONFIG, FORMAT, MANIFEST
from .shards import ShardIndex, decode_probs
from .teachers import normalize, resize_uint8

__all__ = [
    "SoftLabelSet",
    "MixingSampler",
    "MixedSoftLabels",
    "StudentView",
    "parse_mix",
    "check_compatible",
]


class SoftLabelSet:
    """One finished labelling folder: ``len``, ``jpeg(i)``, ``image(i)`` (uint8 [3, S, S]), ``probs(i)``."""

    def __init__(self, folder: str | os.PathLike, verify: bool = False) -> None:
        self.folder = Path(folder)
        mpath = self.folder / MANIFEST
        if not mpath.is_file():
            if (self.folder / CONFIG).is_file():
                raise MNv4Error(f"{self.folder}: labelling is not finished (no {MANIFEST}); run it again to finish")
            if not self.folder.is_dir():
                raise MNv4Error(f"no such soft-label dataset folder: {self.folder}")
            raise MNv4Error(
                f"{self.folder} is not a soft-label dataset (no {MANIFEST}); make one with `mnv4 distill label`"
            )
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except ValueError as e:
            raise MNv4Error(f"{mpath} is not valid JSON ({e}); label the folder again") from None
        if self.manifest.get("format") != FORMAT:
            raise MNv4Error(f"{mpath} is not an mnv4 soft-label manifest (format {self.manifest.get('format')!r})")
        self.num_classes = int(self.manifest["num_classes"])
        names = self.manifest.get("class_names")
        self.class_names: list[str] | None = list(names) if names else None
        self.image_size = int(self.manifest["image_size"])
        shards = self.manifest["shards"]
        paths = [self.folder / s["name"] for s in shards]
        for s, p in zip(shards, paths):
            if not p.is_file():
                raise MNv4Error(f"{self.folder}: shard {s['name']} is missing; label the folder again")
            if p.stat().st_size != s["bytes"]:
                raise MNv4Error(f"{p}: {p.stat().st_size} bytes, the manifest says {s['bytes']}; label it again")
            if verify:
                if file_sha256(p) != s["sha256"]:
                    raise MNv4Error(f"{p}: checksum differs from the manifest; label it again")
        self.index = ShardIndex(paths)
        if len(self.index) != int(self.manifest["records"]):
            raise MNv4Error(
                f"{self.folder}: the shards hold {len(self.index)} records, the manifest says "
                f"{self.manifest['records']}; label the folder again"
            )
        if len(self.index) == 0:
            raise MNv4Error(f"{self.folder} holds no records")

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def teacher(self) -> dict[str, Any]:
        return dict(self.manifest.get("teacher") or {})

    def __len__(self) -> int:
        return len(self.index)

    def jpeg(self, i: int) -> bytes:
        return self.index.jpeg(i)

    def image(self, i: int) -> torch.Tensor:
        return decode_jpeg(self.index.jpeg(i))

    def probs(self, i: int) -> torch.Tensor:
        return torch.from_numpy(decode_probs(self.index.probs(i), self.num_classes))

    def meta(self, i: int) -> dict[str, Any]:
        return self.index.meta(i)


def check_compatible(sets: Sequence[SoftLabelSet]) -> tuple[int, list[str] | None]:
    """(num_classes, class_names) shared by all ``sets``; one error naming the first that disagrees."""
    first = sets[0]
    for other in sets[1:]:
        if other.num_classes != first.num_classes:
            raise MNv4Error(
                f"soft-label datasets disagree on the number of classes: {first.folder} has {first.num_classes}, "
                f"{other.folder} has {other.num_classes}; mix datasets labelled by teachers with the same classes"
            )
        if first.class_names and other.class_names and first.class_names != other.class_names:
            raise MNv4Error(
                f"soft-label datasets disagree on the class names: {first.folder} and {other.folder}; "
                "mix datasets labelled by teachers with the same classes in the same order"
            )
    names = next((s.class_names for s in sets if s.class_names), None)
    return first.num_classes, names


class MixingSampler(GlobalBatchKeys):
    """Yields ``(set, pass, index)`` keys: this rank's slice of each global batch, mixed by ``ratios``.

    ``epoch_size`` (default: the sets' total size) only decides how many global batches an "epoch" has;
    sets are consumed at their own pace (a set with a large share is passed over more often).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        ratios: Sequence[int],
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch_size: int | None = None,
    ) -> None:
        if len(sizes) != len(ratios) or not sizes:
            raise ValueError("one ratio per dataset")
        if any(n <= 0 for n in sizes):
            raise ValueError("every dataset needs records")
        super().__init__(int(epoch_size or sum(sizes)), global_batch, rank, world_size)
        self.sizes = [int(n) for n in sizes]
        self.ratios = [int(r) for r in ratios]
        self.total_ratio = sum(self.ratios)
        self.prefix = np.cumsum([0, *self.ratios]).tolist()
        self.seed = seed
        self._perms: dict[tuple[int, int], list[int]] = {}

    def consumed(self, batch: int) -> list[int]:
        """Samples drawn from each set before global batch ``batch`` (counted from the run's start)."""
        b, big_r = batch * self.global_batch, self.total_ratio
        bounds = [(b * c) // big_r for c in self.prefix]
        return [bounds[k + 1] - bounds[k] for k in range(len(self.sizes))]

    def counts(self, batch: int) -> list[int]:
        return [b - a for a, b in zip(self.consumed(batch), self.consumed(batch + 1))]

    def _perm(self, k: int, p: int) -> list[int]:
        key = (k, p)
        perm = self._perms.get(key)
        if perm is None:
            if len(self._perms) > 4 * len(self.sizes):
                self._perms.clear()
            g = torch.Generator().manual_seed(sample_seed(self.seed, k, p, 0x313))
            perm = self._perms[key] = torch.randperm(self.sizes[k], generator=g).tolist()
        return perm

    def batch_keys(self, batch: int) -> list[tuple[int, int, int]]:
        """All keys of global batch ``batch`` (counted from the run's start; every rank's), in the order
        ranks slice them."""
        keys = []
        for k, (lo, hi) in enumerate(zip(self.consumed(batch), self.consumed(batch + 1))):
            n = self.sizes[k]
            for pos in range(lo, hi):
                p, r = divmod(pos, n)
                keys.append((k, p, self._perm(k, p)[r]))
        # Shuffle within the batch so that no rank or micro-batch is all one dataset (BatchNorm statistics).
        g = torch.Generator().manual_seed(sample_seed(self.seed, batch, 0xB7C))
        order = torch.randperm(len(keys), generator=g).tolist()
        return [keys[i] for i in order]

    def global_batch_keys(self, epoch: int, b: int) -> list[tuple[int, int, int]]:
        return self.batch_keys(epoch * self.batches_per_epoch + b)


@dataclass(frozen=True)
class StudentView:
    """What the student sees of a record: its resolution, normalisation and the only augmentation, a flip."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    hflip: float = 0.5

    def __call__(self, image: torch.Tensor, flip: bool) -> torch.Tensor:
        x = resize_uint8(image, self.input_size, self.interpolation)
        if flip:
            x = x.flip(-1)
        return normalize(x, self.mean, self.std)


class MixedSoftLabels(Dataset):
    """Key ``(set, pass, index)`` -> (student input float [3, s, s], teacher probabilities float [C])."""

    def __init__(self, sets: Sequence[SoftLabelSet], view: StudentView, seed: int = 0) -> None:
        self.sets = list(sets)
        self.num_classes, self.class_names = check_compatible(self.sets)
        self.view, self.seed = view, seed

    def __len__(self) -> int:
        return sum(len(s) for s in self.sets)

    def __getitem__(self, key: tuple[int, int, int] | int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(key, int):  # plain index: concatenation order, pass 0
            k = 0
            while key >= len(self.sets[k]):
                key -= len(self.sets[k])
                k += 1
            key = (k, 0, key)
        k, p, i = key
        s = self.sets[k]
        flip = self.view.hflip > 0 and np.random.default_rng(sample_seed(self.seed, k, p, i, 0xF11)).random() < (
            self.view.hflip
        )
        return self.view(s.image(i), flip), s.probs(i)
