"""Saving and loading detectors: one .safetensors file, the config (architecture, classes, image
size, preprocessing, head options) as JSON in its header; written atomically, read without pickle."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MNv4Error
from ..weights.io import read_checkpoint, write_safetensors
from .model import Detector

__all__ = ["DETECTOR_FORMAT", "save_detector", "load_detector", "is_detector_config"]

DETECTOR_FORMAT = "mnv4-detector"


def is_detector_config(cfg: dict | None) -> bool:
    return bool(cfg) and cfg.get("format") == DETECTOR_FORMAT


def save_detector(detector: Detector, path: str | os.PathLike) -> Path:
    """Write ``detector`` to ``path`` (.safetensors), atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise MNv4Error(f"mnv4 saves detectors as .safetensors; got {path.name}")
    return write_safetensors(path, detector.state_dict(), dict(detector.config))


def load_detector(path: str | os.PathLike) -> Detector:
    """The detector saved at ``path``, rebuilt from its own config."""
    from .factory import build_from_config

    sd, cfg = read_checkpoint(path)
    if not is_detector_config(cfg):
        raise MNv4Error(
            f"{path} is not an mnv4 detector checkpoint (no {DETECTOR_FORMAT} metadata); "
            "for a classifier's weights use `backbone_checkpoint`"
        )
    detector = build_from_config(cfg)
    try:
        result = detector.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise MNv4Error(f"{path} does not fit its own config ({str(e).splitlines()[-1].strip()[:160]})") from None
    problems = [*result.missing_keys, *result.unexpected_keys]
    if problems:
        raise MNv4Error(f"{path} does not fit its own config ({', '.join(problems[:3])}); the file is damaged")
    return detector
