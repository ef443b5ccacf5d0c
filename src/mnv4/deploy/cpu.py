"""Fast eager CPU inference for a fused model: oneDNN convs with pre-packed weights and fused epilogues.

Plain eager PyTorch spends much of a batch-1 mobile net's time outside the arithmetic: every
``nn.Conv2d`` call re-lays-out its weights for oneDNN, and every activation and residual add is a
separate pass over memory. After :func:`mnv4.deploy.fuse` each block is a chain of conv(+act), so
here each conv becomes one ``mkldnn._convolution_pointwise`` call with its weights packed once
(per input shape) and the activation - or the block's residual add - fused into the conv.
Activations stay channels_last (NHWC) throughout, oneDNN's native layout.

This is a run-time optimization only: the result is not exportable (use the plain fused model
for export). Where oneDNN is unavailable, :func:`optimize_for_cpu` returns the model unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..host import cpu_flags
from .fusion import ConvAct, FusedAttention, FusedChain, fuse

__all__ = ["optimize_for_cpu", "PackedConv", "mkldnn_available", "bf16_support"]

# nn activation -> (oneDNN post-op attr, algorithm); others stay separate eager ops.
_ATTRS: dict[type, tuple[str, str | None]] = {nn.ReLU: ("relu", None), nn.Hardswish: ("hardswish", None)}


def _act_attr(act: nn.Module | None) -> tuple[str, str | None] | None:
    if act is None:
        return ("none", None)
    if isinstance(act, nn.GELU):
        return ("gelu", act.approximate)
    return _ATTRS.get(type(act))


def bf16_support() -> tuple[bool | None, str]:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX; Linux's /proc/cpuinfo flags) and
    one line saying so: without it OpenVINO runs a bf16 hint in fp32 and torch emulates bf16 (slower)."""
    flags = cpu_flags()
    if flags is None:
        return None, "bf16: cannot tell whether this CPU has AVX512-BF16/AMX (no /proc/cpuinfo)"
    have = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if have:
        return True, f"bf16: this CPU computes it natively ({', '.join(have)})"
    return False, "bf16: this CPU has no AVX512-BF16/AMX: OpenVINO runs bf16 as fp32 and torch emulates it (slower)"


def mkldnn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class PackedConv(nn.Module):
    """A conv + optional activation / residual add, run by oneDNN with weights packed per input shape."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module | None) -> None:
        super().__init__()
        attr = _act_attr(act)
        self.attr, self.algorithm = attr if attr is not None else ("none", None)
        self.post_act = act if attr is None else None  # an activation oneDNN cannot fuse runs after
        self.weight = conv.weight.detach().contiguous()
        self.bias = conv.bias.detach() if conv.bias is not None else None
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self._packed: dict[tuple[int, ...], torch.Tensor] = {}

    def _weight_for(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape)
        w = self._packed.get(key)
        if w is None:
            w = torch._C._nn.mkldnn_reorder_conv2d_weight(
                self.weight.to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, list(key)
            )
            if len(self._packed) > 8:  # many input shapes: keep memory bounded
                self._packed.clear()
            self._packed[key] = w
        return w

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        w = self._weight_for(x)
        args = (self.padding, self.stride, self.dilation, self.groups)
        if residual is None:
            y = torch.ops.mkldnn._convolution_pointwise(x, w, self.bias, *args, self.attr, [None], self.algorithm)
        else:
            residual = residual.contiguous(memory_format=torch.channels_last)
            y = torch.ops.mkldnn._convolution_pointwise.binary(
                x,
                residual,
                w,
                self.bias,
                *args,
                "add",
                1.0,
                None if self.attr == "none" else self.attr,
                [None],
                self.algorithm,
            )
        return self.post_act(y) if self.post_act is not None else y


class PackedChain(nn.Module):
    """A fused UIB/FusedIB whose last conv also adds the residual (one pass over the output)."""

    def __init__(self, chain: FusedChain) -> None:
        super().__init__()
        convs = list(chain.layers)
        self.body = nn.Sequential(*[PackedConv(c.conv, c.act) for c in convs[:-1]])
        self.last = PackedConv(convs[-1].conv, convs[-1].act)
        self.has_skip = chain.has_skip
        # A residual can only be fused when it is added after the last conv's activation-free output.
        self.fuse_add = chain.has_skip and convs[-1].act is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.fuse_add:
            return self.last(y, x)
        y = self.last(y)
        return x + y if self.has_skip else y


class PackedAttention(nn.Module):
    """FusedAttention with packed 1x1/DW convs and the output conv adding the residual."""

    def __init__(self, a: FusedAttention) -> None:
        super().__init__()
        self.query, self.key, self.value = PackedConv(a.query, None), PackedConv(a.key, None), PackedConv(a.value, None)
        self.output = PackedConv(a.output, None)
        self.key_down = PackedConv(a.key_down, None) if a.key_down is not None else None
        self.value_down = PackedConv(a.value_down, None) if a.value_down is not None else None
        self.key_dim, self.value_dim, self.kv_heads = a.key_dim, a.value_dim, a.kv_heads
        self.core = a.core
        if a.key_down is not None:
            self.register_buffer("kv_scale", a.kv_scale)
            self.register_buffer("kv_shift", a.kv_shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        g = self.kv_heads
        # The matmuls want channel-major tokens; one copy out of NHWC per projection.
        q = self.query(x).contiguous().reshape(b * g, self.key_dim, -1)
        if self.key_down is not None:
            kv = torch.addcmul(self.kv_shift, x, self.kv_scale)  # one pass; this path is never exported
            k, v = self.key(self.key_down(kv)), self.value(self.value_down(kv))
        else:
            k, v = self.key(x), self.value(x)
        k = k.contiguous().reshape(b * g, self.key_dim, -1)
        v = v.contiguous().reshape(b * g, self.value_dim, -1)
        o = self.core(q, k, v).reshape(b, -1, h, w)
        return self.output(o, x)


class _ToChannelsLast(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.contiguous(memory_format=torch.channels_last))


def _pack_children(parent: nn.Module) -> None:
    for name, child in list(parent.named_children()):
        if isinstance(child, FusedChain):
            setattr(parent, name, PackedChain(child))
        elif isinstance(child, FusedAttention):
            setattr(parent, name, PackedAttention(child))
        elif isinstance(child, ConvAct):
            setattr(parent, name, PackedConv(child.conv, child.act))
        else:
            _pack_children(child)


@torch.no_grad()
def optimize_for_cpu(model: nn.Module) -> nn.Module:
    """Fuse ``model`` (if not yet) and swap its convs for pre-packed oneDNN ones; eval-only, not exportable.

    float32 only. The stem receives the input as channels_last, so callers may pass plain NCHW.
    """
    fused = fuse(model)
    if not mkldnn_available() or next(fused.parameters()).dtype != torch.float32:
        return fused
    if fused is model:
        import copy

        fused = copy.deepcopy(model)
    _pack_children(fused)
    fused.stem = _ToChannelsLast(fused.stem)
    fused.cpu_optimized = True
    return fused
