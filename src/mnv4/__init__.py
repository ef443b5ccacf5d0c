"""mnv4: MobileNetV4 (arXiv 2404.10518) in PyTorch - models, weights, training, distillation, search, deployment.

The names below are imported on first use, so ``import mnv4`` (and ``mnv4 --help``) does not pay
for torch until a model is actually built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import InvalidValue, MNv4Error
from .lazy import lazy_names

__version__ = "0.2.0"

_LAZY = {
    "create_model": "mnv4.factory",
    "infer_architecture": "mnv4.factory",
    "MobileNetV4": "mnv4.models.mobilenetv4",
    "ModelSpec": "mnv4.models.specs",
    "list_models": "mnv4.models.registry",
    "load_weights": "mnv4.weights.checkpoint",
    "save_model": "mnv4.weights.checkpoint",
    "predict": "mnv4.inference",
    "push_to_hub": "mnv4.hub.push",
    "create_detector": "mnv4.detect.factory",
}

__all__ = [
    "MNv4Error",
    "InvalidValue",
    "__version__",
    "create_model",
    "infer_architecture",
    "MobileNetV4",
    "ModelSpec",
    "list_models",
    "load_weights",
    "save_model",
    "predict",
    "push_to_hub",
    "create_detector",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these come from __getattr__
    from .detect.factory import create_detector
    from .factory import create_model, infer_architecture
    from .hub.push import push_to_hub
    from .inference import predict
    from .models.mobilenetv4 import MobileNetV4
    from .models.registry import list_models
    from .models.specs import ModelSpec
    from .weights.checkpoint import load_weights, save_model

__getattr__, __dir__ = lazy_names(__name__, _LAZY)
