"""Detection training configuration and recipes as data (the classification counterpart: mnv4/train/recipes.py).

:class:`DetectConfig` is a :class:`~mnv4.train.config.TrainConfig` (so the trainer, checkpoints and torchrun
work unchanged) with the detection fields: the ``head``, the augmentation's ``scale_jitter`` and the
``resize`` mode. A recipe is a mapping of field values over the config's defaults.

* ``detect-paper``: the paper's COCO recipe (§7.2; docs/detection.md "Training"): Adam with L2 weight decay
  3e-5 (as TF's ``l2_weight_decay``, which adds ``wd / 2 * sum(w^2)`` to the loss: ``l2`` 1.5e-5 here and no
  decoupled decay), cosine LR with 24 of 600 epochs of warm-up, batch 2048, 384 px, drop path 0.2, flips,
  scale jitter and RandAugment without shear and rotate. The paper does not state the LR (tuned per model)
  nor the RandAugment magnitude: 2e-3 at batch 2048 and magnitude 9 are assumptions.
* ``detect-small`` (the default when ``data`` is given): from scratch on a few hundred images (bccd,
  aquarium): batch 16, AdamW, 1-epoch warm-up, scale jitter 0.5-2.0, light RandAugment, no drop path. Its
  SSDLite reads the expansion maps and fits its anchors to the training boxes (:data:`HEAD_DEFAULTS`).
* ``detect-digits`` (the default without ``data``): the built-in digits set with a light RetinaNet head,
  sized for a few CPU minutes.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidValue, MNv4Error, check_choice, check_float
from ..train.config import TrainConfig, load_config_file
from .registry import HEADS
from .transforms import RESIZE_MODES

__all__ = ["DetectConfig", "DETECT_RECIPES", "HEAD_DEFAULTS", "default_recipe", "resolve_detect_config"]


@dataclass(frozen=True)
class DetectConfig(TrainConfig):
    """A detection run: every TrainConfig field plus the detection ones below."""

    recipe: str = "detect-digits"
    model: str | dict | None = "mnv4_conv_small"
    head: str = "retinanet"
    scale_jitter: tuple[float, float] = (0.5, 2.0)  # (1, 1): no jitter / crop
    resize: str = "letterbox"  # letterbox | fixed
    backbone_checkpoint: str | None = None  # a classification checkpoint for the backbone
    head_options: dict | None = None  # create_detector's head options (width, num_convs, anchor_scale, ...)

    def __post_init__(self) -> None:
        if isinstance(self.scale_jitter, list):
            object.__setattr__(self, "scale_jitter", tuple(self.scale_jitter))
        super().__post_init__()
        check_choice("head", self.head, HEADS)
        check_choice("resize", self.resize, RESIZE_MODES)
        sj = self.scale_jitter
        if not isinstance(sj, tuple) or len(sj) != 2:
            raise InvalidValue("scale_jitter", sj, "must be two numbers lo <= hi, e.g. [0.5, 2.0]")
        lo, hi = (check_float("scale_jitter", v, 0.0, 10.0, lo_open=True) for v in sj)
        if lo > hi:
            raise InvalidValue("scale_jitter", list(sj), "the first value must not exceed the second")
        if self.distill or self.teacher:
            raise MNv4Error("detection training does not distil; drop `distill` / `teacher`")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MNv4Error(f"unknown detection config field(s): {', '.join(unknown)}")
        tuples = ("betas", "crop_scale", "distill", "scale_jitter")
        return cls(**{k: (tuple(v) if k in tuples and isinstance(v, list | tuple) else v) for k, v in d.items()})


_COMMON: dict[str, Any] = dict(
    label_smoothing=0.0,  # unused by detection losses; kept 0 so the config says so
    mix_prob=0.0,
    crop_scale=(0.08, 1.0),
    lr_scaling="linear",
)

DETECT_RECIPES: dict[str, dict[str, Any]] = {
    "detect-paper": {
        **_COMMON,
        "note": "the paper's COCO RetinaNet recipe (module docstring; LR and RandAugment magnitude assumed)",
        "input_size": 384,
        "epochs": 600,
        "batch_size": 2048,
        "micro_batch": 64,
        "lr": 2e-3,
        "warmup_epochs": 24,
        "weight_decay": 0.0,
        "l2": 1.5e-5,
        "drop_path": 0.2,
        "hflip": 0.5,
        "scale_jitter": (0.5, 2.0),
        "randaug_prob": 1.0,
        "randaug_layers": 2,
        "randaug_magnitude": 9,
    },
    "detect-small": {
        **_COMMON,
        "note": "from scratch on a few hundred images (bccd, aquarium) at 320 px",
        "input_size": 320,
        "epochs": 30,
        "batch_size": 16,
        # 3e-3: better than 1e-3 for every detector measured on bccd (torchvision's SSDLite and three
        # MNv4 SSDLites, +0.017 to +0.052 AP; docs/detection.md "Anchors and learning rate")
        "lr": 3e-3,
        "warmup_epochs": 1,
        "weight_decay": 0.05,
        "grad_clip": 10.0,
        "hflip": 0.5,
        "scale_jitter": (0.5, 2.0),
        "randaug_prob": 0.5,
        "randaug_layers": 2,
        "randaug_magnitude": 5,
    },
    "detect-digits": {
        **_COMMON,
        "note": "the built-in digits canvases (96 px), a light RetinaNet head sized for 12-44 px digits; no flips",
        "data": "digits",
        "input_size": 96,
        "head": "retinanet",
        # 128-d, 2-layer head; anchors 16-32 px at P3 (anchor_scale 2: the digits' ink boxes are 12-44 px);
        # GIoU box loss. docs/detection.md "Training" shows the runs that chose these.
        "head_options": {"width": 128, "num_convs": 2, "anchor_scale": 2.0, "box_loss": "giou"},
        "epochs": 30,
        "batch_size": 16,
        "lr": 2e-3,
        "warmup_epochs": 0.5,
        "weight_decay": 0.05,
        "grad_clip": 10.0,
        "hflip": 0.0,
        "scale_jitter": (0.75, 1.33),
        "randaug_prob": 0.0,
    },
}


# recipe -> head -> the head options a run of that recipe gets when it gives none. detect-small's SSDLite:
# the configuration measured best on bccd: the expansion taps (where the backbone has them, `feature_location:
# auto`), a stride-8 map for small boxes and every box scale fitted to the training boxes (0.502 AP against
# 0.397 with SSD's default boxes at LR 3e-3; docs/detection.md "Anchors fitted to the data"). RetinaNet keeps
# the paper's anchors (`anchor_scale: auto` raises coverage but is not measured in AP).
HEAD_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "detect-small": {
        "ssdlite": {"feature_location": "auto", "levels": "auto", "min_ratio": "auto", "scales": "auto"},
    },
}


def default_recipe(data: str | os.PathLike | None) -> str:
    """``detect-digits`` for the built-in set (no data), ``detect-small`` for a folder of your own boxes."""
    return "detect-digits" if data in (None, "", "digits") else "detect-small"


def resolve_detect_config(
    recipe: str | None = None, config_file: str | os.PathLike | None = None, **overrides: Any
) -> DetectConfig:
    """recipe <- config file <- overrides (None values ignored), as mnv4.train.config.resolve_config.

    Without a recipe, :func:`default_recipe` picks one from the data. Head options given (flag, file or
    override) replace the recipe's whole; without them the head gets its :data:`HEAD_DEFAULTS` entry for
    the recipe, else the recipe's own options if it is the recipe's head, else the factory defaults.
    """
    from_file = load_config_file(config_file) if config_file else {}
    data = overrides.get("data") if overrides.get("data") is not None else from_file.get("data")
    name = recipe or from_file.get("recipe") or default_recipe(data)
    check_choice("recipe", name, DETECT_RECIPES)
    fields = {"name": name, **DETECT_RECIPES[name]}
    fields.update(from_file)
    given = {k: v for k, v in overrides.items() if v is not None}
    fields.update(given)
    fields["recipe"] = name
    explicit = set(given) | set(from_file)
    model = fields.get("model")
    named = next((h for h in HEADS if isinstance(model, str) and model.startswith(h + "_")), None)
    if named and "head" not in explicit:
        fields["head"] = named  # a detector name (ssdlite_mnv4_conv_small) chooses the head over the recipe's
    if "head_options" not in explicit:
        if fields.get("head") != DETECT_RECIPES[name].get("head"):
            fields.pop("head_options", None)  # the recipe's options are for its own head, not the one asked for
        head_default = HEAD_DEFAULTS.get(name, {}).get(fields.get("head") or DetectConfig.head)
        if head_default is not None:
            fields["head_options"] = dict(head_default)
    if fields.get("checkpoint"):
        _follow_checkpoint(fields, explicit)
    return DetectConfig.from_dict(fields)


def _follow_checkpoint(fields: dict[str, Any], explicit: set[str]) -> None:
    """Fine-tuning a saved detector: its head, backbone, input size and resize mode fill the fields the user
    did not set, so the run is named, sized and anchored as the detector is (its anchors and feature grid are
    fixed to its input size). An explicit head or size that contradicts the file is one error."""
    from ..weights.io import read_checkpoint
    from .io import is_detector_config

    path = fields["checkpoint"]
    _, saved = read_checkpoint(path)
    if not is_detector_config(saved):
        raise MNv4Error(
            f"--checkpoint {path} is not an mnv4 detector; a classifier's weights go to --backbone-checkpoint"
        )
    have = {"head": saved["head"], "input_size": int(saved["image_size"])}
    for key, value in have.items():
        if key in explicit and fields.get(key) not in (None, value):
            flag = key.replace("_", "-")
            raise MNv4Error(
                f"--{flag} {fields[key]} contradicts {path} (head {saved['head']}, input size {have['input_size']} "
                f"px); drop --{flag}: a saved detector keeps its head and input size (its anchors and feature "
                "grid are built for them)"
            )
        fields[key] = value
    if "model" not in explicit:
        fields["model"] = saved.get("spec") or saved["backbone"]
    if "resize" not in explicit:
        fields["resize"] = saved.get("resize", "letterbox")
    if "head_options" in explicit and fields.get("head_options"):
        raise MNv4Error(f"{path} brings its own head and anchors; drop the head options")
    fields.pop("head_options", None)
