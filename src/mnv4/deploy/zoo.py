"""The models ``mnv4 bench`` compares: the MNv4 family and baselines, with published ImageNet top-1.

Accuracies are the published ones, each with its source; latencies are always measured here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import MNv4Error, missing_extra

__all__ = ["ZooEntry", "ZOO", "DEFAULT_MODELS", "build", "default_models", "is_baseline", "native_resolution"]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    source: str  # mnv4 | torchvision | timm
    arch: str  # name inside its library
    resolution: int
    top1: float
    top1_source: str


_PAPER = "MNv4 paper Tab. 6"
_TV = "torchvision IMAGENET1K_V1 weights metadata"

ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("mnv4_conv_small", "mnv4", "mnv4_conv_small", 224, 73.8, _PAPER),
        ZooEntry("mnv4_conv_medium", "mnv4", "mnv4_conv_medium", 256, 79.9, _PAPER),
        ZooEntry("mnv4_hybrid_medium", "mnv4", "mnv4_hybrid_medium", 256, 80.7, _PAPER),
        ZooEntry("mnv4_conv_large", "mnv4", "mnv4_conv_large", 384, 82.9, _PAPER),
        ZooEntry("mnv4_hybrid_large", "mnv4", "mnv4_hybrid_large", 384, 83.4, _PAPER),
        ZooEntry("mobilenet_v2", "torchvision", "mobilenet_v2", 224, 71.878, _TV),
        ZooEntry("mobilenet_v3_large", "torchvision", "mobilenet_v3_large", 224, 74.042, _TV),
        ZooEntry("mobilenet_v3_small", "torchvision", "mobilenet_v3_small", 224, 67.668, _TV),
        ZooEntry("efficientnet_b0", "torchvision", "efficientnet_b0", 224, 77.692, _TV),
        ZooEntry("fastvit_t8", "timm", "fastvit_t8", 256, 75.6, _PAPER),
        ZooEntry("fastvit_s12", "timm", "fastvit_s12", 256, 79.8, _PAPER),
        ZooEntry("fastvit_sa12", "timm", "fastvit_sa12", 256, 80.6, _PAPER),
        ZooEntry("efficientvit_b1", "timm", "efficientvit_b1", 224, 79.4, _PAPER + " (MIT-EfficientViT-B1-r224)"),
        ZooEntry("efficientvit_b2", "timm", "efficientvit_b2", 256, 82.7, _PAPER + " (MIT-EfficientViT-B2-r256)"),
    )
}

DEFAULT_MODELS = [n for n, e in ZOO.items() if e.source != "timm" or e.name in ("fastvit_t8", "efficientvit_b1")]


def build(name: str) -> tuple[nn.Module, ZooEntry]:
    """A randomly initialised model (latency does not depend on the weights) and its zoo entry."""
    entry = ZOO.get(name)
    if entry is None:
        from ..models.registry import MODELS

        if name in MODELS:  # any registered MNv4 variant, no published accuracy
            entry = ZooEntry(name, "mnv4", name, MODELS[name].default_preprocess.input_size, float("nan"), "")
        else:
            raise MNv4Error(f"unknown benchmark model {name!r}; known: {', '.join(ZOO)}")
    if entry.source == "mnv4":
        from ..factory import create_model

        model = create_model(entry.arch)
    elif entry.source == "torchvision":
        import torchvision.models

        model = getattr(torchvision.models, entry.arch)(weights=None)
    else:
        try:
            import timm
        except ImportError:
            raise missing_extra("timm", "timm") from None
        model = timm.create_model(entry.arch, pretrained=False)
    return model.eval(), entry


def default_models() -> list[str]:
    """The default comparison set, without the timm baselines when timm is not installed."""
    import importlib.util

    have_timm = importlib.util.find_spec("timm") is not None
    return [m for m in DEFAULT_MODELS if have_timm or ZOO[m].source != "timm"]


def is_baseline(name: str) -> bool:
    """A torchvision / timm comparison model (built here), not an MNv4 registry model."""
    return name in ZOO and ZOO[name].source != "mnv4"


def native_resolution(name: str) -> int:
    """The resolution a model is evaluated at: the registry's for MNv4 models, the zoo's for baselines."""
    from ..models.registry import MODELS, get_entry

    if is_baseline(name):
        return ZOO[name].resolution
    try:
        return get_entry(name).resolution
    except MNv4Error:
        if name in MODELS:
            raise
        return 224
