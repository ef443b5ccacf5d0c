"""The distillation loss of the paper's student recipe: cross-entropy against the teacher's probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["soft_cross_entropy"]


def soft_cross_entropy(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Per sample ``-sum_c p_c log softmax(z)_c`` (temperature 1, as in the paper), shape [B]: the
    trainer weights and averages per-sample losses itself.

    It differs from KL(p || softmax(z)) by the teacher's entropy, a constant for the student, so the
    gradients are the same; the value is comparable with ordinary cross-entropy.
    """
    if logits.shape != probs.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and teacher probabilities {tuple(probs.shape)} differ")
    return F.cross_entropy(logits.float(), probs.float(), reduction="none")
