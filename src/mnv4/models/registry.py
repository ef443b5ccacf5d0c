"""Model names, aliases, and the weights (tags) that exist for them with their preprocessing.

Architecture and weights are separate, as in timm: ``mnv4_conv_medium`` is an architecture,
``mnv4_conv_medium.e500_r256_in1k`` is that architecture with a particular set of weights, and
the preprocessing those weights expect travels with the tag, not with code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import MNv4Error
from .specs import MODEL_SPECS, ModelSpec

__all__ = ["Preprocess", "WeightTag", "ModelEntry", "MODELS", "get_entry", "list_models", "split_name"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing: resize the shorter side to ``input_size / crop_pct``, centre-crop
    ``input_size``, normalise. ``test_*`` is the larger evaluation setting published with weights."""

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    test_input_size: int | None = None
    test_crop_pct: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**d)


@dataclass(frozen=True)
class WeightTag:
    tag: str
    preprocess: Preprocess
    num_classes: int = 1000
    hub_id: str = ""  # filled in by ModelEntry: timm/<timm arch>.<tag>


@dataclass(frozen=True)
class ModelEntry:
    name: str
    base: str  # key into MODEL_SPECS
    multiplier: float
    timm_name: str
    default_preprocess: Preprocess
    tags: tuple[WeightTag, ...] = field(default=())

    @property
    def spec(self) -> ModelSpec:
        return MODEL_SPECS[self.base].scaled(self.multiplier, name=self.name)

    @property
    def default_tag(self) -> WeightTag | None:
        return self.tags[0] if self.tags else None

    def get_tag(self, tag: str | None) -> WeightTag:
        if not self.tags:
            raise MNv4Error(f"{self.name} has no published weights; build it with pretrained=False")
        if tag is None:
            return self.tags[0]
        for t in self.tags:
            if t.tag == tag:
                return t
        known = ", ".join(t.tag for t in self.tags)
        raise MNv4Error(f"unknown weight tag {tag!r} for {self.name}; known tags: {known}")


def _pp(size: int, crop: float, test: int | None = None, test_crop: float | None = None, inception=False):
    mean, std = (INCEPTION_MEAN, INCEPTION_STD) if inception else (IMAGENET_MEAN, IMAGENET_STD)
    return Preprocess(size, crop, "bicubic", mean, std, test, test_crop)


def _entry(name: str, base: str, mult: float, default: Preprocess, *tags: tuple) -> ModelEntry:
    timm_name = name.replace("mnv4_", "mobilenetv4_")
    weight_tags = tuple(WeightTag(t[0], t[1], t[2] if len(t) > 2 else 1000, f"timm/{timm_name}.{t[0]}") for t in tags)
    return ModelEntry(name, base, mult, timm_name, default, weight_tags)


# Tags and preprocessing of the timm weights (timm-interop §2-§3); the first tag is the default.
_ENTRIES = [
    _entry(
        "mnv4_conv_small",
        "mnv4_conv_small",
        1.0,
        _pp(224, 0.875, 256, 0.95),
        ("e2400_r224_in1k", _pp(224, 0.875, 256, 0.95)),
        ("e1200_r224_in1k", _pp(224, 0.875, 256, 0.95)),
        ("e3600_r256_in1k", _pp(256, 0.95, 320, 1.0, inception=True)),
    ),
    _entry("mnv4_conv_small_035", "mnv4_conv_small", 0.35, _pp(224, 0.875, 256, 0.95, inception=True)),
    _entry(
        "mnv4_conv_small_050",
        "mnv4_conv_small",
        0.5,
        _pp(224, 0.875, 256, 0.95, inception=True),
        ("e3000_r224_in1k", _pp(224, 0.875, 256, 0.95, inception=True)),
    ),
    _entry(
        "mnv4_conv_medium",
        "mnv4_conv_medium",
        1.0,
        _pp(256, 0.95, 320, 1.0),
        ("e500_r256_in1k", _pp(256, 0.95, 320, 1.0)),
        ("e500_r224_in1k", _pp(224, 0.95, 256, 1.0)),
        ("e250_r384_in12k_ft_in1k", _pp(384, 0.95)),
        ("e180_r384_in12k", _pp(384, 0.95), 11821),
        ("e180_ad_r384_in12k", _pp(384, 0.95), 11821),
        ("e250_r384_in12k", _pp(384, 0.95), 11821),
    ),
    _entry(
        "mnv4_conv_large",
        "mnv4_conv_large",
        1.0,
        _pp(384, 0.95, 448, 1.0),
        ("e600_r384_in1k", _pp(384, 0.95, 448, 1.0)),
        ("e500_r256_in1k", _pp(256, 0.95, 320, 1.0)),
    ),
    _entry(
        "mnv4_hybrid_medium",
        "mnv4_hybrid_medium",
        1.0,
        _pp(256, 0.95, 320, 1.0),
        ("e200_r256_in12k_ft_in1k", _pp(256, 0.95, 320, 1.0)),
        ("ix_e550_r256_in1k", _pp(256, 0.95, 320, 1.0)),
        ("ix_e550_r384_in1k", _pp(384, 0.95, 448, 1.0)),
        ("e500_r224_in1k", _pp(224, 0.95, 256, 1.0)),
        ("e200_r256_in12k", _pp(256, 0.95), 11821),
    ),
    _entry("mnv4_hybrid_medium_075", "mnv4_hybrid_medium", 0.75, _pp(256, 0.95, 320, 1.0)),
    _entry(
        "mnv4_hybrid_large",
        "mnv4_hybrid_large",
        1.0,
        _pp(384, 0.95, 448, 1.0),
        ("ix_e600_r384_in1k", _pp(384, 0.95, 448, 1.0)),
        ("e600_r384_in1k", _pp(384, 0.95, 448, 1.0)),
    ),
    _entry("mnv4_hybrid_large_075", "mnv4_hybrid_large", 0.75, _pp(384, 0.95, 448, 1.0)),
]

MODELS: dict[str, ModelEntry] = {e.name: e for e in _ENTRIES}
ALIASES: dict[str, str] = {e.timm_name: e.name for e in _ENTRIES}


def split_name(name: str) -> tuple[str, str | None]:
    """``'arch.tag'`` -> (``'arch'``, ``'tag'``); a bare architecture gives tag None."""
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def get_entry(name: str) -> ModelEntry:
    arch, _ = split_name(name)
    arch = ALIASES.get(arch, arch)
    if arch not in MODELS:
        import difflib

        close = difflib.get_close_matches(arch, list(MODELS) + list(ALIASES), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; run `mnv4 models` for the list"
        raise MNv4Error(f"unknown model {name!r}{hint}")
    return MODELS[arch]


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Registered architecture names (``pretrained=True``: every ``arch.tag`` with weights)."""
    import fnmatch

    if pretrained:
        names = [f"{e.name}.{t.tag}" for e in MODELS.values() for t in e.tags]
    else:
        names = list(MODELS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)]
