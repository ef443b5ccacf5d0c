"""Shared fixtures of the NAS tests: a tiny search space (every decision kind, MQA slots) and data."""

from __future__ import annotations

from mnv4.data.datasets import DataBundle
from mnv4.data.digits import digits_split
from mnv4.models.specs import mqa
from mnv4.nas.space import SearchSpace, StageSpace


def tiny_space(hybrid: bool = False) -> SearchSpace:
    """About 10^10 architectures of a few thousand parameters each."""
    return SearchSpace(
        name="tiny_hybrid" if hybrid else "tiny",
        stem=(8, 16),
        stages=(
            StageSpace(4, (1, 2), (8, 16), first=("fused_ib",), expand=(2.0, 4.0), fused_expand=(2.0, 4.0)),
            StageSpace(8, (1, 2), (16, 24), expand=(2.0, 4.0)),
            StageSpace(16, (1, 2, 3), (24, 32), expand=(2.0, 4.0), mqa=mqa(2, 8, kv_stride=2) if hybrid else None),
            StageSpace(32, (1, 2), (32, 48), expand=(2.0, 4.0), mqa=mqa(2, 8) if hybrid else None),
        ),
        layer_scale_init=1e-5 if hybrid else None,
        num_features=64,
        head_hidden_size=64,
    )


def tiny_digits(n_train: int = 320, n_val: int = 64, size: int = 16) -> DataBundle:
    tr, va = digits_split(0.2, seed=0, size=size)
    tr.images, tr.targets = tr.images[:n_train], tr.targets[:n_train]
    va.images, va.targets = va.images[:n_val], va.targets[:n_val]
    return DataBundle("digits", tr, va, list(tr.classes), size)
