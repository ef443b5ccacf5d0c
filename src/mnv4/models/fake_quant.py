"""INT8 fake quantization of conv and linear layers, the scheme mnv4's INT8 routes deploy: weights per
output channel, symmetric int8 (absmax / 127); inputs per tensor, asymmetric uint8 over their min-max
range widened to hold 0. Rounding passes gradients straight through (torch's fake-quantize ops), so a
model can train with it (the ``qat`` recipe) and be measured with it (mnv4.deploy.sensitivity).

:func:`attach_fake_quant` swaps each layer's class for a subclass whose ``forward`` quantizes: the
state dict, parameters and checkpoints stay those of the plain model, and a deep copy (EMA) keeps
quantizing. The input range is the current batch's (no observer state), so a resumed run is the same
computation as an uninterrupted one; the exporters calibrate the deployed ranges afterwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["fake_quant_weight", "fake_quant_input", "attach_fake_quant", "detach_fake_quant", "has_fake_quant"]


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 (levels -127..127) of a conv/linear weight."""
    scale = w.detach().abs().flatten(1).amax(1).clamp_min(1e-12) / 127.0
    zero = torch.zeros(len(w), dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale.float(), zero, 0, -127, 127)


def fake_quant_input(x: torch.Tensor, lo: float | None = None, hi: float | None = None) -> torch.Tensor:
    """Per-tensor asymmetric uint8 over ``[lo, hi]`` (default: ``x``'s own range), 0 always inside."""
    if lo is None or hi is None:
        lo, hi = float(x.detach().min()), float(x.detach().max())
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / 255.0
    zero = int(min(255, max(0, round(-lo / scale))))
    return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)


class _FakeQuantConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(fake_quant_input(x), fake_quant_weight(self.weight), self.bias)


class _FakeQuantLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quant_input(x), fake_quant_weight(self.weight), self.bias)


_SWAPS = {nn.Conv2d: _FakeQuantConv2d, nn.Linear: _FakeQuantLinear}


def attach_fake_quant(model: nn.Module) -> int:
    """Make every plain ``nn.Conv2d`` / ``nn.Linear`` of ``model`` fake-quantize (in place); returns how many."""
    n = 0
    for m in model.modules():
        if type(m) in _SWAPS:
            m.__class__ = _SWAPS[type(m)]
            n += 1
    return n


def detach_fake_quant(model: nn.Module) -> None:
    """Undo :func:`attach_fake_quant` (in place)."""
    back = {v: k for k, v in _SWAPS.items()}
    for m in model.modules():
        if type(m) in back:
            m.__class__ = back[type(m)]


def has_fake_quant(model: nn.Module) -> bool:
    return any(type(m) in (_FakeQuantConv2d, _FakeQuantLinear) for m in model.modules())
