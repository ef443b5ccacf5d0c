"""Object detection on MobileNetV4 backbones (docs/detection.md): models, saving, profiling, export.

Built on torchvision's detection components; names are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "create_detector": "mnv4.detect.factory",
    "Detector": "mnv4.detect.model",
    "save_detector": "mnv4.detect.io",
    "load_detector": "mnv4.detect.io",
    "list_detectors": "mnv4.detect.registry",
}

__all__ = ["create_detector", "Detector", "save_detector", "load_detector", "list_detectors"]

if TYPE_CHECKING:
    from .factory import create_detector
    from .io import load_detector, save_detector
    from .model import Detector
    from .registry import list_detectors


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mnv4.detect' has no attribute {name!r}")
