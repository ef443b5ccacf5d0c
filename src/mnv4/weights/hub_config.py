"""The Hugging Face Hub layout of a model folder: ``config.json`` + ``model.safetensors``.

timm writes its hub models this way (``architecture``, ``num_classes``, ``num_features``,
``global_pool``, ``label_names``, optional ``model_args``, and ``pretrained_cfg`` with the
preprocessing), so a folder mnv4 writes for a registered architecture loads in timm as well: its
weights are stored in timm's key layout (:func:`mnv4.weights.timm.mnv4_to_timm`). A custom spec has
no timm counterpart; its weights stay in mnv4's layout and the spec travels in the ``mnv4`` section.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models.registry import MODELS, Preprocess
from .timm import mnv4_to_timm

__all__ = ["hub_config", "hub_state_dict", "from_hub_config", "is_hub_config", "timm_architecture"]

_DEFAULT_BN_EPS = 1e-5


def timm_architecture(model: nn.Module) -> str | None:
    """timm's name for ``model``'s architecture, or None for a spec timm does not have."""
    entry = MODELS.get(model.spec.name)
    if entry is None or entry.spec != model.spec or not entry.timm_name:
        return None
    return entry.timm_name


def _bn_eps(model: nn.Module) -> float:
    eps = {m.eps for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    return eps.pop() if len(eps) == 1 else _DEFAULT_BN_EPS


def _pretrained_cfg(model: nn.Module, arch: str, in_chans: int, license: str | None) -> dict[str, Any]:
    pp: Preprocess = getattr(model, "preprocess", None) or Preprocess()
    cfg: dict[str, Any] = {
        "architecture": arch,
        "tag": None,
        "custom_load": False,
        "input_size": [in_chans, pp.input_size, pp.input_size],
        "fixed_input_size": False,
        "interpolation": pp.interpolation,
        "crop_pct": pp.crop_pct,
        "crop_mode": "center",
        "mean": list(pp.mean),
        "std": list(pp.std),
        "num_classes": model.num_classes,
        "pool_size": [-(-pp.input_size // 32)] * 2,
        "first_conv": "conv_stem",
        "classifier": "classifier",
    }
    if pp.test_input_size:
        cfg["test_input_size"] = [in_chans, pp.test_input_size, pp.test_input_size]
    if pp.test_crop_pct:
        cfg["test_crop_pct"] = pp.test_crop_pct
    if license:
        cfg["license"] = license
    return cfg


def hub_config(model: nn.Module, license: str | None = None) -> dict[str, Any]:
    """``config.json`` for ``model``: timm's fields, plus an ``mnv4`` section that rebuilds any spec."""
    timm_arch = timm_architecture(model)
    in_chans = model.stem.conv.in_channels
    ours: dict[str, Any] = {
        "format": "mnv4",
        "version": 1,
        "architecture": model.spec.name,
        "weights_layout": "timm" if timm_arch else "mnv4",
    }
    if timm_arch is None:
        ours["spec"] = model.spec.to_dict()
    model_args: dict[str, Any] = {}
    if in_chans != 3:
        model_args["in_chans"] = in_chans
    eps = _bn_eps(model)
    if eps != _DEFAULT_BN_EPS:  # e.g. the paper recipes' TF epsilon; logits depend on it
        model_args["bn_eps"] = eps
    cfg: dict[str, Any] = {
        "architecture": timm_arch or model.spec.name,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "global_pool": "avg",
    }
    if getattr(model, "class_names", None):
        cfg["label_names"] = list(model.class_names)
    if model_args:
        cfg["model_args"] = model_args
    cfg["pretrained_cfg"] = _pretrained_cfg(model, cfg["architecture"], in_chans, license)
    cfg["mnv4"] = ours
    return cfg


def hub_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``: timm's key layout where timm has the architecture."""
    sd = model.state_dict()
    return mnv4_to_timm(sd, model) if timm_architecture(model) else dict(sd)


def is_hub_config(cfg: dict[str, Any]) -> bool:
    return isinstance(cfg.get("pretrained_cfg"), dict) or "mnv4" in cfg


def _label_list(labels: Any) -> list[str] | None:
    if isinstance(labels, dict):  # timm allows {index: name} when there are gaps
        try:
            return [str(labels[k]) for k in sorted(labels, key=int)]
        except (TypeError, ValueError):
            return None
    if isinstance(labels, list | tuple):
        return [str(x) for x in labels]
    return None


def _preprocess(pc: dict[str, Any]) -> Preprocess:
    d: dict[str, Any] = {k: pc[k] for k in ("crop_pct", "interpolation", "mean", "std", "test_crop_pct") if k in pc}
    for key in ("input_size", "test_input_size"):
        size = pc.get(key)
        if isinstance(size, list | tuple) and len(size) == 3:
            d[key] = int(size[-1])
    return Preprocess.from_dict(d)


def from_hub_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """mnv4's checkpoint config (as :func:`mnv4.weights.checkpoint.model_config` writes) from a
    hub ``config.json``, written by mnv4 or by timm."""
    ours = cfg.get("mnv4") if isinstance(cfg.get("mnv4"), dict) else {}
    model_args = cfg.get("model_args") if isinstance(cfg.get("model_args"), dict) else {}
    out: dict[str, Any] = {
        "format": "mnv4",
        "version": 1,
        "architecture": ours.get("architecture", cfg.get("architecture")),
    }
    if "spec" in ours:
        out["spec"] = ours["spec"]
    if isinstance(cfg.get("num_classes"), int):
        out["num_classes"] = cfg["num_classes"]
    out["in_chans"] = int(model_args.get("in_chans", 3))
    if "bn_eps" in model_args:
        out["bn_eps"] = float(model_args["bn_eps"])
    pc = cfg.get("pretrained_cfg")
    if isinstance(pc, dict):
        out["preprocess"] = _preprocess(pc).to_dict()
    labels = _label_list(cfg.get("label_names", pc.get("label_names") if isinstance(pc, dict) else None))
    if labels:
        out["class_names"] = labels
    return out
