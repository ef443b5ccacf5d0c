"""Per-layer parameters, MACs and bytes moved: the table the roofline model consumes.

A "layer" is one compute op as a mobile runtime sees it after BatchNorm folding: a conv, a linear,
or an attention core (the two matmuls plus softmax). MACs come from
``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) on the meta device, so counting a 37M
parameter model at 384 px allocates nothing and takes well under a second. BN, activations,
softmax, residual adds and pooling are not counted as MACs (docs/architecture.md §4).

Bytes moved per layer = weights (+ bias) + input and output activations, at the given dtype's
width (int8 = 1, fp16/bf16 = 2, fp32 = 4); for attention also the N x M score matrix written and
read once. This assumes BN and activations are fused into the producing op, as on device.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..models.blocks import AttentionCore
from ..models.specs import ModelSpec
from .dtypes import DTYPE_BYTES

__all__ = ["LayerStats", "Profile", "profile", "DTYPE_BYTES"]


@dataclass
class LayerStats:
    name: str
    kind: str  # conv, dwconv, pwconv, linear, attention
    out_shape: tuple[int, ...]
    macs: int
    params: int
    weight_bytes: int
    activation_bytes: int

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    @property
    def intensity(self) -> float:
        """Operational intensity in MACs per byte (the roofline x-axis)."""
        return self.macs / self.bytes if self.bytes else 0.0


@dataclass
class Profile:
    model: str
    resolution: tuple[int, int]
    batch_size: int
    dtype: str
    params: int  # all parameters of the model (BN included), as counted in docs/architecture.md §4
    layers: list[LayerStats] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def weight_bytes(self) -> int:
        return sum(layer.weight_bytes for layer in self.layers)

    @property
    def activation_bytes(self) -> int:
        return sum(layer.activation_bytes for layer in self.layers)

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    def summary(self) -> str:
        h, w = self.resolution
        return (
            f"{self.model} @ {h}x{w}, batch {self.batch_size}, {self.dtype}: "
            f"{self.params:,} params, {self.macs / 1e9:.3f} GMACs, "
            f"{self.bytes / 1e6:.2f} MB moved ({self.weight_bytes / 1e6:.2f} MB weights, "
            f"{self.activation_bytes / 1e6:.2f} MB activations), {len(self.layers)} layers"
        )

    def to_rows(self) -> list[dict]:
        return [
            dict(
                name=layer.name,
                kind=layer.kind,
                out_shape=list(layer.out_shape),
                macs=layer.macs,
                params=layer.params,
                weight_bytes=layer.weight_bytes,
                activation_bytes=layer.activation_bytes,
            )
            for layer in self.layers
        ]


def _kind(module: nn.Module) -> str:
    if isinstance(module, AttentionCore):
        return "attention"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        if module.groups > 1 and module.groups == module.in_channels:
            return "dwconv"
        return "pwconv" if module.kernel_size == (1, 1) else "conv"
    raise TypeError(type(module).__name__)


def _meta_copy(model: nn.Module | ModelSpec | str) -> tuple[nn.Module, str]:
    if isinstance(model, (str, ModelSpec)):
        from ..models.mobilenetv4 import MobileNetV4
        from ..models.registry import get_entry

        spec = get_entry(model).spec if isinstance(model, str) else model
        with torch.device("meta"):
            return MobileNetV4(spec).eval(), spec.name
    name = getattr(getattr(model, "spec", None), "name", type(model).__name__)
    return copy.deepcopy(model).to("meta").eval(), name


def profile(
    model: nn.Module | ModelSpec | str,
    resolution: int | tuple[int, int] = 224,
    batch_size: int = 1,
    dtype: str = "float32",
) -> Profile:
    """Count params, MACs and bytes of every conv / linear / attention op for one forward pass."""
    from ..errors import check_choice, check_int

    check_choice("dtype", dtype, DTYPE_BYTES)
    check_int("batch_size", batch_size, 1)
    for side in (resolution,) if isinstance(resolution, int) else tuple(resolution):
        check_int("resolution", side, 1)
    width = DTYPE_BYTES[dtype]
    meta_model, name = _meta_copy(model)
    hw = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    in_chans = next(m for m in meta_model.modules() if isinstance(m, nn.Conv2d)).in_channels
    layers: list[LayerStats] = []
    counters: dict[str, FlopCounterMode] = {}

    def pre_hook(mod_name: str):
        def hook(module, args):
            counters[mod_name] = FlopCounterMode(display=False)
            counters[mod_name].__enter__()

        return hook

    def post_hook(mod_name: str):
        def hook(module, args, out):
            counter = counters.pop(mod_name)
            counter.__exit__(None, None, None)
            params = sum(p.numel() for p in module.parameters(recurse=False))
            act = sum(a.numel() for a in args if isinstance(a, torch.Tensor)) + out.numel()
            if isinstance(module, AttentionCore):
                q, k = args[0], args[1]
                act += 2 * q.shape[0] * q.shape[2] * k.shape[2]  # score matrix written and read
            layers.append(
                LayerStats(
                    name=mod_name,
                    kind=_kind(module),
                    out_shape=tuple(out.shape),
                    macs=counter.get_total_flops() // 2,
                    params=params,
                    weight_bytes=params * width,
                    activation_bytes=act * width,
                )
            )

        return hook

    handles = []
    for mod_name, module in meta_model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, AttentionCore)):
            handles.append(module.register_forward_pre_hook(pre_hook(mod_name)))
            handles.append(module.register_forward_hook(post_hook(mod_name)))
    try:
        with torch.no_grad():
            meta_model(torch.empty(batch_size, in_chans, *hw, device="meta"))
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in meta_model.parameters())
    return Profile(name, hw, batch_size, dtype, params, layers)
