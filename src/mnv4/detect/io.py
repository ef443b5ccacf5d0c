"""Saving and loading detectors: one .safetensors file, the config (architecture, classes, image
size, preprocessing, head options) as JSON in its header; written atomically, read without pickle."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MNv4Error
from ..weights.io import write_safetensors
from .model import Detector

__all__ = ["DETECTOR_FORMAT", "save_detector", "is_detector_config"]

DETECTOR_FORMAT = "mnv4-detector"


def is_detector_config(cfg: dict | None) -> bool:
    return bool(cfg) and cfg.get("format") == DETECTOR_FORMAT


def save_detector(detector: Detector, path: str | os.PathLike) -> Path:
    """Write ``detector`` to ``path`` (.safetensors), atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise MNv4Error(f"mnv4 saves detectors as .safetensors; got {path.name}")
    return write_safetensors(path, detector.state_dict(), dict(detector.config))
