"""A run's full configuration: a recipe, then a YAML/JSON file, then explicit overrides.

The resolved config is written to ``config.yaml`` in the run directory and stored in every
training checkpoint, so a run can be reproduced or resumed without remembering its flags.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from ..data.sampling import parse_mix
from ..errors import MAX_INPUT_SIZE, MIN_INPUT_SIZE, InvalidValue, MNv4Error, check_choice, check_float, check_int
from ..files import read_mapping
from ..models.mobilenetv4 import DROP_PATH_SCHEDULES
from .recipes import Recipe, get_recipe

__all__ = ["TrainConfig", "resolve_config", "load_config_file", "validate"]


@dataclass(frozen=True)
class TrainConfig(Recipe):
    """A recipe plus what is specific to one run (data location, output, seed, devices)."""

    recipe: str = "quick"
    data_root: str | None = None  # where cifar10 / fashion-mnist are cached or downloaded
    val_split: float = 0.2  # for folders without val/ and for digits
    output: str | None = None
    checkpoint: str | None = None  # pretrained weights to start from (fine-tuning)
    pretrained: str | None = None  # timm weights to start from: "default" or a tag
    seed: int = 0
    workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # None (auto): channels_last batches on CPU, where oneDNN's convolutions train faster in that
    # layout (docs/training.md "Trainer"), parameters untouched; True: model and batches, any device; False: neither.
    channels_last: bool | None = None
    compile: bool = False
    sync_bn: bool = False
    save_every_steps: int = 0  # 0: checkpoint at epoch ends only
    eval_every: int = 1  # epochs
    # Experiment trackers (mnv4.train.trackers.LOGGERS); None: TensorBoard when installed; (): none.
    loggers: tuple[str, ...] | None = None
    # Distillation (docs/distillation.md): soft-label folders mixed by `mix` ("1:1:2"), or a live `teacher`.
    distill: tuple[str, ...] = ()
    mix: str | None = None
    teacher: str | None = None
    teacher_checkpoint: str | None = None
    teacher_aug: str = "inception-randaug-l2m9"  # the online teacher's augmentation policy
    teacher_temperature: float = 1.0  # targets p^(1/T), renormalised: < 1 sharpens an under-confident teacher

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return _build(cls, d)

    def scaled_lr(self) -> float:
        """Peak LR for this run's effective batch; recipes state LR at their own batch size."""
        ref = self.lr_ref_batch or self.batch_size
        ratio = self.batch_size / ref
        if self.lr_scaling == "linear":
            return self.lr * ratio
        if self.lr_scaling == "sqrt":
            return self.lr * math.sqrt(ratio)
        if self.lr_scaling == "none":
            return self.lr
        raise MNv4Error(f"lr_scaling must be linear, sqrt or none, got {self.lr_scaling!r}")


_TUPLE_FIELDS = ("betas", "crop_scale", "distill", "loggers")

# Every numeric and enum field with its allowed range: (kind, lo, hi, lo_open, hi_open, nullable) or a
# tuple of choices. Checked whenever a config is built (recipe + file + overrides, or a saved run).
_UNIT = ("float", 0.0, 1.0, False, False, False)
_RULES: dict[str, tuple] = {
    "epochs": ("float", 0.0, None, True, False, False),
    "batch_size": ("int", 1, None, False, False, False),
    "micro_batch": ("int", 1, None, False, False, True),
    "lr": ("float", 0.0, None, True, False, False),
    "lr_ref_batch": ("int", 1, None, False, False, True),
    "lr_scaling": ("linear", "sqrt", "none"),
    "min_lr_ratio": _UNIT,
    "warmup_epochs": ("float", 0.0, None, False, False, False),
    "weight_decay": ("float", 0.0, None, False, False, False),
    "eps": ("float", 0.0, None, True, False, False),
    "l2": ("float", 0.0, None, False, False, False),
    "ema_decay": ("float", 0.0, 1.0, False, True, False),
    "ema_start_epochs": ("float", 0.0, None, False, False, False),
    "grad_clip": ("float", 0.0, None, False, False, False),
    "label_smoothing": ("float", 0.0, 1.0, False, True, False),
    "dropout": ("float", 0.0, 1.0, False, True, False),
    "drop_path": ("float", 0.0, 1.0, False, True, False),
    "drop_path_schedule": DROP_PATH_SCHEDULES,
    "bn_momentum": ("float", 0.0, 1.0, True, False, True),
    "bn_eps": ("float", 0.0, None, True, False, True),
    "hflip": _UNIT,
    "randaug_prob": _UNIT,
    "randaug_layers": ("int", 0, 16, False, False, False),
    "randaug_magnitude": ("float", 0.0, 30.0, False, False, False),
    "mix_prob": _UNIT,
    "mixup_alpha": ("float", 0.0, None, False, False, False),
    "cutmix_alpha": ("float", 0.0, None, False, False, False),
    "switch_prob": _UNIT,
    "precision": ("fp32", "bf16", "fp16"),
    "max_nonfinite_steps": ("int", 1, None, False, False, False),
    "layer_decay": ("float", 0.0, 1.0, True, False, False),
    "input_size": ("int", MIN_INPUT_SIZE, MAX_INPUT_SIZE, False, False, True),
    "val_split": ("float", 0.0, 1.0, True, True, False),
    "seed": ("int", 0, 2**63 - 1, False, False, False),
    "workers": ("int", 0, 256, False, False, False),
    "save_every_steps": ("int", 0, None, False, False, False),
    "eval_every": ("int", 1, None, False, False, False),
    "teacher_temperature": ("float", 0.0, 100.0, True, False, False),
}


def validate(cfg: Any) -> None:
    """Raise :class:`~mnv4.errors.InvalidValue` for the first field outside its allowed range."""
    for name, rule in _RULES.items():
        if not hasattr(cfg, name):
            continue
        value = getattr(cfg, name)
        if isinstance(rule[0], str) and rule[0] in ("int", "float"):
            kind, lo, hi, lo_open, hi_open, nullable = rule
            if value is None and nullable:
                continue
            if kind == "int":
                check_int(name, value, lo, hi)
            else:
                check_float(name, value, lo, hi, lo_open, hi_open)
        else:
            check_choice(name, value, rule)
    betas = getattr(cfg, "betas", None)
    if betas is not None:
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise InvalidValue(
                "betas", list(betas) if isinstance(betas, tuple) else betas, "must be two numbers, e.g. [0.9, 0.999]"
            )
        for b in betas:
            check_float("betas", b, 0.0, 1.0, False, True)
    scale = getattr(cfg, "crop_scale", None)
    if scale is not None:
        if not isinstance(scale, tuple | list) or len(scale) != 2:
            raise InvalidValue(
                "crop_scale",
                list(scale) if isinstance(scale, tuple) else scale,
                "must be two numbers lo <= hi in (0, 1], e.g. [0.08, 1.0]",
            )
        lo, hi = (check_float("crop_scale", v, 0.0, 1.0, True, False) for v in scale)
        if lo > hi:
            raise InvalidValue("crop_scale", list(scale), "the first value must not exceed the second")
    if hasattr(cfg, "distill"):
        _validate_distill(cfg)
    loggers = getattr(cfg, "loggers", None)
    if loggers is not None:
        from .trackers import LOGGERS

        if not isinstance(loggers, tuple | list):
            raise InvalidValue("loggers", loggers, f"must be a list of {', '.join(LOGGERS)}")
        for name in loggers:
            check_choice("loggers", name, LOGGERS)
    device = getattr(cfg, "device", None)
    if device is not None:
        from .distributed import check_device

        check_device(device)


def _build(cls: type, d: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise MNv4Error(
            f"unknown config field(s): {', '.join(unknown)}{hint}; `mnv4 recipes --show NAME` lists the fields"
        )
    if isinstance(d.get("loggers"), str):  # "wandb,mlflow" as written on a command line
        d = {**d, "loggers": tuple(x.strip() for x in d["loggers"].split(",") if x.strip() and x.strip() != "none")}
    d = {k: (tuple(v) if k in _TUPLE_FIELDS and isinstance(v, list | tuple) else v) for k, v in d.items()}
    return cls(**d)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    d = read_mapping(path, "config file", "field: value")
    return {k.replace("-", "_"): v for k, v in d.items()}


def resolve_config(
    recipe: str | None = None, config_file: str | os.PathLike | None = None, **overrides: Any
) -> TrainConfig:
    """recipe defaults <- config file <- overrides (None values in overrides are ignored).

    A config file may name its own ``recipe``; an explicit ``recipe`` argument wins over it.
    """
    from_file = load_config_file(config_file) if config_file else {}
    name = recipe or from_file.get("recipe") or "quick"
    fields = get_recipe(name).to_dict()
    fields.update(from_file)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    fields["recipe"] = name
    return _build(TrainConfig, fields)


def _validate_distill(cfg: Any) -> None:
    """The distillation fields (docs/distillation.md) as a whole; the teacher's augmentation policy is checked
    by the student trainer, which owns the policy table."""
    if cfg.distill and cfg.teacher:
        raise MNv4Error("give either `distill` soft-label folders or a live `teacher`, not both")
    if getattr(cfg, "recipe", None) == "distill" and not cfg.distill and not cfg.teacher:
        raise MNv4Error("recipe distill needs soft-label folders (`distill`) or a live `teacher`")
    if cfg.mix is not None and not cfg.distill:
        raise MNv4Error("`mix` sets the shares of several `distill` folders; it has no meaning without them")
    if cfg.teacher_temperature != 1.0 and not cfg.distill and not cfg.teacher:
        raise MNv4Error("`teacher_temperature` reshapes teacher targets; it needs `distill` folders or a `teacher`")
    if cfg.teacher_checkpoint is not None and not cfg.teacher:
        raise MNv4Error("`teacher_checkpoint` needs `teacher` (the architecture it belongs to)")
    if cfg.distill:
        parse_mix(cfg.mix, len(cfg.distill))
