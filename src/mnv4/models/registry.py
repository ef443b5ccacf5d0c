"""Model names, aliases, the facts about each model, and the weights (tags) that exist for them.

Architecture and weights are separate, as in timm: ``mnv4_conv_medium`` is an architecture,
``mnv4_conv_medium.e500_r256_in1k`` is that architecture with a particular set of weights, and
the preprocessing those weights expect travels with the tag, not with code.

This module is the one source of truth for model facts, as torchvision keeps ``meta`` with its
weights: exact parameter count, GMACs at the native resolution, the native resolution, the paper's
top-1 (with its source), endpoint channels, and per weight tag its preprocessing, class count and
published top-1. The test suite checks every computed count against these, and the README's model
table is generated from them (``mnv4 models --markdown``; a test keeps the README equal). Where the
facts come from is written in ``docs/architecture.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import MNv4Error
from .specs import MODEL_SPECS, ModelSpec

__all__ = [
    "Preprocess",
    "WeightTag",
    "ModelEntry",
    "MODELS",
    "PUBLISHED",
    "get_entry",
    "list_models",
    "split_name",
    "models_markdown",
]

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
    top1: float | None = None  # ImageNet-1k val top-1 at ``preprocess`` (timm results-imagenet.csv)

    @property
    def dataset(self) -> str:
        return "in12k" if self.num_classes == 11821 else "in1k"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    base: str  # key into MODEL_SPECS
    multiplier: float
    timm_name: str
    default_preprocess: Preprocess
    tags: tuple[WeightTag, ...] = field(default=())
    params: int = 0  # trainable parameters with a 1000-class classifier (exact)
    gmacs: float | None = None  # multiply-adds at the native resolution, in units of 1e9 (3 decimals)
    paper_top1: float | None = None  # ImageNet-1k top-1 the paper reports (Tab. 6), %
    endpoints: tuple[int, ...] = ()  # channels at strides 4, 8, 16, 32 (the TF endpoints)
    downsample: str = "conv"  # ModelSpec.downsample of this architecture (timm's aa / blur variants)

    @property
    def resolution(self) -> int:
        """Native (training and evaluation) resolution of the default weights, or the paper's."""
        return self.default_preprocess.input_size

    @property
    def top1(self) -> float | None:
        """Best-known ImageNet-1k top-1 at the native resolution: the paper's, else the default tag's."""
        if self.paper_top1 is not None:
            return self.paper_top1
        return self.tags[0].top1 if self.tags else None

    @property
    def top1_source(self) -> str:
        if self.paper_top1 is not None:
            return PAPER_SOURCE
        return f"timm {self.timm_name}.{self.tags[0].tag}" if self.tags and self.tags[0].top1 else ""

    @property
    def spec(self) -> ModelSpec:
        spec = MODEL_SPECS[self.base].scaled(self.multiplier, name=self.name)
        return spec if self.downsample == "conv" else dataclasses.replace(spec, downsample=self.downsample)

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


PAPER_SOURCE = "MNv4 paper Tab. 6"


def _entry(
    name: str, base: str, mult: float, default: Preprocess, facts: dict, *tags: tuple, downsample: str = "conv"
) -> ModelEntry:
    """``tags``: (tag, preprocess, top1) or (tag, preprocess, top1, num_classes)."""
    timm_name = name.replace("mnv4_", "mobilenetv4_")
    weight_tags = tuple(
        WeightTag(t[0], t[1], t[3] if len(t) > 3 else 1000, f"timm/{timm_name}.{t[0]}", t[2]) for t in tags
    )
    return ModelEntry(name, base, mult, timm_name, default, weight_tags, **facts, downsample=downsample)


def _facts(params: int, gmacs: float | None = None, top1: float | None = None, endpoints=()) -> dict:
    return dict(params=params, gmacs=gmacs, paper_top1=top1, endpoints=tuple(endpoints))


# Facts (docs/architecture.md "Counts"): exact parameters with a 1000-class head (TF unit tests for the
# five models; timm's builds for the width variants), GMACs at the native resolution (TF specs counted
# with mnv4's counting rules), the paper's Tab. 6 top-1, TF endpoint channels. Tags, their preprocessing
# and top-1 at that preprocessing: timm's weights and results CSV; the first tag is the default.
_ENTRIES = [
    _entry(
        "mnv4_conv_small",
        "mnv4_conv_small",
        1.0,
        _pp(224, 0.875, 256, 0.95),
        _facts(3_774_024, 0.186, 73.8, (32, 64, 96, 128)),
        ("e2400_r224_in1k", _pp(224, 0.875, 256, 0.95), 73.756),
        ("e1200_r224_in1k", _pp(224, 0.875, 256, 0.95), 73.450),
        ("e3600_r256_in1k", _pp(256, 0.95, 320, 1.0, inception=True), 74.534),
    ),
    _entry(
        "mnv4_conv_small_035",
        "mnv4_conv_small",
        0.35,
        _pp(224, 0.875, 256, 0.95, inception=True),
        _facts(1_905_384, 0.048),
    ),
    _entry(
        "mnv4_conv_small_050",
        "mnv4_conv_small",
        0.5,
        _pp(224, 0.875, 256, 0.95, inception=True),
        _facts(2_238_952, 0.065),
        ("e3000_r224_in1k", _pp(224, 0.875, 256, 0.95, inception=True), 64.778),
    ),
    _entry(
        "mnv4_conv_medium",
        "mnv4_conv_medium",
        1.0,
        _pp(256, 0.95, 320, 1.0),
        _facts(9_715_512, 1.080, 79.9, (48, 80, 160, 256)),
        ("e500_r256_in1k", _pp(256, 0.95, 320, 1.0), 79.916),
        ("e500_r224_in1k", _pp(224, 0.95, 256, 1.0), 79.092),
        ("e250_r384_in12k_ft_in1k", _pp(384, 0.95), 82.776),
        ("e180_r384_in12k", _pp(384, 1.0), None, 11821),
        ("e180_ad_r384_in12k", _pp(384, 1.0), None, 11821),
        ("e250_r384_in12k", _pp(384, 1.0), None, 11821),
    ),
    _entry(
        "mnv4_conv_large",
        "mnv4_conv_large",
        1.0,
        _pp(384, 0.95, 448, 1.0),
        _facts(32_590_864, 6.376, 82.9, (48, 96, 192, 512)),
        ("e600_r384_in1k", _pp(384, 0.95, 448, 1.0), 82.974),
        ("e500_r256_in1k", _pp(256, 0.95, 320, 1.0), 81.864),
    ),
    _entry(
        "mnv4_hybrid_medium",
        "mnv4_hybrid_medium",
        1.0,
        _pp(256, 0.95, 320, 1.0),
        _facts(11_074_648, 1.271, 80.7, (48, 80, 160, 256)),
        ("e200_r256_in12k_ft_in1k", _pp(256, 0.95, 320, 1.0), 82.360),
        ("ix_e550_r256_in1k", _pp(256, 0.95, 320, 1.0), 81.478),
        ("ix_e550_r384_in1k", _pp(384, 0.95, 448, 1.0), 82.952),
        ("e500_r224_in1k", _pp(224, 0.95, 256, 1.0), 80.432),
        ("e200_r256_in12k", _pp(256, 0.95, 320, 1.0), None, 11821),
    ),
    _entry(
        "mnv4_hybrid_medium_075",
        "mnv4_hybrid_medium",
        0.75,
        _pp(256, 0.95, 320, 1.0),
        _facts(7_313_528, 0.858),
    ),
    _entry(
        "mnv4_hybrid_large",
        "mnv4_hybrid_large",
        1.0,
        _pp(384, 0.95, 448, 1.0),
        _facts(37_764_624, 7.712, 83.4, (48, 96, 192, 512)),
        ("ix_e600_r384_in1k", _pp(384, 0.95, 448, 1.0), 83.996),
        ("e600_r384_in1k", _pp(384, 0.95, 448, 1.0), 83.826),
    ),
    _entry(
        "mnv4_hybrid_large_075",
        "mnv4_hybrid_large",
        0.75,
        _pp(384, 0.95, 448, 1.0),
        _facts(22_754_984, 4.768),
    ),
    # timm's anti-aliased / blur-pool variants (docs/architecture.md "Anti-aliased downsampling"): the
    # same parameters and keys as the plain model; GMACs count the stride-1 convs, not the pooling.
    _entry(
        "mnv4_conv_aa_medium",
        "mnv4_conv_medium",
        1.0,
        _pp(256, 0.95),
        _facts(9_715_512, 1.562, None, (48, 80, 160, 256)),
        downsample="avg",
    ),
    _entry(
        "mnv4_conv_blur_medium",
        "mnv4_conv_medium",
        1.0,
        _pp(224, 0.95, 256, 1.0),
        _facts(9_715_512, 1.196, None, (48, 80, 160, 256)),
        ("e500_r224_in1k", _pp(224, 0.95, 256, 1.0), 79.446),
        downsample="blur",
    ),
    _entry(
        "mnv4_conv_aa_large",
        "mnv4_conv_large",
        1.0,
        _pp(448, 0.95, 544, 1.0),
        _facts(32_590_864, 9.537, None, (48, 96, 192, 512)),
        ("e230_r448_in12k_ft_in1k", _pp(448, 0.95, 544, 1.0), 84.668),
        ("e230_r384_in12k_ft_in1k", _pp(384, 0.95, 480, 1.0), 84.314),
        ("e600_r384_in1k", _pp(384, 0.95, 480, 1.0), 83.264),
        ("e230_r384_in12k", _pp(384, 0.95, 448, 1.0), None, 11821),
        downsample="avg",
    ),
]

# The five published models, in the paper's order (the default list of every comparison).
PUBLISHED = ("mnv4_conv_small", "mnv4_conv_medium", "mnv4_hybrid_medium", "mnv4_conv_large", "mnv4_hybrid_large")

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


def models_markdown() -> str:
    """The README's model table, from this module's facts (a test keeps the README equal to it)."""
    lines = [
        "| model | params | GMACs | res | paper top-1 | default weights (timm tag, top-1) |",
        "|---|---|---|---|---|---|",
    ]
    for e in MODELS.values():
        tag = e.default_tag
        weights = f"{tag.tag} ({tag.top1:.1f})" if tag and tag.top1 else "- (untrained)"
        if tag and len(e.tags) > 1:
            weights += f" +{len(e.tags) - 1} more"
        top1 = f"{e.paper_top1:.1f}" if e.paper_top1 is not None else "-"
        lines.append(f"| {e.name} | {e.params / 1e6:.2f}M | {e.gmacs:.3f} | {e.resolution} | {top1} | {weights} |")
    return "\n".join(lines) + "\n"
