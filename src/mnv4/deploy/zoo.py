"""The models ``mnv4 bench`` compares: the MNv4 family and baselines, with published ImageNet top-1.

Accuracies are the published ones, each with its source; latencies are always measured here. MNv4
models take their native resolution (and, where the registry records one, their top-1) from
:mod:`mnv4.models.registry`; the baselines are listed here.

:func:`build` returns a randomly initialised model whose BatchNorm statistics have been estimated
on seeded noise (:func:`mnv4.models.recalibrate_batchnorm`): latency does not depend on the weights'
values, but it does depend on their scale, and a fresh network's eval-mode activations sink into
the denormal range, where the CPU runs ~40x slower than it would for a trained model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InvalidValue, MNv4Error, missing_extra
from ..models.registry import PAPER_SOURCE

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ZooEntry",
    "ZOO",
    "BASELINES",
    "DEFAULT_MODELS",
    "build",
    "zoo_entry",
    "known_models",
    "default_models",
    "is_baseline",
    "native_resolution",
]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    source: str  # mnv4 | torchvision | timm
    arch: str  # name inside its library
    resolution: int
    top1: float  # NaN where no accuracy is published
    top1_source: str


_PAPER = PAPER_SOURCE  # the paper also lists the timm baselines
_TV = "torchvision IMAGENET1K_V1 weights metadata"

BASELINES: dict[str, ZooEntry] = {
    e.name: e
    for e in (
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


def _mnv4_entry(name: str) -> ZooEntry:
    """An MNv4 row: resolution and published top-1 (with its source) from the registry."""
    from ..models.registry import get_entry

    reg = get_entry(name)
    top1 = math.nan if reg.top1 is None else reg.top1
    return ZooEntry(reg.name, "mnv4", reg.name, reg.resolution, top1, reg.top1_source if reg.top1 is not None else "")


def zoo_entry(name: str) -> ZooEntry:
    """The entry of a baseline or of any registered MNv4 variant; unknown names are an error."""
    if name in BASELINES:
        return BASELINES[name]
    from ..detect.bench import detector_entry, is_detector_name

    if is_detector_name(name):
        return detector_entry(name)
    try:
        return _mnv4_entry(name)
    except MNv4Error:
        raise InvalidValue("models", name, f"choose one of {', '.join(known_models())}") from None


def known_models() -> list[str]:
    from ..models.registry import MODELS

    return [*MODELS, *BASELINES]


def _zoo() -> dict[str, ZooEntry]:
    from ..models.registry import PUBLISHED

    return {**{n: _mnv4_entry(n) for n in PUBLISHED}, **BASELINES}


ZOO: dict[str, ZooEntry] = _zoo()

DEFAULT_MODELS = [n for n, e in ZOO.items() if e.source != "timm" or e.name in ("fastvit_t8", "efficientvit_b1")]


def default_models() -> list[str]:
    """The default comparison set, without the timm baselines when timm is not installed."""
    import importlib.util

    have_timm = importlib.util.find_spec("timm") is not None
    return [m for m in DEFAULT_MODELS if have_timm or ZOO[m].source != "timm"]


def is_baseline(name: str) -> bool:
    """A torchvision / timm comparison model (built here), not an MNv4 registry model."""
    return name in BASELINES


def native_resolution(name: str) -> int:
    """The resolution a model is evaluated at: the registry's for MNv4 models, the zoo's for baselines."""
    return zoo_entry(name).resolution


def build(
    name: str, input_size: int | None = None, realistic: bool = True, progress: bool | None = False
) -> tuple[nn.Module, ZooEntry]:
    """A randomly initialised model in eval mode and its zoo entry.

    ``realistic`` (the default) estimates its BatchNorm statistics on seeded noise at ``input_size``
    (default: the model's native resolution), so its activations have a trained model's scale;
    the model's ``random_weights`` and ``weights_note`` attributes say so.
    """
    entry = zoo_entry(name)
    if entry.source == "detector":
        from ..detect.bench import build_detector

        return build_detector(name, input_size, realistic), entry
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
    model.eval()
    model.random_weights = True
    model.weights_note = "random init"
    if realistic:
        from ..models.batchnorm import noise_batches, recalibrate_batchnorm

        size = input_size or entry.resolution
        recalibrate_batchnorm(model, noise_batches(size, batches=4, batch_size=8), progress=progress)
        n = model.bn_recalibration["images"]
        model.weights_note = f"random init; BatchNorm statistics re-estimated on {n} inputs (seeded N(0,1) noise)"
    return model, entry
