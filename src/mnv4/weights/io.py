"""Reading and writing checkpoints safely.

mnv4's own format is one ``.safetensors`` file whose header metadata carries a JSON config
(architecture or full spec, num_classes, preprocessing, class names). Foreign files (timm
``.safetensors`` / ``.pth`` / ``.bin``, hub folders) are read without unpickling arbitrary code.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import MNv4Error
from ..files import atomic_write

__all__ = ["read_checkpoint", "write_safetensors", "clean_state_dict", "model_config", "CONFIG_KEY", "FORMAT"]

CONFIG_KEY = "mnv4_config"
FORMAT = "mnv4"
_PREFIXES = ("module.", "_orig_mod.")
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "ema")


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {CONFIG_KEY: json.dumps(config)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def clean_state_dict(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Strip DDP / torch.compile prefixes and drop non-tensor entries."""
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise MNv4Error(f"cannot read {path}: not a valid safetensors file ({e})") from None
    cfg = None
    if CONFIG_KEY in meta:
        try:
            cfg = json.loads(meta[CONFIG_KEY])
        except json.JSONDecodeError as e:
            raise MNv4Error(f"{path}: its mnv4 metadata is not valid JSON ({e.msg}); the file is damaged") from None
        if not isinstance(cfg, dict):
            raise MNv4Error(f"{path}: its mnv4 metadata is not a JSON object; the file is damaged")
    return sd, cfg


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError depending on damage
        raise MNv4Error(_unreadable_pickle(path, e)) from None
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise MNv4Error(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return dict(obj)


_IMAGE_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"BM": "a BMP image",
}


def _not_a_checkpoint(head: bytes) -> str | None:
    """What a file evidently is when it is neither torch.save's zip (``PK``) nor pickle (``0x80``): an image
    or text (JSON, YAML, a script) passed where weights go; None when it may be a checkpoint."""
    if head.startswith((b"PK", b"\x80")) or not head:
        return None
    for magic, kind in _IMAGE_MAGIC.items():
        if head.startswith(magic):
            return kind
    try:
        text = head.decode("utf-8").lstrip()
    except UnicodeDecodeError:
        return None  # binary of some other kind: torch.load's refusal says the rest
    if not text.isprintable() and any(c not in "\t\r\n" and not c.isprintable() for c in text):
        return None  # control bytes (zeros, damage): not text either
    return "a JSON text file" if text[:1] in "{[" else "a text file"


def _unreadable_pickle(path: Path, e: Exception) -> str:
    """One line for a .pt that torch.load(weights_only=True) refuses: what is in the way, in our words, since
    torch's text runs to many lines with terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    code = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if code:
        why = f"it is a pickle that needs {code.group(1)} to load"
    elif "zip archive" in text or isinstance(e, EOFError):
        why = "it is truncated or not a PyTorch file"
    else:
        why = f"{type(e).__name__}"
    return (
        f"cannot read {path} safely: {why}; mnv4 only loads plain tensor checkpoints (torch.load "
        "weights_only=True). If you trust the file, load it in Python and save its state dict as .safetensors"
    )


def _read_dir(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    for name in ("model.safetensors", "pytorch_model.bin", "model.pth"):
        if (path / name).is_file():
            sd, cfg = read_checkpoint(path / name)
            break
    else:
        raise MNv4Error(f"{path} holds no model.safetensors or pytorch_model.bin")
    cfg_file = path / "config.json"
    if cfg is None and cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MNv4Error(f"{cfg_file} is not valid JSON ({e}); fix or remove it") from None
        if isinstance(cfg, dict):
            from .hub_config import from_hub_config, is_hub_config

            if is_hub_config(cfg):  # timm's / mnv4's hub layout: architecture, labels, preprocessing
                cfg = from_hub_config(cfg)
    return sd, cfg


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Load (state_dict, config-or-None) from a file or hub-style folder, never unpickling code."""
    path = Path(path)
    if not path.exists():
        raise MNv4Error(f"checkpoint not found: {path}")
    if path.is_dir():
        sd, cfg = _read_dir(path)
    elif path.suffix == ".safetensors":
        sd, cfg = _read_safetensors(path)
    else:
        with open(path, "rb") as f:
            head = f.read(16)
        if len(head) >= 9 and head[8:9] == b"{":  # safetensors header under another extension
            sd, cfg = _read_safetensors(path)
        elif (kind := _not_a_checkpoint(head)) is not None:
            raise MNv4Error(f"{path} is not a checkpoint ({kind}); pass a .safetensors or .pt weights file")
        else:
            sd, cfg = _read_pickle(path), None
    sd = clean_state_dict(sd)
    if not sd:
        raise MNv4Error(f"{path} contains no tensors")
    return sd, cfg


def model_config(model: nn.Module) -> dict[str, Any]:
    """The JSON config stored next to the weights; ``create_model(checkpoint=...)`` rebuilds from it
    (mnv4 checkpoints, and the header of :func:`mnv4.weights.timm.save_timm`'s files)."""
    from ..models.meta import weights_meta
    from ..models.registry import MODELS

    spec = model.spec
    cfg: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
        "architecture": spec.name,
        "num_classes": model.num_classes,
        "in_chans": model.stem.conv.in_channels,
    }
    if spec.name not in MODELS or MODELS[spec.name].spec != spec:
        cfg["spec"] = spec.to_dict()
    meta = weights_meta(model)
    cfg["preprocess"] = meta.preprocess.to_dict()
    if meta.class_names:
        cfg["class_names"] = list(meta.class_names)
    return cfg
