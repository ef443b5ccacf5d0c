"""MobileNetV4 architectures as data (docs/architecture.md §3): one table of block specs per model.

A model is a stem conv, four stages ending at stride 4 / 8 / 16 / 32 (the TF ``is_output``
endpoints), then the fixed head (1x1 conv to ``num_features`` = 960, global pool, 1x1 conv to
``head_hidden_size`` = 1280, classifier). Only the stem and the stages vary between models, so
only they are written down here; :class:`mnv4.models.mobilenetv4.MobileNetV4` builds any :class:`ModelSpec`
(``mnv4.create_model(spec)``).

Shorthand used in the tables, as in docs/architecture.md §2:
``cn(k, s, c)`` conv-BN-act, ``fib(k, s, c, e)`` FusedIB, ``uib(start_dw, mid_dw, s, c, e)`` UIB
(a kernel of 0 means that depthwise conv is absent), ``mqa(heads, dim, kv_stride)`` Mobile MQA.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ConvBNSpec",
    "FusedIBSpec",
    "UIBSpec",
    "AttentionSpec",
    "BlockSpec",
    "ModelSpec",
    "cn",
    "fib",
    "uib",
    "mqa",
    "mhsa",
    "MODEL_SPECS",
    "read_spec_file",
]


@dataclass(frozen=True)
class ConvBNSpec:
    out: int
    kernel: int = 3
    stride: int = 1


@dataclass(frozen=True)
class FusedIBSpec:
    out: int
    kernel: int = 3
    stride: int = 1
    expand: float = 4.0


@dataclass(frozen=True)
class UIBSpec:
    start_dw: int
    mid_dw: int
    stride: int
    out: int
    expand: float = 4.0
    end_dw: int = 0


@dataclass(frozen=True)
class AttentionSpec:
    """Attention block; it keeps the channel count. ``kv_heads=1`` is MQA, ``kv_heads=heads`` MHSA."""

    heads: int
    key_dim: int
    value_dim: int
    kv_stride: int = 1
    kv_heads: int = 1
    dw_kernel: int = 3
    stride: int = field(default=1, init=False)


BlockSpec = ConvBNSpec | FusedIBSpec | UIBSpec | AttentionSpec
_BLOCK_TYPES: dict[str, type] = {
    "convbn": ConvBNSpec,
    "fused_ib": FusedIBSpec,
    "uib": UIBSpec,
    "attention": AttentionSpec,
}
_TYPE_NAMES = {cls: name for name, cls in _BLOCK_TYPES.items()}


def cn(kernel: int, stride: int, out: int) -> ConvBNSpec:
    return ConvBNSpec(out, kernel, stride)


def fib(kernel: int, stride: int, out: int, expand: float = 4.0) -> FusedIBSpec:
    return FusedIBSpec(out, kernel, stride, expand)


def uib(start_dw: int, mid_dw: int, stride: int, out: int, expand: float = 4.0) -> UIBSpec:
    return UIBSpec(start_dw, mid_dw, stride, out, expand)


def mqa(heads: int, dim: int, kv_stride: int = 1) -> AttentionSpec:
    return AttentionSpec(heads, dim, dim, kv_stride, kv_heads=1)


def mhsa(heads: int, dim: int, kv_stride: int = 1) -> AttentionSpec:
    return AttentionSpec(heads, dim, dim, kv_stride, kv_heads=heads)


@dataclass(frozen=True)
class ModelSpec:
    """A whole MNv4-style network. ``stages`` must hold four stages (strides 4, 8, 16, 32)."""

    name: str
    stem: ConvBNSpec
    stages: tuple[tuple[BlockSpec, ...], ...]
    act: str = "relu"
    layer_scale_init: float | None = None
    num_features: int = 960
    head_hidden_size: int = 1280
    # How stage blocks reduce resolution: "conv" (strided conv), "avg" or "blur" (stride-1 conv, then a
    # pool after BN and activation; timm's anti-aliased variants). The stem always strides its conv.
    downsample: str = "conv"

    def __post_init__(self) -> None:
        from .blocks import DOWNSAMPLES

        if self.downsample not in DOWNSAMPLES:
            raise ValueError(f"{self.name}: unknown downsample {self.downsample!r}; choose one of {DOWNSAMPLES}")
        if len(self.stages) != 4:
            raise ValueError(f"{self.name}: a ModelSpec needs 4 stages (strides 4/8/16/32), got {len(self.stages)}")
        for i, stage in enumerate(self.stages):
            if not stage:
                raise ValueError(f"{self.name}: stage {i} is empty")

    @property
    def blocks(self) -> list[BlockSpec]:
        return [b for stage in self.stages for b in stage]

    def scaled(self, multiplier: float, name: str | None = None) -> ModelSpec:
        """Width-scaled copy, following timm's width variants: every block width and the 960 conv
        are rounded with make_divisible(c * m, 8); the stem (when m < 1) and the 1280 head stay fixed."""
        from .blocks import make_divisible

        if multiplier == 1.0:
            return dataclasses.replace(self, name=name or self.name)

        def scale(b: BlockSpec) -> BlockSpec:
            if isinstance(b, AttentionSpec):
                return b
            return dataclasses.replace(b, out=make_divisible(b.out * multiplier))

        stem = self.stem if multiplier < 1.0 else scale(self.stem)
        return dataclasses.replace(
            self,
            name=name or f"{self.name}_x{multiplier}",
            stem=stem,
            stages=tuple(tuple(scale(b) for b in stage) for stage in self.stages),
            num_features=make_divisible(self.num_features * multiplier),
        )

    def to_dict(self) -> dict[str, Any]:
        def block(b: BlockSpec) -> dict[str, Any]:
            d = {"type": _TYPE_NAMES[type(b)]}
            d.update({f.name: getattr(b, f.name) for f in dataclasses.fields(b) if f.init})
            return d

        return {
            "name": self.name,
            "stem": block(self.stem),
            "stages": [[block(b) for b in stage] for stage in self.stages],
            "act": self.act,
            "layer_scale_init": self.layer_scale_init,
            "num_features": self.num_features,
            "head_hidden_size": self.head_hidden_size,
            "downsample": self.downsample,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        def block(b: dict[str, Any]) -> BlockSpec:
            b = dict(b)
            kind = b.pop("type")
            if kind not in _BLOCK_TYPES:
                raise ValueError(f"unknown block type {kind!r}; known: {sorted(_BLOCK_TYPES)}")
            return _BLOCK_TYPES[kind](**b)

        return cls(
            name=d["name"],
            stem=block(d["stem"]),
            stages=tuple(tuple(block(b) for b in stage) for stage in d["stages"]),
            act=d.get("act", "relu"),
            layer_scale_init=d.get("layer_scale_init"),
            num_features=d.get("num_features", 960),
            head_hidden_size=d.get("head_hidden_size", 1280),
            downsample=d.get("downsample", "conv"),
        )


# --- the five published models (TF Model Garden block specs, docs/architecture.md §3) ---------------------------

# Conv-S has no FusedIB in TF: its "FusedIB" rows are two separate conv-BN-ReLU layers (docs/architecture.md §6).
CONV_SMALL = ModelSpec(
    name="mnv4_conv_small",
    stem=cn(3, 2, 32),
    stages=(
        (cn(3, 2, 32), cn(1, 1, 32)),
        (cn(3, 2, 96), cn(1, 1, 64)),
        (
            uib(5, 5, 2, 96, 3.0),
            *[uib(0, 3, 1, 96, 2.0)] * 4,
            uib(3, 0, 1, 96, 4.0),
        ),
        (
            uib(3, 3, 2, 128, 6.0),
            uib(5, 5, 1, 128, 4.0),
            uib(0, 5, 1, 128, 4.0),
            uib(0, 5, 1, 128, 3.0),
            uib(0, 3, 1, 128, 4.0),
            uib(0, 3, 1, 128, 4.0),
        ),
    ),
)

_MEDIUM_STAGE3 = (uib(3, 5, 2, 80, 4.0), uib(3, 3, 1, 80, 2.0))

CONV_MEDIUM = ModelSpec(
    name="mnv4_conv_medium",
    stem=cn(3, 2, 32),
    stages=(
        (fib(3, 2, 48),),
        _MEDIUM_STAGE3,
        (
            uib(3, 5, 2, 160, 6.0),
            uib(3, 3, 1, 160, 4.0),
            uib(3, 3, 1, 160, 4.0),
            uib(3, 5, 1, 160, 4.0),
            uib(3, 3, 1, 160, 4.0),
            uib(3, 0, 1, 160, 4.0),
            uib(0, 0, 1, 160, 2.0),
            uib(3, 0, 1, 160, 4.0),
        ),
        (
            uib(5, 5, 2, 256, 6.0),
            uib(5, 5, 1, 256, 4.0),
            uib(3, 5, 1, 256, 4.0),
            uib(3, 5, 1, 256, 4.0),
            uib(0, 0, 1, 256, 4.0),
            uib(3, 0, 1, 256, 4.0),
            uib(3, 5, 1, 256, 2.0),
            uib(5, 5, 1, 256, 4.0),
            uib(0, 0, 1, 256, 4.0),
            uib(0, 0, 1, 256, 4.0),
            uib(5, 0, 1, 256, 2.0),
        ),
    ),
)

# Hybrid-M follows the TF code, not the paper's Tab. 13 (they disagree; docs/architecture.md §6).
_HM_MQA_S16 = mqa(4, 64, kv_stride=2)
_HM_MQA_S32 = mqa(4, 64, kv_stride=1)
HYBRID_MEDIUM = ModelSpec(
    name="mnv4_hybrid_medium",
    stem=cn(3, 2, 32),
    stages=(
        (fib(3, 2, 48),),
        _MEDIUM_STAGE3,
        (
            uib(3, 5, 2, 160, 6.0),
            uib(0, 0, 1, 160, 2.0),
            uib(3, 3, 1, 160, 4.0),
            uib(3, 5, 1, 160, 4.0),
            _HM_MQA_S16,
            uib(3, 3, 1, 160, 4.0),
            _HM_MQA_S16,
            uib(3, 0, 1, 160, 4.0),
            _HM_MQA_S16,
            uib(3, 3, 1, 160, 4.0),
            _HM_MQA_S16,
            uib(3, 0, 1, 160, 4.0),
        ),
        (
            uib(5, 5, 2, 256, 6.0),
            uib(5, 5, 1, 256, 4.0),
            uib(3, 5, 1, 256, 4.0),
            uib(3, 5, 1, 256, 4.0),
            uib(0, 0, 1, 256, 2.0),
            uib(3, 5, 1, 256, 2.0),
            uib(0, 0, 1, 256, 2.0),
            uib(0, 0, 1, 256, 4.0),
            _HM_MQA_S32,
            uib(3, 0, 1, 256, 4.0),
            _HM_MQA_S32,
            uib(5, 5, 1, 256, 4.0),
            _HM_MQA_S32,
            uib(5, 0, 1, 256, 4.0),
            _HM_MQA_S32,
            uib(5, 0, 1, 256, 4.0),
        ),
    ),
    layer_scale_init=1e-5,
)

_LARGE_STAGE3 = (uib(3, 5, 2, 96), uib(3, 3, 1, 96))
_LARGE_STAGE4_HEAD = (
    uib(3, 5, 2, 192),
    uib(3, 3, 1, 192),
    uib(3, 3, 1, 192),
    uib(3, 3, 1, 192),
    uib(3, 5, 1, 192),
)
_LARGE_STAGE5_HEAD = (
    uib(5, 5, 2, 512),
    uib(5, 5, 1, 512),
    uib(5, 5, 1, 512),
    uib(5, 5, 1, 512),
    uib(5, 0, 1, 512),
    uib(5, 3, 1, 512),
    uib(5, 0, 1, 512),
    uib(5, 0, 1, 512),
    uib(5, 3, 1, 512),
    uib(5, 5, 1, 512),
)

CONV_LARGE = ModelSpec(
    name="mnv4_conv_large",
    stem=cn(3, 2, 24),
    stages=(
        (fib(3, 2, 48),),
        _LARGE_STAGE3,
        (*_LARGE_STAGE4_HEAD, *[uib(5, 3, 1, 192)] * 5, uib(3, 0, 1, 192)),
        (*_LARGE_STAGE5_HEAD, *[uib(5, 0, 1, 512)] * 3),
    ),
)

_HL_MQA_S16 = mqa(8, 48, kv_stride=2)
_HL_MQA_S32 = mqa(8, 64, kv_stride=1)
HYBRID_LARGE = ModelSpec(
    name="mnv4_hybrid_large",
    stem=cn(3, 2, 24),
    stages=(
        (fib(3, 2, 48),),
        _LARGE_STAGE3,
        (
            *_LARGE_STAGE4_HEAD,
            uib(5, 3, 1, 192),
            uib(5, 3, 1, 192),
            *[_HL_MQA_S16, uib(5, 3, 1, 192)] * 3,
            _HL_MQA_S16,
            uib(3, 0, 1, 192),
        ),
        (*_LARGE_STAGE5_HEAD, *[_HL_MQA_S32, uib(5, 0, 1, 512)] * 4),
    ),
    act="gelu",  # TF builds Hybrid-L with exact GELU in stem, FusedIB, UIBs and head (docs/architecture.md §2.1)
    layer_scale_init=1e-5,
)

MODEL_SPECS: dict[str, ModelSpec] = {
    s.name: s for s in (CONV_SMALL, CONV_MEDIUM, HYBRID_MEDIUM, CONV_LARGE, HYBRID_LARGE)
}


def read_spec_file(path: Any) -> ModelSpec:
    """The one reader of spec files: a JSON (or YAML) ``ModelSpec.to_dict`` mapping, such as the ``spec.json``
    that ``mnv4 search`` writes, or one wrapped as ``{"spec": {...}}``. Every failure (missing, unreadable,
    not text, not a spec) is one MNv4Error naming the file."""
    from ..errors import MNv4Error
    from ..files import read_mapping

    d = read_mapping(path, "spec file", "a model spec: name, stem, stages, ...")
    d = d.get("spec", d) if isinstance(d.get("spec"), dict) else d
    try:
        return ModelSpec.from_dict(d)
    except KeyError as e:
        raise MNv4Error(
            f"{path} is not a model spec: it has no {e.args[0]!r} field (what `mnv4 search` writes)"
        ) from None
    except (TypeError, ValueError, AttributeError) as e:
        raise MNv4Error(f"{path} is not a model spec ({' '.join(str(e).split())})") from None
