"""Putting weights into a model (with checks) and saving a model in mnv4's format."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import MNv4Error
from .io import model_config, write_safetensors
from .timm import is_timm_state_dict, timm_to_mnv4

__all__ = ["load_weights", "save_model", "model_config"]

_HEAD_PREFIXES = ("final_conv.", "head_conv.", "classifier.")
_CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")
_MAX_LISTED = 3


def _listing(keys: list[str]) -> str:
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def _adapt_stem(w: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Stem weights for a different number of input channels (grey = sum, more = tiled and rescaled)."""
    if in_chans == 1:
        return w.sum(dim=1, keepdim=True)
    reps = -(-in_chans // w.shape[1])
    return w.repeat(1, reps, 1, 1)[:, :in_chans] * (w.shape[1] / in_chans)


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> nn.Module:
    """Load a timm- or mnv4-format state dict into ``model``, converting and checking it.

    A classifier of another size is dropped with a warning (the model keeps its fresh one); any
    other missing, unexpected or mis-shaped key is an :class:`MNv4Error` naming the first ones.
    """
    sd = dict(state_dict)
    if is_timm_state_dict(sd):
        sd = timm_to_mnv4(sd, model)
    own = model.state_dict()
    if getattr(model, "features_only", False):
        # A features_only model keeps final_conv when a level reads it (feature_location="expansion").
        sd = {k: v for k, v in sd.items() if not k.startswith(_HEAD_PREFIXES) or k in own}
    stem = "stem.conv.weight"
    if stem in sd and stem in own and sd[stem].shape[1] != own[stem].shape[1] and sd[stem].dim() == 4:
        sd[stem] = _adapt_stem(sd[stem], own[stem].shape[1])

    num_classes = getattr(model, "num_classes", None)
    if num_classes == 0:
        sd = {k: v for k, v in sd.items() if k not in _CLASSIFIER_KEYS}
    mismatched = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    mismatched_classifier = bool(mismatched) and set(mismatched) <= set(_CLASSIFIER_KEYS)
    if mismatched_classifier:
        ckpt_classes = sd["classifier.weight"].shape[0] if "classifier.weight" in sd else "?"
        warnings.warn(
            f"{source} has a {ckpt_classes}-class classifier; the model has {num_classes} classes, "
            "so the classifier is freshly initialised",
            stacklevel=3,
        )
        sd = {k: v for k, v in sd.items() if k not in _CLASSIFIER_KEYS}
        mismatched = []
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    if missing and set(missing) <= set(_CLASSIFIER_KEYS):
        if not mismatched_classifier:
            warnings.warn(f"{source} has no classifier; the model's is freshly initialised", stacklevel=3)
        missing = []
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected or mismatched:
        problems = []
        if mismatched:
            shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]
            problems.append(f"shape mismatch: {_listing(shapes)}")
        if missing:
            problems.append(f"missing: {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected: {_listing(unexpected)}")
        name = getattr(getattr(model, "spec", None), "name", type(model).__name__)
        raise MNv4Error(
            f"{source} does not fit {name} ({'; '.join(problems)}); check that the model name matches the checkpoint"
        )
    model.load_state_dict(sd, strict=False)
    return model


def save_model(model: nn.Module, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` as one .safetensors file (weights + JSON config in its header), atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise MNv4Error(f"mnv4 saves weights as .safetensors; got {path.name}")
    if getattr(model, "features_only", False):
        raise MNv4Error("save the classification model, not a features_only view of it")
    cfg = model_config(model)
    cfg.update(extra or {})
    return write_safetensors(path, model.state_dict(), cfg)
