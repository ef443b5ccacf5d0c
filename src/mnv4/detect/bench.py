"""Detectors in ``mnv4 bench``: detector names as zoo entries, built like the classifiers are.

``mnv4 bench -m retinanet_mnv4_conv_small`` times the raw network (``RawNetwork``: image in,
``[1, A, C + 4]`` out) at 320 px (or ``--input-size``) with 91 COCO classes, random weights and
BatchNorm statistics estimated on noise - the same protocol as every classifier row.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .registry import HEADS

if TYPE_CHECKING:
    from torch import nn

    from ..deploy.zoo import ZooEntry

__all__ = ["is_detector_name", "detector_entry", "build_detector", "BENCH_SIZE", "BENCH_CLASSES"]

BENCH_SIZE = 320  # the common mobile detection input (torchvision's SSDLite, the tables)
BENCH_CLASSES = 91  # COCO as TF counts it


def is_detector_name(name: str) -> bool:
    return any(name.startswith(h + "_") for h in HEADS)


def detector_entry(name: str) -> ZooEntry:
    from ..deploy.zoo import ZooEntry
    from .registry import list_detectors

    if name not in list_detectors():
        from ..errors import InvalidValue

        raise InvalidValue("models", name, "a detector name from mnv4.detect.list_detectors()")
    return ZooEntry(name, "detector", name, BENCH_SIZE, math.nan, "")


def build_detector(name: str, input_size: int | None = None, realistic: bool = True) -> nn.Module:
    """The raw network of a random-weight detector, eval mode, with realistic BatchNorm statistics."""
    from ..models.batchnorm import noise_batches, recalibrate_batchnorm
    from .export import RawNetwork
    from .factory import create_detector

    size = input_size or BENCH_SIZE
    model = RawNetwork(create_detector(name, num_classes=BENCH_CLASSES, image_size=size)).eval()
    model.random_weights = True
    model.weights_note = "random init"
    if realistic:
        recalibrate_batchnorm(model, noise_batches(size, batches=2, batch_size=4))
        n = model.bn_recalibration["images"]
        model.weights_note = f"random init; BatchNorm statistics re-estimated on {n} inputs (seeded N(0,1) noise)"
    return model
