"""Validation: top-1 / top-5 / loss over a loader (summed across processes), confusion matrix."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.images import BadImageLog
from ..models.meta import weights_meta
from .distributed import DistInfo, all_reduce_sum

if TYPE_CHECKING:
    from ..data.datasets import DataBundle

__all__ = ["EvalResult", "evaluate", "evaluate_on", "plot_confusion"]


@dataclass
class EvalResult:
    top1: float  # percent
    top5: float  # percent
    loss: float
    count: int
    predictions: list[int] = field(default_factory=list, repr=False)
    targets: list[int] = field(default_factory=list, repr=False)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
    channels_last: bool = False,
    dist_info: DistInfo | None = None,
    keep_predictions: bool = False,
    bad_images: BadImageLog | None = None,
    progress: bool | None = False,
) -> EvalResult:
    """Accuracy and mean cross-entropy (no label smoothing, so losses compare across recipes).

    Unreadable images (the loader's third element) are added to ``bad_images`` when given."""
    was_training = model.training
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    preds: list[int] = []
    targets: list[int] = []
    bar = tqdm(loader, desc="eval", unit="batch", leave=False, disable=None if progress is None else not progress)
    for batch in bar:
        x, y = batch[0], batch[1]
        if bad_images is not None and len(batch) > 2:
            bad_images.add(batch[2])
        if len(y) == 0:
            continue
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast or contextlib.nullcontext():
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hits = topk.eq(y[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += len(y)
        if keep_predictions:
            preds += topk[:, 0].tolist()
            targets += y.tolist()
    model.train(was_training)
    if dist_info is not None:
        loss_sum, correct1, correct5, count = all_reduce_sum([loss_sum, correct1, correct5, count], dist_info)
    n = max(count, 1)
    return EvalResult(100.0 * correct1 / n, 100.0 * correct5 / n, loss_sum / n, int(count), preds, targets)


def evaluate_on(
    model: nn.Module,
    data: DataBundle,
    input_size: int | None = None,
    batch_size: int = 128,
    workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
) -> tuple[EvalResult, BadImageLog]:
    """Evaluate ``model`` on the validation split of ``data`` (a :class:`~mnv4.data.datasets.DataBundle`)
    with the model's eval preprocessing, labels aligned to the model's class names."""
    from torch.utils.data import DataLoader

    from ..data.datasets import align_classes, collate_images
    from ..data.sampling import SeededDataset
    from ..data.transforms import eval_transform

    val = align_classes(data.val, list(data.class_names), weights_meta(model).class_names, model.num_classes)
    loader = DataLoader(
        SeededDataset(val, eval_transform(weights_meta(model).preprocess, input_size=input_size)),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_images,
    )
    bad = BadImageLog()
    result = evaluate(model.to(device), loader, device, keep_predictions=True, bad_images=bad, progress=progress)
    if result.count == 0:
        from ..errors import MNv4Error

        raise MNv4Error(f"no image of the {data.name} validation set could be read; nothing was evaluated")
    return result, bad


def plot_confusion(result: EvalResult, class_names: list[str], path: str | os.PathLike) -> Path:
    """Row-normalised confusion matrix as a PNG (counts would hide errors on small classes)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    from ..plotting import pyplot, save_figure

    plt = pyplot()

    n = len(class_names)
    size = min(4 + 0.45 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(
        result.targets,
        result.predictions,
        labels=list(range(n)),
        display_labels=class_names,
        normalize="true",
        values_format=".2f",
        include_values=n <= 30,
        xticks_rotation="vertical",
        colorbar=False,
        ax=ax,
    )
    ax.set_title(f"top-1 {result.top1:.2f}% on {result.count} images")
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
