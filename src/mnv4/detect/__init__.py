"""Object detection on MobileNetV4 backbones (docs/detection.md): models, saving, profiling, export.

Built on torchvision's detection components; names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

_LAZY = {
    "create_detector": "mnv4.detect.factory",
    "Detector": "mnv4.detect.model",
    "save_detector": "mnv4.detect.io",
    "load_detector": "mnv4.detect.factory",
    "list_detectors": "mnv4.detect.registry",
}

__all__ = ["create_detector", "Detector", "save_detector", "load_detector", "list_detectors"]

if TYPE_CHECKING:
    from .factory import create_detector, load_detector
    from .io import save_detector
    from .model import Detector
    from .registry import list_detectors

__getattr__, __dir__ = lazy_names(__name__, _LAZY)
