"""Sampling that makes runs reproducible across restarts, workers and process counts.

Two ideas carry it:

* Randomness per sample, not per worker: :class:`SeededDataset` reseeds torch's RNG from
  (seed, epoch, index) before augmenting a sample, so an image gets the same crop whether it is
  loaded by worker 0 or 3, in the first run or after a resume.
* Sharding per global batch: :class:`GlobalBatchSampler` cuts each epoch's permutation into global
  batches and hands rank r its consecutive slice of every one. One process accumulating k
  micro-batches therefore sees exactly the micro-batches k DDP processes see, and a resume can
  skip whole global batches to continue where the run stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import InvalidValue

__all__ = ["GlobalBatchKeys", "GlobalBatchSampler", "SeededDataset", "parse_mix", "sample_seed"]


def sample_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (nearby keys give unrelated streams)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def parse_mix(mix: str | Sequence[float] | None, count: int) -> list[int]:
    """``"1:1:2"`` (or numbers) -> integer ratios, one per mixed dataset (distillation's dynamic mixing,
    docs/distillation.md); None: equal shares."""
    if mix is None or mix == "":
        return [1] * count
    parts = mix.split(":") if isinstance(mix, str) else list(mix)
    try:
        fracs = [Fraction(str(p).strip()).limit_denominator(1000) for p in parts]
    except (ValueError, ZeroDivisionError):
        raise InvalidValue("mix", mix, "must be positive numbers separated by ':', e.g. 1:1:2") from None
    if any(f <= 0 for f in fracs):
        raise InvalidValue("mix", mix, "every share must be positive")
    if len(fracs) != count:
        raise InvalidValue("mix", mix, f"give one share per soft-label dataset ({count})")
    lcm = int(np.lcm.reduce([f.denominator for f in fracs]))
    ints = [int(f * lcm) for f in fracs]
    g = int(np.gcd.reduce(ints))
    return [i // g for i in ints]


class SeededDataset(Dataset):
    """Applies ``transform`` to ``dataset[i]``'s image under a seed derived from (seed, epoch, i).

    Indexed by ``(epoch, i)`` pairs, which :class:`GlobalBatchSampler` yields; a plain int index
    means epoch 0 (evaluation, where transforms are deterministic anyway).
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any] | None, seed: int = 0) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        image, target = self.dataset[i]
        if self.transform is None or not _is_image(image):
            return image, target
        # fork_rng keeps this from disturbing the caller's RNG when loading in the main process;
        # seeding the CPU generator directly, since torch.manual_seed also queues a CUDA seed
        # (with a stack trace) on CUDA builds, which costs ~1 ms per sample.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, i))
            return self.transform(image), target


def _is_image(x: Any) -> bool:
    from .folder import BadImage

    return not isinstance(x, BadImage)


class GlobalBatchKeys(Sampler):
    """Base of the samplers that shard per global batch: a subclass says which keys global batch ``b`` of
    ``epoch`` holds (:meth:`global_batch_keys`); this yields this rank's consecutive slice of each.

    ``start_batch`` skips that many global batches of the current epoch (resume mid-epoch).
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int = 0, world_size: int = 1) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * (self.global_batch // self.world_size)

    def global_batch_keys(self, epoch: int, b: int) -> list:
        raise NotImplementedError

    def __iter__(self) -> Iterator:
        share = self.global_batch // self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            yield from self.global_batch_keys(self.epoch, b)[self.rank * share : (self.rank + 1) * share]


class GlobalBatchSampler(GlobalBatchKeys):
    """Yields ``(epoch, index)`` for this rank's share of each full global batch, in order.

    ``global_batch = world_size * accumulation * micro_batch``; the last partial global batch of an
    epoch is dropped so every optimizer step sees the same number of samples.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(num_samples, global_batch, rank, world_size)
        self.shuffle = shuffle
        self.seed = seed
        self._order: tuple[int, list[int]] | None = None

    def global_batch_keys(self, epoch: int, b: int) -> list[tuple[int, int]]:
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, 0x5A3))
                order = torch.randperm(self.num_samples, generator=g).tolist()
            else:
                order = list(range(self.num_samples))
            self._order = (epoch, order)
        order = self._order[1]
        return [(epoch, i) for i in order[b * self.global_batch : (b + 1) * self.global_batch]]
