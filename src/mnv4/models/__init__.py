"""Architectures: blocks, specs (the models as data), the builder and the registry."""

from .batchnorm import debias_running_stats, has_default_bn_stats, noise_batches, recalibrate_batchnorm
from .blocks import MHSA, UIB, AttentionBlock, ConvBN, FusedIB, LayerScale, MobileMQA, make_divisible
from .mobilenetv4 import MobileNetV4, drop_path_rates
from .registry import MODELS, ModelEntry, Preprocess, WeightTag, get_entry, list_models
from .specs import MODEL_SPECS, AttentionSpec, ConvBNSpec, FusedIBSpec, ModelSpec, UIBSpec, cn, fib, mhsa, mqa, uib

__all__ = [
    "debias_running_stats",
    "has_default_bn_stats",
    "noise_batches",
    "recalibrate_batchnorm",
    "MHSA",
    "UIB",
    "AttentionBlock",
    "ConvBN",
    "FusedIB",
    "LayerScale",
    "MobileMQA",
    "make_divisible",
    "MobileNetV4",
    "drop_path_rates",
    "MODELS",
    "ModelEntry",
    "Preprocess",
    "WeightTag",
    "get_entry",
    "list_models",
    "MODEL_SPECS",
    "AttentionSpec",
    "ConvBNSpec",
    "FusedIBSpec",
    "ModelSpec",
    "UIBSpec",
    "cn",
    "fib",
    "mhsa",
    "mqa",
    "uib",
]
