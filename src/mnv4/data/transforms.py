"""Image transforms built on torchvision transforms v2."""

from __future__ import annotations

import math

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from ..models.registry import Preprocess

__all__ = ["eval_transform", "interpolation_mode"]


def interpolation_mode(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        raise ValueError(f"unknown interpolation {name!r}; use bicubic, bilinear or nearest") from None


def eval_transform(pp: Preprocess, input_size: int | None = None, crop_pct: float | None = None) -> T.Compose:
    """PIL image / uint8 tensor -> normalised float tensor, as the weights were evaluated (timm-style
    resize of the shorter side to ``size / crop_pct``, then a centre crop of ``size``)."""
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
