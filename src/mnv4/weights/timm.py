"""Conversion between timm's MobileNetV4 state_dict layout and mnv4's (timm-interop §4).

timm names: ``conv_stem``/``bn1`` (stem), ``blocks.<stage>.<i>`` (stages 0-3, then ``blocks.4.0``
= the 960 conv), ``conv_head``/``norm_head`` (1280 conv), ``classifier``. Inside blocks the leaf
names differ per block type, and Mobile MQA projections are head-major where mnv4 uses the
transpose-free (kv group, dim, head) order, so those weights are permuted, not just renamed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import MNv4Error
from ..models.blocks import UIB, AttentionBlock, ConvBN, FusedIB
from .io import write_safetensors

__all__ = ["is_timm_state_dict", "timm_to_mnv4", "mnv4_to_timm", "timm_architecture", "to_timm", "save_timm"]

# (timm leaf prefix, mnv4 leaf prefix) per block type; applied to keys under the block prefix.
_LEAVES: dict[type, list[tuple[str, str]]] = {
    ConvBN: [("conv.", "conv."), ("bn1.", "bn.")],
    FusedIB: [
        ("conv_exp.", "expand.conv."),
        ("bn1.", "expand.bn."),
        ("conv_pwl.", "project.conv."),
        ("bn2.", "project.bn."),
    ],
    UIB: [
        ("dw_start.", "dw_start."),
        ("pw_exp.", "expand."),
        ("dw_mid.", "dw_mid."),
        ("pw_proj.", "project."),
        ("dw_end.", "dw_end."),
        ("layer_scale.", "layer_scale."),
    ],
    AttentionBlock: [
        ("norm.", "norm."),
        ("attn.query.proj.", "attn.query."),
        ("attn.key.down_conv.", "attn.key_down.conv."),
        ("attn.key.norm.", "attn.key_down.bn."),
        ("attn.key.proj.", "attn.key."),
        ("attn.value.down_conv.", "attn.value_down.conv."),
        ("attn.value.norm.", "attn.value_down.bn."),
        ("attn.value.proj.", "attn.value."),
        ("attn.output.proj.", "attn.output."),
        ("layer_scale.", "layer_scale."),
    ],
}
_TOP = [
    ("conv_stem.", "stem.conv."),
    ("bn1.", "stem.bn."),
    ("blocks.4.0.conv.", "final_conv.conv."),
    ("blocks.4.0.bn1.", "final_conv.bn."),
    ("conv_head.", "head_conv.conv."),
    ("norm_head.", "head_conv.bn."),
    ("classifier.", "classifier."),
]
_BLOCK_KEY = re.compile(r"^(blocks|stages)\.([0-3])\.(\d+)\.(.*)$")


def is_timm_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    return "conv_stem.weight" in sd or any(k.startswith("blocks.") for k in sd)


def _block_types(model: nn.Module) -> dict[tuple[int, int], nn.Module]:
    out = {}
    for si, stage in enumerate(model.stages):
        for bi, block in enumerate(stage):
            out[(si, bi)] = block
    return out


def _attention_blocks(model: nn.Module) -> list[tuple[str, AttentionBlock]]:
    return [(f"stages.{si}.{bi}.", b) for (si, bi), b in _block_types(model).items() if isinstance(b, AttentionBlock)]


def _leaf_table(block: nn.Module) -> list[tuple[str, str]]:
    for cls, table in _LEAVES.items():
        if isinstance(block, cls):
            return table
    raise TypeError(f"no timm mapping for {type(block).__name__}")


def _rename(key: str, table: list[tuple[str, str]], forward: bool) -> str | None:
    for timm_p, ours_p in table:
        src, dst = (timm_p, ours_p) if forward else (ours_p, timm_p)
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


def _permute_attention(sd: dict[str, torch.Tensor], prefix: str, block: AttentionBlock, to_mnv4: bool) -> None:
    """Reorder query-output / output-input channels between head-major and mnv4's grouped order."""
    a = block.attn
    g, r = a.kv_heads, a.heads // a.kv_heads
    q, o = f"{prefix}attn.query.weight", f"{prefix}attn.output.weight"
    if q in sd and sd[q].shape[0] == a.heads * a.key_dim:
        w = sd[q]
        shape = w.shape
        if to_mnv4:  # timm (g, r, dk) -> mnv4 (g, dk, r)
            w = w.reshape(g, r, a.key_dim, -1).permute(0, 2, 1, 3)
        else:
            w = w.reshape(g, a.key_dim, r, -1).permute(0, 2, 1, 3)
        sd[q] = w.reshape(shape).contiguous()
    if o in sd and sd[o].dim() > 1 and sd[o].shape[1] == a.heads * a.value_dim:
        w = sd[o]
        shape = w.shape
        if to_mnv4:
            w = w.reshape(shape[0], g, r, a.value_dim).permute(0, 1, 3, 2)
        else:
            w = w.reshape(shape[0], g, a.value_dim, r).permute(0, 1, 3, 2)
        sd[o] = w.reshape(shape).contiguous()


def _rename_all(sd: Mapping[str, torch.Tensor], model: nn.Module, to_mnv4: bool) -> dict[str, torch.Tensor]:
    blocks = _block_types(model)
    stage_word = "stages" if to_mnv4 else "blocks"
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = _rename(key, _TOP, to_mnv4)
        m = _BLOCK_KEY.match(key)
        if new is None and m and m.group(1) == ("blocks" if to_mnv4 else "stages"):
            si, bi, leaf = int(m.group(2)), int(m.group(3)), m.group(4)
            block = blocks.get((si, bi))
            new_leaf = _rename(leaf, _leaf_table(block), to_mnv4) if block is not None else None
            if new_leaf is not None:
                new = f"{stage_word}.{si}.{bi}.{new_leaf}"
        if new is None:
            new = key  # left as is, so the caller's key check reports it
        out[new] = value
    return out


def timm_to_mnv4(sd: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename (and permute MQA weights of) a timm MobileNetV4 state_dict for ``model``."""
    out = _rename_all(sd, model, to_mnv4=True)
    for prefix, block in _attention_blocks(model):
        _permute_attention(out, prefix, block, to_mnv4=True)
    return out


def mnv4_to_timm(sd: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Inverse of :func:`timm_to_mnv4`: an mnv4 state_dict in timm's layout."""
    sd = dict(sd)
    for prefix, block in _attention_blocks(model):
        _permute_attention(sd, prefix, block, to_mnv4=False)
    return _rename_all(sd, model, to_mnv4=False)


def timm_architecture(model: nn.Module) -> str | None:
    """timm's name for ``model``'s architecture (``mobilenetv4_conv_small``), or None when timm has no
    such model (a custom or searched spec)."""
    from ..models.registry import MODELS

    spec = getattr(model, "spec", None)
    entry = MODELS.get(getattr(spec, "name", ""))
    return entry.timm_name if entry is not None and entry.spec == spec else None


def to_timm(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights in timm's key layout (MQA projections permuted to timm's head-major order):
    the state_dict timm's own build of the same architecture loads with ``strict=True``."""
    if getattr(model, "features_only", False):
        raise MNv4Error("convert the classification model, not a features_only view of it")
    return {k: v.detach().clone() for k, v in mnv4_to_timm(model.state_dict(), model).items()}


def save_timm(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write :func:`to_timm` as a .safetensors file, atomically, for
    ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=path))``. The header
    names the architecture, classes and preprocessing, so mnv4 reads the file back as the same model."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise MNv4Error(f"timm checkpoints are written as .safetensors; got {path.name}")
    arch = timm_architecture(model)
    if arch is None:
        name = getattr(getattr(model, "spec", None), "name", type(model).__name__)
        raise MNv4Error(f"timm has no architecture for {name}; only registered models convert (`mnv4 models`)")
    from .checkpoint import model_config  # (checkpoint imports this module)

    cfg = {**model_config(model), "format": "timm", "architecture": arch}
    return write_safetensors(path, to_timm(model), cfg)
