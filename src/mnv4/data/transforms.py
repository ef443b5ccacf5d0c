"""Image transforms built on torchvision transforms v2."""

from __future__ import annotations

import math

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from ..errors import check_input_size
from ..models.registry import Preprocess

__all__ = ["eval_transform", "interpolation_mode", "train_transform", "batch_mix"]


def interpolation_mode(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        raise ValueError(f"unknown interpolation {name!r}; use bicubic, bilinear or nearest") from None


def eval_transform(pp: Preprocess, input_size: int | None = None, crop_pct: float | None = None) -> T.Compose:
    """PIL image / uint8 tensor -> normalised float tensor, as the weights were evaluated (timm-style
    resize of the shorter side to ``size / crop_pct``, then a centre crop of ``size``)."""
    if input_size is not None:
        check_input_size(input_size)  # an override from a user: a typo must not become an OOM kill
    size = input_size or pp.input_size
    crop = crop_pct or pp.crop_pct
    interp = interpolation_mode(pp.interpolation)
    resize = T.Resize(math.floor(size / crop), interpolation=interp, antialias=True)
    if crop >= 1.0:
        resize = T.Resize((size, size), interpolation=interp, antialias=True)
    return T.Compose(
        [
            T.ToImage(),
            T.RGB(),
            resize,
            T.CenterCrop(size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(pp.mean, pp.std),
        ]
    )


def train_transform(
    pp: Preprocess,
    input_size: int | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    randaug_prob: float = 0.0,
    randaug_layers: int = 2,
    randaug_magnitude: float = 9,
) -> T.Compose:
    """The paper's training augmentation (docs/training.md): Inception-style random resized crop,
    horizontal flip, RandAugment applied with probability ``randaug_prob``, then normalisation.

    ``randaug_magnitude`` is on the TF / timm 0-10 level scale that the paper and configs use
    (9, 15). torchvision's RandAugment spreads 31 bins over the same ranges that TF reaches at
    level 10 (rotate 30 deg, shear 0.3, enhance 1 +- 0.9), so level m maps to bin 3m; levels above
    10 (the configs' 15) are capped at bin 30, TF level 10, because torchvision has no larger values.
    torchvision's op set has no Cutout, which the TF configs exclude anyway.
    """
    size = input_size or pp.input_size
    interp = interpolation_mode(pp.interpolation)
    ops: list = [T.ToImage(), T.RGB(), T.RandomResizedCrop(size, scale=scale, interpolation=interp, antialias=True)]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    if randaug_prob > 0 and randaug_layers > 0:
        tv_magnitude = max(0, min(30, round(3 * randaug_magnitude)))
        # On uint8 images (its colour ops assume that range), so before ToDtype; nearest resampling
        # for its geometric ops as in TF's RandAugment (tensor images have no bicubic affine anyway).
        ops.append(T.RandomApply([T.RandAugment(randaug_layers, tv_magnitude)], randaug_prob))
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(pp.mean, pp.std)]
    return T.Compose(ops)


def batch_mix(
    num_classes: int,
    prob: float = 0.0,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
) -> T.Transform | None:
    """Mixup or CutMix on a batch (images, int labels) -> (images, soft labels), applied with
    probability ``prob``; when both are enabled CutMix is chosen with ``switch_prob``. None when off.
    Batches left unmixed keep int labels; cross-entropy (with label smoothing) takes both forms."""
    choices, weights = [], []
    if mixup_alpha > 0:
        choices.append(T.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        weights.append(1.0 - switch_prob if cutmix_alpha > 0 else 1.0)
    if cutmix_alpha > 0:
        choices.append(T.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        weights.append(switch_prob if mixup_alpha > 0 else 1.0)
    if prob <= 0 or not choices:
        return None
    mix = choices[0] if len(choices) == 1 else T.RandomChoice(choices, p=weights)
    return T.RandomApply([mix], p=prob)
