"""The built-in offline dataset: scikit-learn's 1,797 handwritten digit scans, upscaled.

The scans ship inside scikit-learn, so a fresh machine without network access can still train
and evaluate a real model end to end.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["DigitsDataset", "digits_split"]


class DigitsDataset(Dataset):
    """8x8 grey digits (0-16) as ``size`` x ``size`` RGB PIL images with integer labels."""

    classes = [str(i) for i in range(10)]

    def __init__(self, indices: np.ndarray | None = None, size: int = 32) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        idx = np.arange(len(digits.target)) if indices is None else np.asarray(indices)
        # Scale to 0-255 once; bicubic upscaling keeps the strokes smooth instead of blocky.
        self.images = (digits.images[idx] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        self.targets = digits.target[idx].astype(np.int64).tolist()
        self.size = size

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        im = Image.fromarray(self.images[i], mode="L").resize((self.size, self.size), Image.Resampling.BICUBIC)
        return im.convert("RGB"), self.targets[i]


def digits_split(val_fraction: float = 0.2, seed: int = 0, size: int = 32) -> tuple[DigitsDataset, DigitsDataset]:
    """Seeded, class-stratified train/val split (the same split on every machine)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    train_idx, val_idx = train_test_split(np.arange(len(y)), test_size=val_fraction, random_state=seed, stratify=y)
    return DigitsDataset(np.sort(train_idx), size), DigitsDataset(np.sort(val_idx), size)
