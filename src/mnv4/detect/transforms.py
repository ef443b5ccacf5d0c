"""Detection augmentation and input sizing on torchvision transforms v2 with ``tv_tensors.BoundingBoxes``.

Training (:class:`DetectionAugment`): horizontal flip; scale jitter (v2.ScaleJitter: the image scaled to fit
``size`` times a random factor) followed by a random ``size`` x ``size`` crop that pads when the image is
smaller (the RetinaNet recipe's "scale jitter + crop"); boxes clipped to the crop and dropped when under
1 px (v2.ClampBoundingBoxes, v2.SanitizeBoundingBoxes); then, with probability ``randaug_prob``, the
paper's RandAugment without shear and rotate. Translate is left out as well: it would need the boxes
moved, and jitter + crop already translate. What remains are torchvision's photometric RandAugment ops.

Evaluation and prediction: :func:`letterbox` (aspect kept, longer side to ``size``, centred grey padding)
or ``mode="fixed"`` (stretched to ``size`` x ``size``). The parameters go into the target as
``letterbox = (scale, pad_x, pad_y, orig_w, orig_h)`` (``scale`` a pair ``(sx, sy)`` in fixed mode), and
:func:`unletterbox` maps predicted boxes back to the original image's pixels.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from ..distill.augment import randaug_bin
from ..errors import check_choice, check_float

__all__ = [
    "DetectionAugment",
    "PhotometricRandAugment",
    "letterbox",
    "letterbox_geometry",
    "unletterbox",
    "RESIZE_MODES",
    "FILL",
]

RESIZE_MODES = ("letterbox", "fixed")
FILL = 114  # grey padding: close to the mean pixel, so padding looks like "nothing" after normalisation
_GEOMETRIC = ("ShearX", "ShearY", "Rotate", "TranslateX", "TranslateY")


class PhotometricRandAugment(T.RandAugment):
    """torchvision's RandAugment with the geometric ops removed (module docstring): boxes stay valid."""

    _AUGMENTATION_SPACE = {k: v for k, v in T.RandAugment._AUGMENTATION_SPACE.items() if k not in _GEOMETRIC}


Letterbox = tuple[Any, float, float, int, int]


def letterbox(
    image: torch.Tensor, boxes: tv_tensors.BoundingBoxes, size: int, mode: str = "letterbox"
) -> tuple[torch.Tensor, tv_tensors.BoundingBoxes, Letterbox]:
    """``image`` ([3, H, W]) and its boxes resized to ``size`` x ``size``, with the parameters that undo it."""
    h, w = image.shape[-2:]
    lb = letterbox_geometry(int(w), int(h), size, mode)
    if mode == "fixed":
        image = TF.resize(image, [size, size], antialias=True)
        boxes = TF.resize(boxes, [size, size])
        return image, boxes, lb
    (sx, sy), left, top = lb[0], int(lb[1]), int(lb[2])
    nw, nh = round(w * sx), round(h * sy)
    image = TF.resize(image, [nh, nw], antialias=True)
    boxes = TF.resize(boxes, [nh, nw])
    padding = [left, top, size - nw - left, size - nh - top]
    image = TF.pad(image, padding, fill=FILL)
    boxes = TF.pad(boxes, padding)
    return image, boxes, lb


def letterbox_geometry(w: int, h: int, size: int, mode: str = "letterbox") -> Letterbox:
    """Where :func:`letterbox` puts a ``w`` x ``h`` image: ``((sx, sy), pad_x, pad_y, w, h)``, so that a
    point maps to ``(x * sx + pad_x, y * sy + pad_y)``."""
    if mode == "fixed":
        return (size / w, size / h), 0.0, 0.0, w, h
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    # The effective scale per axis differs slightly from ``scale`` after rounding; use the exact one.
    return (nw / w, nh / h), float((size - nw) // 2), float((size - nh) // 2), w, h


def unletterbox(boxes: torch.Tensor, lb: Letterbox) -> torch.Tensor:
    """xyxy boxes in the letterboxed (or fixed-resized) image -> pixels of the original image, clipped to it."""
    scale, pad_x, pad_y, orig_w, orig_h = lb
    sx, sy = scale if isinstance(scale, tuple | list) else (scale, scale)
    out = boxes.clone().float()
    out[:, [0, 2]] = ((out[:, [0, 2]] - pad_x) / sx).clamp(0, orig_w)
    out[:, [1, 3]] = ((out[:, [1, 3]] - pad_y) / sy).clamp(0, orig_h)
    return out


class DetectionAugment:
    """(uint8 image [3, H, W], xyxy boxes, labels) -> (float image [3, S, S] in [0, 1], boxes, labels, letterbox).

    ``train=False`` only resizes (letterbox or fixed); ``train=True`` adds the augmentation of the module
    docstring. Random draws come from torch's generator, which the dataset seeds per (seed, epoch, sample).
    """

    def __init__(
        self,
        size: int,
        train: bool = False,
        mode: str = "letterbox",
        hflip: float = 0.5,
        scale_jitter: tuple[float, float] = (0.5, 2.0),
        randaug_prob: float = 0.0,
        randaug_layers: int = 2,
        randaug_magnitude: float = 9,
    ) -> None:
        check_choice("resize", mode, RESIZE_MODES)
        check_float("hflip", hflip, 0.0, 1.0)
        check_float("randaug_prob", randaug_prob, 0.0, 1.0)
        self.size, self.train, self.mode = size, train, mode
        self.hflip = T.RandomHorizontalFlip(hflip) if hflip > 0 else None
        lo, hi = scale_jitter
        self.jitter = None
        if tuple(scale_jitter) != (1.0, 1.0):
            self.jitter = T.Compose(
                [
                    T.ScaleJitter((size, size), scale_range=(lo, hi), antialias=True),
                    T.RandomCrop((size, size), pad_if_needed=True, fill=FILL),
                ]
            )
        self.clean = T.Compose([T.ClampBoundingBoxes(), T.SanitizeBoundingBoxes(min_size=1.0)])
        self.randaug = None
        if randaug_prob > 0 and randaug_layers > 0:
            ra = PhotometricRandAugment(randaug_layers, randaug_bin(randaug_magnitude), fill=FILL)
            self.randaug = T.RandomApply([ra], p=randaug_prob)

    def __call__(
        self, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Letterbox]:
        h, w = image.shape[-2:]
        sample: dict[str, Any] = {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(boxes.reshape(-1, 4), format="XYXY", canvas_size=(h, w)),
            "labels": labels,
        }
        if self.train:
            if self.hflip is not None:
                sample = self.hflip(sample)
            if self.jitter is not None:
                sample = self.jitter(sample)
            sample = self.clean(sample)
            if self.randaug is not None:
                sample["image"] = self.randaug(sample["image"])
        img, bx, lb = letterbox(sample["image"], sample["boxes"], self.size, self.mode)
        sample = self.clean({"image": img, "boxes": bx, "labels": sample["labels"]})
        out = TF.to_dtype(sample["image"], torch.float32, scale=True).as_subclass(torch.Tensor)
        return out, sample["boxes"].as_subclass(torch.Tensor).float(), sample["labels"], lb
