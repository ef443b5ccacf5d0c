"""``create_detector``: a detector from a backbone name or spec, a head and the class list."""

from __future__ import annotations

import os
from typing import Any

from ..errors import MNv4Error, check_choice, check_float, check_int
from ..models.mobilenetv4 import FEATURE_LOCATIONS, MobileNetV4
from ..models.registry import MODELS, get_entry
from ..models.specs import ModelSpec
from ..weights.io import read_checkpoint
from .anchors import AUTO, AUTO_OPTIONS
from .io import DETECTOR_FORMAT, is_detector_config
from .model import BOX_LOSSES, RETINANET_OPTIONS, SSDLITE_OPTIONS, Detector, feature_levels
from .registry import split_detector_name
from .transforms import RESIZE_MODES

__all__ = ["create_detector", "build_from_config", "load_detector"]

_DEFAULTS = {"retinanet": RETINANET_OPTIONS, "ssdlite": SSDLITE_OPTIONS}


def _check_options(head: str, options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_DEFAULTS[head]))
    if unknown:
        raise MNv4Error(f"unknown {head} option(s) {', '.join(unknown)}; known: {', '.join(_DEFAULTS[head])}")
    opts = {**_DEFAULTS[head], **options}
    for key in AUTO_OPTIONS[head]:
        if isinstance(options.get(key), str) and options[key] != AUTO:
            raise MNv4Error(f"`{key}` {options[key]!r} is invalid: give a value or auto (fitted to the training boxes)")
    auto = [k for k, v in options.items() if v == AUTO and k in AUTO_OPTIONS[head]]
    if auto:
        raise MNv4Error(
            f"{', '.join(f'`{k}: auto`' for k in auto)}: auto is fitted to training boxes, which "
            "`mnv4 detect train` does; in Python resolve it first with mnv4.detect.anchors.fit_anchor_options "
            '(docs/detection.md "Anchors that fit the data")'
        )
    if head == "retinanet":
        check_int("width", opts["width"], 8)
        check_int("num_convs", opts["num_convs"], 0)
        check_choice("p6p7_from", opts["p6p7_from"], ("p5", "c5"))
        check_choice("box_loss", opts["box_loss"], BOX_LOSSES)
        check_float("anchor_scale", opts["anchor_scale"], 0, lo_open=True)
        for key in ("head_separable", "fpn_separable"):
            check_choice(key, opts[key], (True, False))
    else:
        opts["extra_widths"] = [check_int("extra_widths", w, 2) for w in opts["extra_widths"]]
        check_choice("feature_location", opts["feature_location"], (*FEATURE_LOCATIONS, AUTO))
        levels = opts["levels"]
        if not isinstance(levels, list | tuple) or list(levels) not in ([4], [3, 4], [2, 3, 4], [1, 2, 3, 4]):
            raise MNv4Error(
                f"`levels` {levels!r} is invalid: give consecutive backbone levels ending at the stride-32 one, "
                "e.g. [3, 4] (strides 16, 32; the default) or [2, 3, 4] (adds stride 8)"
            )
        opts["levels"] = [int(v) for v in levels]
        lo = check_float("min_ratio", opts["min_ratio"], 0.0, 1.0, lo_open=True, hi_open=True)
        hi = check_float("max_ratio", opts["max_ratio"], 0.0, 1.0, lo_open=True)
        if lo >= hi:
            raise MNv4Error(f"`min_ratio` {lo:g} must be below `max_ratio` {hi:g} (smallest and largest box scales)")
        opts["min_ratio"], opts["max_ratio"] = lo, hi
        if opts["scales"] is not None:
            n = len(opts["levels"]) + len(opts["extra_widths"]) + 1
            sc = opts["scales"]
            if not isinstance(sc, list | tuple) or len(sc) != n:
                raise MNv4Error(
                    f"`scales` needs {n} numbers (one per map, {n - 1} maps, plus one), got {sc!r}; or auto"
                )
            sc = [check_float("scales", v, 0.0, 1.0, lo_open=True) for v in sc]
            if any(b <= a for a, b in zip(sc, sc[1:])):
                raise MNv4Error(f"`scales` {sc} must increase (map by map, from the finest)")
            opts["scales"] = sc
    if opts["bn_eps"] is not None:
        opts["bn_eps"] = check_float("bn_eps", opts["bn_eps"], 0.0, 1.0, lo_open=True)
    if opts["bn_momentum"] is not None:
        opts["bn_momentum"] = check_float("bn_momentum", opts["bn_momentum"], 0.0, 1.0, lo_open=True)
    return opts


def _classes(num_classes: int | None, classes: list[str] | None) -> list[str]:
    if classes is not None:
        classes = [str(c) for c in classes]
        if num_classes is not None and num_classes != len(classes):
            raise MNv4Error(f"`num_classes` {num_classes} differs from the {len(classes)} names in `classes`")
        if not classes:
            raise MNv4Error("`classes` is empty; a detector needs at least one class")
        return classes
    if num_classes is None:
        raise MNv4Error("pass `num_classes` (or `classes`, the class names)")
    check_int("num_classes", num_classes, 1)
    return [str(i) for i in range(num_classes)]


def _body_options(head: str, options: dict[str, Any], drop_path_rate: float) -> dict[str, Any]:
    """The features_only MobileNetV4 options a head reads its levels with."""
    location = options.get("feature_location", "stage")
    bn = {k: options[k] for k in ("bn_eps", "bn_momentum") if options.get(k) is not None}
    return dict(
        features_only=True,
        out_indices=feature_levels(head, options),
        feature_location=location,
        drop_path_rate=drop_path_rate,
        **bn,
    )


def _body(spec: ModelSpec, head: str, options: dict[str, Any], drop_path_rate: float) -> MobileNetV4:
    try:
        return MobileNetV4(spec, num_classes=0, **_body_options(head, options, drop_path_rate))
    except (TypeError, ValueError) as e:
        raise MNv4Error(f"cannot build a {head} backbone from {spec.name}: {e}") from None


def _resolve_feature_location(spec: ModelSpec, head: str, opts: dict[str, Any]) -> str:
    """``feature_location: auto``: the expansion maps where every tapped level has one, else the stage ends
    (a searched spec may start a stage with a block whose stride comes before its 1x1 expansion)."""
    try:
        _body(spec, head, {**opts, "feature_location": "expansion"}, 0.0)
    except MNv4Error:
        return "stage"
    return "expansion"


def build_from_config(cfg: dict[str, Any]) -> Detector:
    """A detector with fresh weights, rebuilt from a saved config (``Detector.config``)."""
    try:
        spec = ModelSpec.from_dict(cfg["spec"]) if "spec" in cfg else get_entry(cfg["backbone"]).spec
        body = _body(spec, cfg["head"], cfg["head_options"], float(cfg.get("drop_path_rate", 0.0)))
        return Detector(cfg, body)
    except (KeyError, TypeError, ValueError) as e:
        raise MNv4Error(f"the detector config is incomplete or damaged ({type(e).__name__}: {e})") from None


def _backbone_model(
    model: str | ModelSpec, head: str, options: dict[str, Any], pretrained, backbone_checkpoint, drop_path_rate: float
) -> MobileNetV4:
    """The features_only backbone, with weights from a timm tag, a classifier checkpoint, or none."""
    from ..factory import create_model

    if pretrained and backbone_checkpoint is not None:
        raise MNv4Error("pass either `pretrained` or `backbone_checkpoint`, not both")
    if pretrained and isinstance(model, ModelSpec):
        raise MNv4Error("published weights exist for registered backbones only; pass a `backbone_checkpoint`")
    if not pretrained and backbone_checkpoint is None:
        spec = model if isinstance(model, ModelSpec) else get_entry(model).spec
        body = _body(spec, head, options, drop_path_rate)
        body.preprocess = None if isinstance(model, ModelSpec) else get_entry(model).default_preprocess
        return body
    kwargs = _body_options(head, options, drop_path_rate)
    return create_model(model, pretrained=pretrained or False, checkpoint=backbone_checkpoint, **kwargs)


def create_detector(
    model: str | ModelSpec = "mnv4_conv_small",
    *,
    head: str | None = None,
    num_classes: int | None = None,
    classes: list[str] | None = None,
    image_size: int = 320,
    backbone_checkpoint: str | os.PathLike | None = None,
    pretrained: str | bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    drop_path_rate: float = 0.0,
    resize: str = "letterbox",
    **head_options: Any,
) -> Detector:
    """Build a detector (docs/detection.md).

    Args:
        model: a backbone name (``mnv4_conv_medium``), a detector name (``retinanet_mnv4_conv_medium``,
            see ``list_detectors``), or a :class:`ModelSpec` (e.g. from ``mnv4 search``).
        head: ``"retinanet"`` (default; the paper's) or ``"ssdlite"``; implied by a detector name.
        num_classes: the number of classes (or give ``classes``); labels are 0..num_classes-1.
        classes: the class names (their count sets ``num_classes``).
        image_size: the square input side the data pipeline letterboxes to.
        backbone_checkpoint: an mnv4 or timm classification checkpoint for the backbone (head keys ignored).
        pretrained: True or a timm weight tag for the backbone, downloaded from the hub.
        checkpoint: a saved detector (``save_detector``); everything else is read from it. With other
            ``classes`` (or ``num_classes``) its class-score layers start fresh (:func:`with_new_classes`).
        drop_path_rate: the backbone's stochastic depth (the paper: 0.2).
        resize: how images reach ``image_size``: ``letterbox`` (aspect kept, padded) or ``fixed`` (stretched);
            saved with the detector so evaluation, prediction and export calibration resize as training did.
        **head_options: RETINANET_OPTIONS / SSDLITE_OPTIONS overrides (``width``, ``num_convs``, ...).
    """
    if checkpoint is not None:
        detector = load_detector(checkpoint)
        if classes is None and num_classes is not None and num_classes != detector.num_classes:
            classes = [str(i) for i in range(num_classes)]
        if classes is not None and list(classes) != detector.classes:
            return with_new_classes(detector, _classes(None, classes))
        return detector
    names = _classes(num_classes, classes)
    check_int("image_size", image_size, 32)
    check_choice("resize", resize, RESIZE_MODES)
    check_float("drop_path_rate", drop_path_rate, 0.0, 1.0, hi_open=True)
    if isinstance(model, ModelSpec):
        head = check_choice("head", head or "retinanet", _DEFAULTS)
        backbone: str | ModelSpec = model
    elif isinstance(model, str):
        head, backbone = split_detector_name(model, head)
        get_entry(backbone)  # unknown names end here, with suggestions
    else:
        raise MNv4Error(f"`model` must be a name or a ModelSpec, not {type(model).__name__}")
    opts = _check_options(head, head_options)
    if opts.get("feature_location") == AUTO:  # resolved here, so the saved config holds the value
        spec = backbone if isinstance(backbone, ModelSpec) else get_entry(backbone).spec
        opts["feature_location"] = _resolve_feature_location(spec, head, opts)
    body = _backbone_model(backbone, head, opts, pretrained, backbone_checkpoint, drop_path_rate)
    pre = body.preprocess
    cfg: dict[str, Any] = {
        "format": DETECTOR_FORMAT,
        "version": 1,
        "head": head,
        "backbone": body.spec.name,
        "classes": names,
        "image_size": image_size,
        "resize": resize,
        "drop_path_rate": drop_path_rate,
        "head_options": opts,
        "preprocess": {"mean": list(pre.mean), "std": list(pre.std)} if pre else _default_preprocess(),
    }
    if body.spec.name not in MODELS or MODELS[body.spec.name].spec != body.spec:
        cfg["spec"] = body.spec.to_dict()
    detector = Detector(cfg, body)
    detector.backbone_source = getattr(body, "weights_source", None)
    return detector


def _default_preprocess() -> dict[str, list[float]]:
    from ..models.registry import Preprocess

    pre = Preprocess()
    return {"mean": list(pre.mean), "std": list(pre.std)}


def with_new_classes(detector: Detector, classes: list[str]) -> Detector:
    """``detector`` for another class list (fine-tuning on new data): every weight is kept except the class
    scores' layers, which start fresh (torchvision's initialisation, RetinaNet's prior-probability bias).

    The class-dependent layers are found by shape, building the config at two class counts, so the same
    count under other names also gets a fresh classifier (its old rows would mean other classes)."""
    cfg = {**detector.config, "classes": list(classes)}
    fresh = build_from_config(cfg)
    probe = build_from_config({**cfg, "classes": [*classes, "\0probe"]}).state_dict()
    own = fresh.state_dict()
    class_keys = {k for k, v in own.items() if k in probe and probe[k].shape != v.shape}
    kept = {k: v for k, v in detector.state_dict().items() if k in own and k not in class_keys}
    fresh.load_state_dict(kept, strict=False)
    fresh.backbone_source = getattr(detector, "backbone_source", None)
    fresh.replaced_classes = list(detector.classes)
    return fresh


def load_detector(path: str | os.PathLike) -> Detector:
    """The detector saved at ``path``, rebuilt from its own config."""
    sd, cfg = read_checkpoint(path)
    if not is_detector_config(cfg):
        raise MNv4Error(
            f"{path} is not an mnv4 detector checkpoint (no {DETECTOR_FORMAT} metadata); "
            "a classifier's weights work with `mnv4 predict|eval`, or start a detector's backbone "
            "(`mnv4 detect train --backbone-checkpoint`, create_detector(backbone_checkpoint=...))"
        )
    detector = build_from_config(cfg)
    try:
        result = detector.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise MNv4Error(f"{path} does not fit its own config ({str(e).splitlines()[-1].strip()[:160]})") from None
    problems = [*result.missing_keys, *result.unexpected_keys]
    if problems:
        raise MNv4Error(f"{path} does not fit its own config ({', '.join(problems[:3])}); the file is damaged")
    return detector
