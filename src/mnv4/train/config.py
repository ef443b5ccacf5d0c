"""A run's full configuration: a recipe, then a YAML/JSON file, then explicit overrides.

The resolved config is written to ``config.yaml`` in the run directory and stored in every
training checkpoint, so a run can be reproduced or resumed without remembering its flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import MNv4Error
from .recipes import Recipe, get_recipe

__all__ = ["TrainConfig", "resolve_config", "load_config_file"]


@dataclass(frozen=True)
class TrainConfig(Recipe):
    """A recipe plus what is specific to one run (data location, output, seed, devices)."""

    recipe: str = "quick"
    data_root: str | None = None  # where cifar10 / fashion-mnist are cached or downloaded
    val_split: float = 0.2  # for folders without val/ and for digits
    output: str | None = None
    checkpoint: str | None = None  # pretrained weights to start from (fine-tuning)
    seed: int = 0
    workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    save_every_steps: int = 0  # 0: checkpoint at epoch ends only
    eval_every: int = 1  # epochs

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


_TUPLE_FIELDS = ("betas", "crop_scale")


def _build(cls: type, d: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise MNv4Error(f"unknown config field(s): {', '.join(unknown)}; `mnv4 recipes --show NAME` lists the fields")
    d = {k: (tuple(v) if k in _TUPLE_FIELDS and v is not None else v) for k, v in d.items()}
    return cls(**d)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise MNv4Error(f"cannot read config file {path}: {e.strerror}") from None
    try:
        d = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise MNv4Error(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if not isinstance(d, dict):
        raise MNv4Error(f"{path} must hold a mapping of field: value")
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
