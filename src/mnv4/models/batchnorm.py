"""BatchNorm statistics for models that never saw data: detect them, re-estimate them.

A freshly built network in eval mode normalises with BatchNorm's default running statistics
(mean 0, variance 1), not with the statistics of its own activations. He-initialised convs shrink
or grow the signal at every layer, and nothing renormalises it, so a random-weight MNv4's logits
end up with a standard deviation of about 3e-6 (Conv-S) down to 1e-23 (Hybrid-M, where layer scale
1e-5 multiplies already tiny values): the denormal range. Timing such a model measures the CPU's
denormal slow path, and a parity check compares numbers near zero.

:func:`recalibrate_batchnorm` runs a few batches through the model with only its BatchNorm layers
in training mode, accumulating a plain average of the batch statistics (``momentum=None``), so in
eval mode every BN again outputs activations of unit scale, as in a trained network. Weights are
not touched and nothing is learned; the result is a faithful stand-in for timing and for checking
a runtime's arithmetic, not a model with any accuracy.

One limit: a hybrid's layer scale (1e-5 at init) also scales blocks without a residual, so its
late-stage trunk stays near 1e-5, where BN's own eps (1e-5) caps the renormalisation; those BN
outputs come back to ~1e-4 rather than 1 (logits ~0.1): far from denormals, which is what timing
needs (Hybrid-M: every BN output's std goes from below 1e-20 to above 1e-5, ``tests/test_batchnorm.py``).

:func:`debias_running_stats` is for training: BatchNorm's running averages start at (0, 1) and move by
``momentum`` per batch, so after n batches the start still weighs (1 - momentum)^n. Deep layers of a
fresh MNv4 see batch variances near 1e-4, so after the 66 steps of a 3-epoch digits run (momentum 0.1)
the running variance was still ~10x too large and evaluation ran at chance while the training loss
fell. The hook averages cumulatively until 1/momentum batches have been seen (as Adam corrects its
moment estimates), which takes the start's weight to zero from the first batch on.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import MNv4Error, check_int
from .meta import update_weights_meta

__all__ = [
    "batchnorm_layers",
    "debias_running_stats",
    "has_default_bn_stats",
    "noise_batches",
    "recalibrate_batchnorm",
]


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def has_default_bn_stats(model: nn.Module) -> bool:
    """True when ``model`` has BatchNorm layers and none of them has seen a batch (mean 0, var 1).

    That is the state of a freshly built network; any training or loaded checkpoint changes it.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return False
    for bn in layers:
        if bn.running_mean is None or bn.running_var is None:
            return False
        tracked = getattr(bn, "num_batches_tracked", None)
        if tracked is not None and int(tracked) != 0:
            return False
        if bool(bn.running_mean.any()) or not bool((bn.running_var == 1).all()):
            return False
    return True


def debias_running_stats(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Make each BatchNorm's running statistics an unbiased average from its first training batch on.

    A forward pre-hook sets the layer's momentum to ``max(momentum, 1 / (batches_seen + 1))``: the
    first batch replaces the initial (0, 1), the next ones are averaged equally, and from 1/momentum
    batches on the layer's own exponential average takes over unchanged. The count is the layer's
    ``num_batches_tracked`` buffer, which checkpoints keep, so a resumed run continues identically.
    Layers that already saw many batches (pretrained weights) are unaffected. Returns the hook handles.
    """
    handles = []
    for bn in batchnorm_layers(model):
        if bn.momentum is None or getattr(bn, "num_batches_tracked", None) is None:
            continue  # cumulative already, or no count to correct with
        handles.append(bn.register_forward_pre_hook(_Debias(float(bn.momentum))))
    return handles


class _Debias:
    """The pre-hook; once past 1/momentum batches it stops reading the count (a device sync on GPUs)."""

    def __init__(self, base: float) -> None:
        self.base, self.done = base, False

    def __call__(self, bn: _BatchNorm, args: tuple) -> None:
        if self.done or not bn.training:
            return
        seen = int(bn.num_batches_tracked)
        self.done = seen + 1 >= 1.0 / self.base
        bn.momentum = self.base if self.done else 1.0 / (seen + 1)


def noise_batches(
    input_size: int, batches: int = 4, batch_size: int = 8, in_chans: int = 3, seed: int = 0
) -> list[torch.Tensor]:
    """Seeded standard-normal batches [batch_size, in_chans, input_size, input_size].

    N(0, 1) per pixel is roughly what a normalised image looks like to the first layer.
    """
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, in_chans, input_size, input_size, generator=g) for _ in range(batches)]


def _as_batches(inputs: torch.Tensor | Iterable[Any], batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() != 4:
            raise MNv4Error(f"recalibration inputs must be [N, C, H, W], got shape {list(inputs.shape)}")
        return (inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size))
    # A DataLoader or any iterable of tensors / (tensor, label) pairs.
    return (b[0] if isinstance(b, list | tuple) else b for b in inputs)


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    inputs: torch.Tensor | Iterable[Any],
    steps: int | None = None,
    batch_size: int = 8,
    progress: bool | None = False,
    inputs_kind: str = "",
) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance on ``inputs``; returns ``model`` in eval mode.

    Args:
        inputs: a batch tensor [N, C, H, W] (split into ``batch_size`` chunks), or an iterable of
            batches (tensors or ``(images, labels)`` pairs, e.g. a DataLoader).
        steps: use at most this many batches (default: all of them).
        batch_size: chunk size when ``inputs`` is one tensor; BN layers after the global pool see
            one value per image and channel, so a batch needs at least 2 images.
        progress: a progress bar over the batches; None shows it on terminals only.
        inputs_kind: what the inputs are, for the record (e.g. "seeded N(0,1) noise").

    Only BN layers run in training mode; dropout and stochastic depth stay off, so the statistics
    are those of the eval-mode network. The average is cumulative (``momentum=None``): every batch
    counts equally. The model's weights record (:func:`mnv4.models.meta.weights_meta`: ``bn_images``,
    ``bn_batches``, ``bn_inputs``) says what was done.
    """
    check_int("batch_size", batch_size, 2)
    if steps is not None:
        check_int("steps", steps, 1)
    layers = batchnorm_layers(model)
    was_training = model.training
    if not layers:
        return model.train(was_training)
    saved = [(bn, bn.momentum) for bn in layers]
    model.eval()
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    from tqdm import tqdm

    batches = _as_batches(inputs, batch_size)
    if steps is not None:
        batches = itertools.islice(batches, steps)
    done = images = 0
    try:
        for x in tqdm(batches, desc="BN statistics", unit="batch", total=steps, disable=_disable(progress)):
            if len(x) < 2:
                continue  # a 1-image batch has no variance after the global pool; skip the remainder
            device = next((p.device for p in model.parameters()), x.device)
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
            model(x.to(device=device, dtype=dtype))
            done += 1
            images += len(x)
    finally:
        for bn, momentum in saved:
            bn.momentum = momentum
        model.eval()
    if done == 0:
        raise MNv4Error("BatchNorm recalibration got no batch of 2 or more images; pass more `inputs`")
    update_weights_meta(model, bn_images=images, bn_batches=done, bn_inputs=inputs_kind)
    return model.train(was_training)


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress
