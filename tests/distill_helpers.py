"""Small synthetic images and teachers for the distillation tests (no downloads, no shared data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from mnv4.distill.teachers import Teacher
from mnv4.models.registry import Preprocess
from mnv4.models.specs import ModelSpec, cn, uib

COLORS = ("red", "green", "blue")

TINY = ModelSpec(
    name="tiny_distill",
    stem=cn(3, 2, 8),
    stages=((cn(3, 2, 8),), (uib(3, 3, 2, 16, 2.0), uib(0, 3, 1, 16, 2.0)), (uib(3, 0, 2, 16, 2.0),), (cn(1, 1, 16),)),
    num_features=32,
    head_hidden_size=32,
)


def color_image(cls: int, rng: np.random.Generator, size: tuple[int, int] = (20, 24)) -> Image.Image:
    """A noisy picture whose dominant colour is channel ``cls``, with a random darker block."""
    h, w = size
    a = rng.uniform(0, 90, (h, w, 3))
    a[..., cls] += rng.uniform(110, 165)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    a[y : y + h // 3, x : x + w // 3] *= 0.5
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def make_folder(root: Path, per_class: int = 8, flat: bool = False, seed: int = 0, bad: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(COLORS):
        for i in range(per_class):
            folder = root if flat else root / name
            folder.mkdir(parents=True, exist_ok=True)
            color_image(c, rng).save(folder / f"{name}_{i:03d}.png")
    if bad:
        (root if flat else root / COLORS[0]).joinpath("broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


class ColorNet(nn.Module):
    """A fixed 'teacher' that knows the answer: softmax over the mean of each colour channel."""

    num_classes = 3

    def __init__(self, sharpness: float = 6.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(sharpness))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return x.mean(dim=(2, 3)) * self.scale


PP = Preprocess(input_size=24, crop_pct=1.0, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def color_teacher(input_size: int = 24) -> Teacher:
    pp = Preprocess(input_size, 1.0, "bilinear", PP.mean, PP.std)
    identity = {"spec": "colornet", "family": "test", "arch": "colornet", "num_classes": 3}
    return Teacher(ColorNet(), pp, list(COLORS), identity)


def unnormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised float -> 0-255 float, for comparing what two networks were fed."""
    m = torch.tensor(mean).view(-1, 1, 1) * 255
    s = torch.tensor(std).view(-1, 1, 1) * 255
    return x * s + m
