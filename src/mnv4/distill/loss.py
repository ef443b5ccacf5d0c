"""The distillation loss of the paper's student recipe: cross-entropy against the teacher's probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sharpen", "soft_cross_entropy"]


def soft_cross_entropy(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Per sample ``-sum_c p_c log softmax(z)_c`` (temperature 1, as in the paper), shape [B]: the
    trainer weights and averages per-sample losses itself.

    It differs from KL(p || softmax(z)) by the teacher's entropy, a constant for the student, so the
    gradients are the same; the value is comparable with ordinary cross-entropy.
    """
    if logits.shape != probs.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and teacher probabilities {tuple(probs.shape)} differ")
    return F.cross_entropy(logits.float(), probs.float(), reduction="none")


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's probabilities at another temperature, ``p^(1/T)`` renormalised (the same as dividing
    the teacher's logits by ``T``). ``T < 1`` sharpens, ``T > 1`` softens; ``T = 1`` returns ``probs``.

    Stored probabilities are enough to do this at training time: one labelling serves every temperature.
    Zeros (classes a top-k record dropped) stay zero.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if temperature == 1.0:
        return probs
    logp = torch.log(probs.float().clamp_min(1e-30)) / temperature
    logp = logp.masked_fill(probs <= 0, float("-inf"))
    return torch.softmax(logp, dim=-1)
