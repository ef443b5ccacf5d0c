"""Optimizer, LR schedule and weight EMA as the TF configs set them up (docs/training.md, Recipes)."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["param_groups", "build_optimizer", "warmup_cosine", "build_scheduler", "build_ema", "l2_penalty"]

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: normalisation parameters without weight decay, everything else with it.
    TF excludes exactly 'batch_normalization' variables, so biases and layer-scale are decayed."""
    no_decay = {id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(recurse=False)}
    decay, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (plain if id(p) in no_decay else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    # foreach=False keeps the update order-independent of tensor grouping, so resumes are bit-exact.
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, foreach=False)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup_steps``, then cosine to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps  # +1: the first step already trains, at a small LR
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float
) -> LambdaLR:
    # A partial (not a lambda) so the scheduler's state_dict stays plain data.
    fn = partial(warmup_cosine, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio)
    return LambdaLR(optimizer, fn)


def build_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """EMA of parameters and BN buffers; the first ``update_parameters`` call copies the weights,
    which is how TF's EMA ``start_step`` behaves (the average starts from the weights at that step)."""
    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def l2_penalty(model: nn.Module, l2: float) -> torch.Tensor | None:
    """Keras-style kernel regulariser (l2 * sum w^2 over conv/linear kernels), on top of AdamW."""
    if l2 <= 0:
        return None
    kernels = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return l2 * sum((w.float() ** 2).sum() for w in kernels)
