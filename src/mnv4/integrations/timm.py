"""mnv4 models in timm's registry (opt-in): ``import mnv4.integrations.timm`` and then
``timm.create_model("mnv4_conv_small")`` builds mnv4's model (docs/timm.md).

Every registered mnv4 architecture becomes a timm model of the same name (timm's own MobileNetV4s keep
their ``mobilenetv4_*`` names), and :func:`register_spec` adds an architecture from ``mnv4 search``.
The entry points take timm's arguments: ``pretrained`` (mnv4's download of the default or named tag),
``pretrained_cfg`` (a tag, as ``name.tag`` passes it), ``pretrained_cfg_overlay=dict(file=...)`` (a local
timm- or mnv4-format checkpoint) and the model options both libraries share (``num_classes``, ``in_chans``,
``drop_rate``, ``drop_path_rate``, ``features_only``, ``out_indices``, ``output_stride``). Models carry
``pretrained_cfg`` (their preprocessing, as ``timm.data.resolve_data_config`` reads it), and feature
models a ``feature_info`` with timm's ``channels()`` / ``reduction()``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import MNv4Error
from ..models.mobilenetv4 import MobileNetV4
from ..models.registry import MODELS
from ..models.specs import ModelSpec

try:
    import timm
    from timm.models import register_model
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError("mnv4.integrations.timm needs timm: pip install 'mnv4[timm]' (or pip install timm)") from None

__all__ = ["register_spec", "registered"]

_REGISTERED: dict[str, str | ModelSpec] = {}


class FeatureInfo(list):
    """mnv4's ``feature_info`` list of dicts, with the accessors timm's feature models have."""

    def _get(self, key: str, idx: int | list[int] | None) -> Any:
        if idx is None:
            return [f[key] for f in self]
        if isinstance(idx, (list, tuple)):
            return [self[i][key] for i in idx]
        return self[idx][key]

    def channels(self, idx: int | list[int] | None = None) -> Any:
        return self._get("num_chs", idx)

    def reduction(self, idx: int | list[int] | None = None) -> Any:
        return self._get("reduction", idx)

    def module_name(self, idx: int | list[int] | None = None) -> Any:
        return self._get("module", idx)


def _pretrained_cfg(model: MobileNetV4, name: str) -> dict[str, Any]:
    """timm's pretrained_cfg fields for ``model``'s preprocessing (what resolve_data_config reads)."""
    pp = model.preprocess
    cfg: dict[str, Any] = {
        "architecture": name,
        "tag": model.pretrained_tag,
        "num_classes": model.num_classes,
        "input_size": (model.stem.conv.in_channels, pp.input_size, pp.input_size),
        "crop_pct": pp.crop_pct,
        "crop_mode": "center",
        "interpolation": pp.interpolation,
        "mean": tuple(pp.mean),
        "std": tuple(pp.std),
        "first_conv": "stem.conv",
        "classifier": "classifier",
    }
    if pp.test_input_size:
        cfg["test_input_size"] = (cfg["input_size"][0], pp.test_input_size, pp.test_input_size)
        cfg["test_crop_pct"] = pp.test_crop_pct
    return cfg


def _build(
    name: str,
    arch: str | ModelSpec,
    pretrained: bool,
    pretrained_cfg: Any,
    pretrained_cfg_overlay: dict[str, Any] | None,
    kwargs: dict[str, Any],
) -> MobileNetV4:
    from ..factory import create_model

    tag = pretrained_cfg if isinstance(pretrained_cfg, str) and pretrained_cfg else None
    file = (pretrained_cfg_overlay or {}).get("file")
    if isinstance(arch, ModelSpec) and (tag or (pretrained and not file)):
        raise MNv4Error(f"{name} is a custom architecture with no published weights; pass a checkpoint file")
    requested = f"{arch}.{tag}" if tag and isinstance(arch, str) else arch
    if pretrained and file:
        model = create_model(requested, checkpoint=file, **kwargs)
    else:
        model = create_model(requested, pretrained=bool(pretrained), **kwargs)
    model.pretrained_cfg = _pretrained_cfg(model, name)
    model.default_cfg = model.pretrained_cfg  # the older name some timm-based code still reads
    if model.features_only:
        model.feature_info = FeatureInfo(model.feature_info)
    return model


def _register(name: str, arch: str | ModelSpec) -> Callable[..., MobileNetV4]:
    def entry(
        pretrained: bool = False,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: dict[str, Any] | None = None,
        cache_dir: str | None = None,  # timm's download folder; mnv4 downloads to the Hugging Face cache
        **kwargs: Any,
    ) -> MobileNetV4:
        return _build(name, arch, pretrained, pretrained_cfg, pretrained_cfg_overlay, kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"mnv4's {arch if isinstance(arch, str) else arch.name} (registered by mnv4.integrations.timm)"
    setattr(sys.modules[__name__], name, entry)  # timm lists entry points in their module's __all__
    register_model(entry)
    _REGISTERED[name] = arch
    return entry


def register_spec(spec: ModelSpec | dict | str | os.PathLike, name: str | None = None) -> str:
    """Make a custom architecture a timm model: ``spec`` is a :class:`ModelSpec`, its dict, a ``spec.json``
    (``mnv4 search`` writes one) or the search's output folder. Returns the timm name (default: the spec's).
    A name timm already has for a model of its own is refused, so nothing of timm's is shadowed."""
    from ..models.specs import read_spec_file

    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        spec = read_spec_file(path / "spec.json" if path.is_dir() else path)
    elif isinstance(spec, dict):
        try:
            spec = ModelSpec.from_dict(spec)
        except (KeyError, TypeError, ValueError) as e:
            raise MNv4Error(f"not a model spec ({type(e).__name__}: {e})") from None
    if not isinstance(spec, ModelSpec):
        raise MNv4Error(f"register_spec takes a ModelSpec, its dict or a spec.json path, got {type(spec).__name__}")
    name = name or spec.name
    if not name.isidentifier():
        raise MNv4Error(f"timm model names must be Python identifiers; got {name!r}")
    if timm.is_model(name) and name not in _REGISTERED:
        raise MNv4Error(f"timm already has a model named {name!r}; register the spec under another name")
    _register(name, spec)
    return name


def registered() -> dict[str, str | ModelSpec]:
    """The timm names this module registered, with the mnv4 architecture (or spec) each builds."""
    return dict(_REGISTERED)


for _name in MODELS:
    _register(_name, _name)
