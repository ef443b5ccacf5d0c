"""``create_model``: the one entry point from a name, spec or checkpoint to a ready model."""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import MNv4Error
from .models.meta import WeightsMeta, set_weights_meta
from .models.mobilenetv4 import MobileNetV4
from .models.registry import MODELS, Preprocess, get_entry, split_name
from .models.specs import ModelSpec
from .weights.checkpoint import load_weights
from .weights.hub import HUB_PREFIX, download_repo, download_weights
from .weights.io import read_checkpoint
from .weights.timm import is_timm_state_dict, timm_to_mnv4

__all__ = ["create_model", "infer_architecture"]


def _fits(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    if is_timm_state_dict(sd):
        sd = timm_to_mnv4(sd, model)
    keys = {k for k in own if not k.endswith("num_batches_tracked") and not k.startswith("classifier.")}
    return all(k in sd and sd[k].shape == own[k].shape for k in keys)


def infer_architecture(sd: dict[str, torch.Tensor]) -> str:
    """The registered architecture whose parameter names and shapes match ``sd``."""
    for name, entry in MODELS.items():
        with torch.device("meta"):
            model = MobileNetV4(entry.spec, num_classes=0)
        if _fits(model, sd):
            return name
    raise MNv4Error("the checkpoint matches no registered MobileNetV4; pass `model` explicitly")


def _resolve_spec(name: str | ModelSpec | None, cfg: dict[str, Any] | None, sd) -> tuple[ModelSpec, Any]:
    """(spec, registry entry or None) from the requested name and the checkpoint's own config."""
    ckpt_arch = None
    if cfg:
        ckpt_arch = cfg.get("architecture")
        if ckpt_arch is not None:
            ckpt_arch = split_name(str(ckpt_arch))[0].replace("mobilenetv4_", "mnv4_")
    if isinstance(name, ModelSpec):
        return name, None
    if name is None:
        if cfg and "spec" in cfg:
            return ModelSpec.from_dict(cfg["spec"]), None
        if ckpt_arch is None and sd is not None:
            ckpt_arch = infer_architecture(sd)
        if ckpt_arch is None:
            raise MNv4Error("no `model` given; pass a name (see `mnv4 models`) or a `checkpoint` that names it")
        name = ckpt_arch
    entry = get_entry(name)
    if ckpt_arch is not None and ckpt_arch in MODELS and ckpt_arch != entry.name:
        raise MNv4Error(f"the checkpoint is for {ckpt_arch}, not {entry.name}; pass `model` {ckpt_arch}")
    return entry.spec, entry


def create_model(
    name: str | ModelSpec | None = None,
    num_classes: int | None = None,
    pretrained: bool | str = False,
    checkpoint: str | os.PathLike | None = None,
    **overrides: Any,
) -> MobileNetV4:
    """Build a MobileNetV4.

    Args:
        name: a registered name (``mnv4_conv_small``, timm's ``mobilenetv4_conv_small``, optionally
            ``.tag``), a custom :class:`ModelSpec`, ``hf-hub:OWNER/REPO[@REVISION]`` (a Hugging Face Hub
            model in timm's layout, as ``mnv4 hub push`` writes), or None to take it from ``checkpoint``.
        num_classes: classifier size; defaults to the checkpoint's or the weights' (else 1000).
        pretrained: True for the default timm weights, or a tag string; fetched from the hub.
        checkpoint: a local timm- or mnv4-format file, or a hub-layout folder (``config.json`` +
            ``model.safetensors``), to load.
        **overrides: MobileNetV4 options: ``in_chans``, ``drop_rate``, ``drop_path_rate``,
            ``drop_path_schedule``, ``output_stride``, ``features_only``, ``out_indices``,
            ``feature_location``, ``act``, ``bn_eps``, ``bn_momentum``, ``layer_scale_init``.
    """
    hub_source = None
    if isinstance(name, str) and name.startswith(HUB_PREFIX):
        if checkpoint is not None or pretrained:
            raise MNv4Error(f"{name} names its own weights; pass no `checkpoint` or `pretrained` with it")
        hub_source, name, checkpoint = name, None, download_repo(name[len(HUB_PREFIX) :])
    if pretrained and checkpoint is not None:
        raise MNv4Error("pass either pretrained=... or checkpoint=..., not both")
    sd = cfg = None
    if checkpoint is not None:
        sd, cfg = read_checkpoint(checkpoint)
        if cfg and cfg.get("format") == "mnv4-detector":  # mnv4.detect.io.DETECTOR_FORMAT (not imported: torch-light)
            raise MNv4Error(
                f"{checkpoint} is a detector, not a classifier: use it with `mnv4 detect eval|predict` or "
                "`mnv4 export` (in Python: mnv4.detect.load_detector); classifier commands take classifier weights"
            )
    spec, entry = _resolve_spec(name, cfg, sd)

    tag_name = split_name(name)[1] if isinstance(name, str) else None
    if isinstance(pretrained, str):
        tag_name = pretrained
    tag = None
    if entry is not None and (pretrained or tag_name):
        tag = entry.get_tag(tag_name)
    if pretrained:
        source = tag.hub_id
        sd, cfg = read_checkpoint(download_weights(tag.hub_id))
    else:
        source = hub_source or (str(checkpoint) if checkpoint is not None else None)

    if num_classes is None:
        if sd is not None and "classifier.weight" in sd:
            num_classes = sd["classifier.weight"].shape[0]
        elif cfg and isinstance(cfg.get("num_classes"), int):
            num_classes = cfg["num_classes"]
        else:
            num_classes = tag.num_classes if tag else 1000
    if cfg and cfg.get("format") == "mnv4":
        for key in ("in_chans", "bn_eps"):  # bn_eps: hub configs record a non-default epsilon
            if key in cfg and key not in overrides:
                overrides[key] = cfg[key]

    try:
        model = MobileNetV4(spec, num_classes=num_classes, **overrides)
    except (TypeError, ValueError) as e:
        raise MNv4Error(f"cannot build {spec.name}: {e}") from None
    set_weights_meta(model, _weights_meta(tag, cfg, entry, source if sd is not None else None))
    if sd is not None:
        try:
            load_weights(model, sd, source=source or "checkpoint")
        except MNv4Error:
            other = _registered_fit(sd)
            if other and other != spec.name:
                raise MNv4Error(f"the checkpoint is for {other}, not {spec.name}; pass `model` {other}") from None
            raise
    return model


# Keys of an mnv4 checkpoint's config that describe the model; the rest is the summary of the run
# that wrote it (epoch, val_top1, ...: mnv4.train.Trainer's extra).
_MODEL_KEYS = (
    "format",
    "version",
    "architecture",
    "num_classes",
    "in_chans",
    "bn_eps",
    "spec",
    "preprocess",
    "class_names",
)


def _weights_meta(tag, cfg: dict[str, Any] | None, entry, source: str | None) -> WeightsMeta:
    """The record of the weights create_model built (mnv4.models.meta): the one place it is made."""
    if tag is not None:
        pp = tag.preprocess
    elif cfg and isinstance(cfg.get("preprocess"), dict):
        pp = Preprocess.from_dict(cfg["preprocess"])
    else:
        pp = entry.default_preprocess if entry is not None else Preprocess()
    names = tuple(cfg["class_names"]) if cfg and cfg.get("class_names") else None
    training = {k: v for k, v in cfg.items() if k not in _MODEL_KEYS} if cfg and cfg.get("format") == "mnv4" else {}
    return WeightsMeta(pp, names, source, tag.tag if tag else None, random=source is None, training=training or None)


def _registered_fit(sd: dict[str, torch.Tensor]) -> str | None:
    try:
        return infer_architecture(sd)
    except MNv4Error:
        return None
