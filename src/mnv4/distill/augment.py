"""The augmentation policies of the paper's teacher datasets applied (docs/distillation.md, "Datasets").

A policy (the table in :mod:`mnv4.distill.policies`) turns a source image into the image that one
record holds, at the record resolution.

No flip: the student flips, and the teacher's label holds for the flipped image as well.

Everything random is drawn from generators seeded by (seed, replica, image index), so a record is
the same whichever worker makes it, in the first run or after a resume.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from .policies import POLICIES, RANDAUG_FILL, AugPolicy, get_policy

__all__ = ["AugPolicy", "POLICIES", "get_policy", "inception_crop_box", "augment", "mixing_partner", "randaug_bin"]


def randaug_bin(level: float) -> int:
    """TF level (0-10 scale) -> torchvision RandAugment bin (31 bins), as in docs/training.md "Recipes": torchvision's
    top bin reaches TF's level-10 ranges, so level m is bin 3m, capped at 30."""
    return max(0, min(30, round(3 * level)))


def inception_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of an Inception-style crop: a random area fraction in ``scale`` and a
    log-uniform aspect ratio in ``ratio``; after ``attempts`` misses, the largest centred box whose aspect
    ratio lies within ``ratio``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _whole(image: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size``, centre crop: the un-augmented view."""
    x = TF.resize(image, [size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(x, [size, size])


def _crop(image: torch.Tensor, size: int, policy: AugPolicy, rng: np.random.Generator) -> tuple[torch.Tensor, list]:
    if not policy.crop:
        return _whole(image, size), []
    top, left, h, w = inception_crop_box(image.shape[-2], image.shape[-1], rng, policy.crop_scale, policy.crop_ratio)
    out = TF.resized_crop(image, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
    return out, [top, left, h, w]


def augment(
    policy: AugPolicy,
    image: torch.Tensor,
    size: int,
    seed: int,
    partner: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One record's image (uint8 [3, size, size]) from ``image`` (uint8 [3, H, W]) and its parameters.

    ``partner`` is the mixing partner's image for a mixup policy (chosen by the caller with
    :func:`mixing_partner`). RandAugment draws from torch's RNG, forked and seeded from ``seed``, so the
    caller's RNG is untouched.
    """
    rng = np.random.default_rng(seed)
    out, box = _crop(image, size, policy, rng)
    params: dict[str, Any] = {"crop": box} if box else {}
    if policy.mixup_alpha > 0:
        if partner is None:
            raise ValueError(f"policy {policy.name} mixes two images; pass the partner")
        other, other_box = _crop(partner, size, policy, rng)
        lam = float(rng.beta(policy.mixup_alpha, policy.mixup_alpha))
        mixed = lam * out.float() + (1.0 - lam) * other.float()
        out = mixed.round_().clamp_(0, 255).to(torch.uint8)
        params.update(lam=round(lam, 6), partner_crop=other_box)
    if policy.randaug_layers > 0:
        ra = _randaugment(policy.randaug_layers, randaug_bin(policy.randaug_magnitude))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(rng.integers(0, 2**63 - 1)))
            out = ra(out)
    return out.contiguous(), params


@functools.cache
def _randaugment(layers: int, magnitude_bin: int) -> T.RandAugment:
    """One RandAugment per setting (it holds no state between calls), not one per record."""
    return T.RandAugment(layers, magnitude_bin, fill=RANDAUG_FILL)


def mixing_partner(index: int, num_images: int, seed: int) -> int:
    """The partner of image ``index`` for a mixup record: another image, seeded by the record."""
    if num_images < 2:
        raise ValueError("mixup needs at least two images")
    j = int(np.random.default_rng([seed, 0x9A7]).integers(0, num_images - 1))
    return j + 1 if j >= index else j
