"""Prediction on image files: ``mnv4.predict(model, paths)`` -> top-k classes per readable image.

Images go through the one robust loader (:mod:`mnv4.data.images`) and the model's own eval
preprocessing, in batches; unreadable files are skipped, reported once and counted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data.images import BadImage, BadImageLog, find_images, try_load_rgb
from .errors import MNv4Error
from .models.meta import weights_meta

__all__ = ["Prediction", "predict", "class_names_of"]


@dataclass
class Prediction:
    path: str
    classes: list[str]  # top-k class names, most likely first
    indices: list[int]
    probs: list[float]

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "top": [
                {"class": c, "index": i, "prob": round(p, 6)} for c, i, p in zip(self.classes, self.indices, self.probs)
            ],
        }


def class_names_of(model: nn.Module) -> list[str]:
    """The model's class names: stored with its weights, ImageNet's for a 1000-class model, else 'class i'."""
    names = weights_meta(model).class_names
    num = int(getattr(model, "num_classes", 0))
    if names:
        return list(names)
    if num == 1000:
        from .data.imagenet import imagenet_class_names

        return list(imagenet_class_names())
    return [f"class {i}" for i in range(num)]


class _Files(Dataset):
    def __init__(self, paths: Sequence[os.PathLike | str], transform) -> None:
        self.paths, self.transform = [str(p) for p in paths], transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        im = try_load_rgb(self.paths[i])
        return (im if isinstance(im, BadImage) else self.transform(im)), i


def _collate(batch):
    good = [(x, i) for x, i in batch if not isinstance(x, BadImage)]
    bad = [x for x, _ in batch if isinstance(x, BadImage)]
    if not good:
        return torch.empty(0), [], bad
    return torch.stack([x for x, _ in good]), [i for _, i in good], bad


def predict(
    model: nn.Module,
    images: str | os.PathLike | Sequence[str | os.PathLike],
    topk: int = 5,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    input_size: int | None = None,
    workers: int = 0,
    progress: bool | None = None,
    bad_images: BadImageLog | None = None,
) -> Iterator[Prediction]:
    """Yield a :class:`Prediction` per readable image, in input order.

    ``images``: files and/or folders (searched recursively for image suffixes). Unreadable files are
    added to ``bad_images`` (printed once each) and skipped.
    """
    from tqdm import tqdm

    from .data.transforms import eval_transform

    paths = find_images([images] if isinstance(images, str | os.PathLike) else images)
    if not paths:
        raise MNv4Error("no image files found in the given paths")
    if topk < 1:
        raise MNv4Error(f"`topk` must be >= 1, got {topk}")
    names = class_names_of(model)
    k = min(topk, len(names))
    tf = eval_transform(weights_meta(model).preprocess, input_size=input_size)
    loader = DataLoader(_Files(paths, tf), batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    bad_images = bad_images if bad_images is not None else BadImageLog()
    device = torch.device(device)
    model = model.eval().to(device)
    bar = tqdm(total=len(paths), unit="img", desc="predict", disable=None if progress is None else not progress)
    try:
        for x, idx, bad in loader:
            bad_images.add(bad)
            bar.update(len(idx) + len(bad))
            if not idx:
                continue
            with torch.inference_mode():
                probs = model(x.to(device)).float().softmax(-1).cpu()
            top = probs.topk(k, dim=1)
            for row, i in enumerate(idx):
                ind = top.indices[row].tolist()
                yield Prediction(str(paths[i]), [names[j] for j in ind], ind, top.values[row].tolist())
    finally:
        bar.close()
