"""mnv4: MobileNetV4 (arXiv 2404.10518) in PyTorch - models, weights, training, deployment."""

from .errors import MNv4Error
from .factory import create_model, infer_architecture
from .models import MobileNetV4, ModelSpec, list_models
from .weights.checkpoint import load_weights, save_model

__version__ = "0.1.0"

__all__ = [
    "MNv4Error",
    "create_model",
    "infer_architecture",
    "MobileNetV4",
    "ModelSpec",
    "list_models",
    "load_weights",
    "save_model",
    "__version__",
]
