"""An activation outlier made on purpose, for the INT8 tests (sensitivity ranking, QAT vs PTQ)."""

from __future__ import annotations

import torch
from torch import nn


def add_outlier_channel(
    model: nn.Module, feeder: nn.Module, consumer: nn.Conv2d, images: torch.Tensor, factor: float
) -> int:
    """Make ``consumer``'s input ``factor`` times larger in its most active channel, keeping the function
    (in place; returns the channel). ``feeder`` is the conv with bias or the BatchNorm whose output reaches
    ``consumer`` through a ReLU only: its weight and bias for that channel are scaled up (ReLU commutes
    with a positive scale) and ``consumer``'s weights for it scaled down. Per-tensor INT8 of
    ``consumer``'s input then spends its 256 levels on that one channel."""
    seen = []
    hook = consumer.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.inference_mode():
        model(images)
    hook.remove()
    c = int(seen[0].mean((0, 2, 3)).argmax())
    with torch.no_grad():
        feeder.weight[c] *= factor
        feeder.bias[c] *= factor
        consumer.weight[:, c] /= factor
    return c
