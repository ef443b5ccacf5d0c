"""Optimizer, LR schedule and weight EMA as the TF configs set them up (docs/training.md, Recipes)."""

from __future__ import annotations

import math
import re
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = [
    "param_groups",
    "layer_ids",
    "layer_decay_groups",
    "build_optimizer",
    "load_optimizer_state",
    "warmup_cosine",
    "build_scheduler",
    "build_ema",
    "l2_penalty",
]

_MERGE = 99999  # group_matcher ordinal meaning "part of the previous layer" (timm's format)
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def _no_decay_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(recurse=False)}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: normalisation parameters without weight decay, everything else with it.
    TF excludes exactly 'batch_normalization' variables, so biases and layer-scale are decayed."""
    no_decay = _no_decay_ids(model)
    decay, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (plain if id(p) in no_decay else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Depth of every parameter, from the model's ``group_matcher(coarse=False)`` (timm's format: group
    name -> regex, or a list of (regex, fixed ordinal or None)). A parameter's ordinal is (position of its
    group, the integers its regex captures, the fixed ordinal); unmatched parameters (the head) come last.
    The distinct ordinals, sorted, are the layers 0..L-1."""
    rules = []
    for position, spec in enumerate(model.group_matcher(coarse=False).values()):
        for pattern, fixed in [(spec, None)] if isinstance(spec, str) else spec:
            rules.append((re.compile(pattern), (position,), tuple(fixed or ())))
    ordinals: dict[str, tuple[float, ...]] = {}
    for name, _ in model.named_parameters():
        ordinals[name] = (math.inf,)
        for regex, prefix, fixed in rules:
            match = regex.match(name)
            if match:
                ordinals[name] = prefix + tuple(float(g) for g in match.groups() if g is not None) + fixed
                break
    rank: dict[tuple[float, ...], int] = {}
    for o in sorted(set(ordinals.values())):
        # timm's convention: an ordinal ending in 99999 joins the layer before it
        rank[o] = len(set(rank.values())) - (1 if rank and o[-1] == _MERGE else 0)
    return {name: rank[o] for name, o in ordinals.items()}


def layer_decay_groups(model: nn.Module, lr: float, weight_decay: float, decay: float) -> list[dict]:
    """AdamW groups with layer-wise LR decay: layer i of L gets ``lr * decay ** (L - 1 - i)`` (the head
    keeps ``lr``), split by weight decay as :func:`param_groups` does. Groups are ordered head first,
    so ``param_groups[0]`` carries the peak LR the trainer logs."""
    ids = layer_ids(model)
    top = max(ids.values())
    no_decay = _no_decay_ids(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, decayed = ids[name], id(p) not in no_decay
        scale = decay ** (top - layer)
        group = groups.setdefault(
            (layer, decayed),
            {"params": [], "weight_decay": weight_decay if decayed else 0.0, "lr": lr * scale, "lr_scale": scale},
        )
        group["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], not k[1]))]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    layer_decay: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW (the fused kernel where every parameter has one); ``layer_decay`` < 1 lowers the LR of earlier
    layers (:func:`layer_decay_groups`), which needs a model with ``group_matcher`` (every MobileNetV4 has one)."""
    if layer_decay < 1.0 and hasattr(model, "group_matcher"):
        groups = layer_decay_groups(model, lr, weight_decay, layer_decay)
    else:
        groups = param_groups(model, weight_decay)
    # The fused kernel (one elementwise pass per tensor, several times faster than the per-tensor loop
    # on CPU) is deterministic and, being elementwise, independent of threads and of how tensors are
    # grouped, so resumes stay bit-exact. Parameters it has no kernel for take that loop (foreach=False).
    if all(_fused_kernel_for(p) for g in groups for p in g["params"]):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)


# Devices with a fused AdamW kernel (PyTorch's optimizer docs); the check is all-or-nothing because a
# GradScaler treats a fused optimizer's every group as fused.
_FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")


def _fused_kernel_for(p: torch.Tensor) -> bool:
    return p.is_floating_point() and p.device.type in _FUSED_DEVICES


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore a saved optimizer state but keep the kernel ``optimizer`` was built with: a checkpoint's
    param groups carry the kernel flags of whatever wrote it (an older mnv4 that used the per-tensor loop,
    another device), and a GradScaler expects the fused kernel's arguments wherever it was built fused."""
    kernel = {k: optimizer.defaults[k] for k in ("fused", "foreach")}
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group.update(kernel)


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
