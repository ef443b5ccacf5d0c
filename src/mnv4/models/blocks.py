"""The building blocks of MobileNetV4 (docs/architecture.md §2): ConvBN, FusedIB, UIB, Mobile MQA and MHSA.

Every block takes NCHW tensors and owns only its own parameters; the builder (mobilenetv4.py)
decides widths, strides, dilation, activation and the stochastic-depth rate of each block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

__all__ = [
    "make_divisible",
    "make_act",
    "DOWNSAMPLES",
    "BlurPool",
    "make_downsample",
    "ConvBN",
    "LayerScale",
    "FusedIB",
    "UIB",
    "AttentionCore",
    "GroupedQueryAttention",
    "AttentionBlock",
    "MobileMQA",
    "MHSA",
]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without dropping more than 10% (TF rule)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class GELU(nn.GELU):
    """nn.GELU that stays fast on channels_last maps: PyTorch's CPU GELU kernel is ~10x slower on a
    channels_last NCHW tensor than on the same memory viewed as contiguous NHWC."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return F.gelu(x.permute(0, 2, 3, 1), approximate=self.approximate).permute(0, 3, 1, 2)
        return F.gelu(x, approximate=self.approximate)


_ACTS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    # Hybrid-L uses the exact erf GELU (docs/architecture.md §2.1), which is nn.GELU's default.
    "gelu": lambda: GELU(),
    "gelu_tanh": lambda: GELU(approximate="tanh"),
    "hardswish": lambda: nn.Hardswish(inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
}


def make_act(name: str | None) -> nn.Module:
    if name is None:
        return nn.Identity()
    try:
        return _ACTS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTS)}") from None


# How a strided conv reduces resolution (docs/architecture.md "Anti-aliased downsampling"): "conv" strides
# the conv itself; "avg" and "blur" run the conv at stride 1 and reduce after BN and activation with a
# 2x2 average pool or a 3x3 binomial blur (timm's conv_aa_* and conv_blur_* models).
DOWNSAMPLES = ("conv", "avg", "blur")


class BlurPool(nn.Module):
    """Low-pass then subsample: a fixed per-channel 3x3 binomial filter ([1, 2, 1] / 4 in each direction)
    applied at ``stride`` with one pixel of zero padding, so the output has the strided conv's size."""

    def __init__(self, channels: int, stride: int = 2) -> None:
        super().__init__()
        self.channels, self.stride = channels, stride
        taps = torch.tensor([1.0, 2.0, 1.0]) / 4.0
        kernel = torch.outer(taps, taps).expand(channels, 1, 3, 3).clone()
        # Not persistent: the filter is fixed, so checkpoints hold the same keys as the plain model.
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel.to(x.dtype), stride=self.stride, padding=1, groups=self.channels)

    def extra_repr(self) -> str:
        return f"{self.channels}, stride={self.stride}"


def make_downsample(kind: str, channels: int, stride: int) -> nn.Module:
    """The pooling that follows a stride-1 conv in place of its stride (``kind`` "avg" or "blur")."""
    if kind == "avg":
        return nn.AvgPool2d(stride)
    if kind == "blur":
        return BlurPool(channels, stride)
    raise ValueError(f"unknown downsample {kind!r}; choose one of {DOWNSAMPLES}")


def _bn(channels: int, bn_kwargs: dict | None) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, **(bn_kwargs or {}))


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm -> optional activation, with symmetric 'same' padding.

    With ``downsample`` "avg" or "blur" a strided conv runs at stride 1 and the pooling follows the
    activation; it sits in ``act`` (a Sequential), so BN folding and export, which keep ``act`` as the
    op after the conv, carry it without knowing about it.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        act: str | None = "relu",
        bn_kwargs: dict | None = None,
        downsample: str = "conv",
    ) -> None:
        super().__init__()
        if downsample not in DOWNSAMPLES:
            raise ValueError(f"unknown downsample {downsample!r}; choose one of {DOWNSAMPLES}")
        pool = stride > 1 and downsample != "conv"
        padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv2d(
            in_chs, out_chs, kernel_size, 1 if pool else stride, padding, dilation=dilation, groups=groups, bias=False
        )
        self.bn = _bn(out_chs, bn_kwargs)
        self.act = make_act(act)
        if pool:
            self.act = nn.Sequential(self.act, make_downsample(downsample, out_chs, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class LayerScale(nn.Module):
    """Per-channel learnable scale (docs/architecture.md §2.5), initialised to ``init_value``."""

    def __init__(self, channels: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


def _layer_scale(channels: int, init_value: float | None) -> nn.Module:
    return nn.Identity() if init_value is None else LayerScale(channels, init_value)


class _ResidualBlock(nn.Module):
    """Shared residual logic: add the shortcut only when shapes match (docs/architecture.md §2.1)."""

    has_skip: bool
    drop_path: nn.Module

    def _init_residual(self, in_chs: int, out_chs: int, stride: int, drop_path: float) -> None:
        self.has_skip = in_chs == out_chs and stride == 1
        # Stochastic depth only exists on blocks that have a residual to fall back on.
        self.drop_path = StochasticDepth(drop_path, "row") if self.has_skip and drop_path > 0 else nn.Identity()

    def _finish(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return shortcut + self.drop_path(x) if self.has_skip else x


class FusedIB(_ResidualBlock):
    """Fused inverted bottleneck (docs/architecture.md §2.3): full kxk expansion conv, then a linear 1x1 projection."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        expand_ratio: float = 4.0,
        act: str = "relu",
        dilation: int = 1,
        drop_path: float = 0.0,
        bn_kwargs: dict | None = None,
        downsample: str = "conv",
    ) -> None:
        super().__init__()
        mid = make_divisible(in_chs * expand_ratio)
        self.expand = ConvBN(
            in_chs, mid, kernel_size, stride, dilation=dilation, act=act, bn_kwargs=bn_kwargs, downsample=downsample
        )
        self.project = ConvBN(mid, out_chs, 1, act=None, bn_kwargs=bn_kwargs)
        self._init_residual(in_chs, out_chs, stride, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(self.project(self.expand(x)), x)


class UIB(_ResidualBlock):
    """Universal Inverted Bottleneck (docs/architecture.md §2.4).

    ``start_dw``/``mid_dw``/``end_dw`` are depthwise kernel sizes, 0 meaning absent:
    IB = (0, k), ConvNext-like = (k, 0), ExtraDW = (k1, k2), FFN = (0, 0). The stride sits on the
    middle DW, or on the start DW when there is no middle DW.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        start_dw: int = 0,
        mid_dw: int = 3,
        stride: int = 1,
        expand_ratio: float = 4.0,
        end_dw: int = 0,
        act: str = "relu",
        dilation: int = 1,
        layer_scale_init: float | None = None,
        drop_path: float = 0.0,
        bn_kwargs: dict | None = None,
        downsample: str = "conv",
    ) -> None:
        super().__init__()
        if stride > 1 and not (start_dw or mid_dw):
            raise ValueError("a strided UIB needs a start or middle depthwise conv to carry the stride")
        mid = make_divisible(in_chs * expand_ratio)
        start_stride = 1 if mid_dw else stride
        self.dw_start = (
            ConvBN(in_chs, in_chs, start_dw, start_stride, in_chs, dilation, None, bn_kwargs, downsample)
            if start_dw
            else nn.Identity()
        )
        self.expand = ConvBN(in_chs, mid, 1, act=act, bn_kwargs=bn_kwargs)
        self.dw_mid = (
            ConvBN(mid, mid, mid_dw, stride, mid, dilation, act, bn_kwargs, downsample) if mid_dw else nn.Identity()
        )
        self.project = ConvBN(mid, out_chs, 1, act=None, bn_kwargs=bn_kwargs)
        self.dw_end = (
            ConvBN(out_chs, out_chs, end_dw, 1, out_chs, dilation, None, bn_kwargs) if end_dw else nn.Identity()
        )
        self.layer_scale = _layer_scale(out_chs, layer_scale_init)
        self._init_residual(in_chs, out_chs, stride, drop_path)

    def expanded(self, x: torch.Tensor) -> torch.Tensor:
        """The block up to its 1x1 expansion (after the activation): the wide map a detector taps
        before the middle DW downsamples (``feature_location="expansion"``)."""
        return self.expand(self.dw_start(x))

    def from_expanded(self, y: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """The rest of the block from :meth:`expanded`'s output; ``shortcut`` is the block's input."""
        y = self.dw_end(self.project(self.dw_mid(y)))
        return self._finish(self.layer_scale(y), shortcut)

    @property
    def taps_expansion(self) -> bool:
        """Whether :meth:`expanded` is at the input's resolution (the stride sits after the expansion)."""
        return not isinstance(self.dw_mid, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_expanded(self.expanded(x), x)


class AttentionCore(nn.Module):
    """softmax(q^T k / sqrt(d)) applied to v, on channel-major tensors, with no transposes copied.

    Shapes: q [G, dk, L], k [G, dk, M], v [G, dv, M] -> out [G, dv, L]. Both products are plain
    batched matmuls whose transposed operands are views, which is the transpose-free layout of the
    paper's einsum optimisation (docs/architecture.md §2.6, Layout). Kept as its own module so
    profilers can see the matmuls.
    """

    def __init__(self, key_dim: int) -> None:
        super().__init__()
        self.scale = key_dim**-0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        attn = torch.bmm(q.transpose(1, 2), k * self.scale).softmax(dim=-1)  # [G, L, M]
        # (attn v^T)^T rather than v attn^T: the same product, but BLAS streams attn row-major
        # instead of through a transposed view, 3x faster on CPU for Hybrid-L's 4608 x 144 maps.
        return torch.bmm(attn, v.transpose(1, 2)).transpose(1, 2)  # [G, dv, L] (a view)


class GroupedQueryAttention(nn.Module):
    """Attention with ``heads`` query heads sharing ``kv_heads`` key/value heads, on NCHW maps.

    ``kv_heads=1`` is the paper's multi-query attention (MQA), ``kv_heads=heads`` is standard MHSA.
    K and V may be spatially reduced by their own stride-``kv_stride`` depthwise conv + BN.

    Channel layout: the query projection emits channels ordered (kv group, key dim, head-in-group)
    and the output projection consumes (kv group, value dim, head-in-group). For MQA that lets all
    heads share one batched matmul against the single K/V head without broadcasting or copying.
    timm and TF order channels head-major; :mod:`mnv4.weights.timm` permutes on conversion.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        key_dim: int,
        value_dim: int,
        kv_heads: int = 1,
        kv_stride: int = 1,
        dw_kernel: int = 3,
        out_dim: int | None = None,
        bn_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        self.heads, self.kv_heads = heads, kv_heads
        self.key_dim, self.value_dim = key_dim, value_dim
        self.query = nn.Conv2d(dim, heads * key_dim, 1, bias=False)
        if kv_stride > 1:
            self.key_down = ConvBN(dim, dim, dw_kernel, kv_stride, groups=dim, act=None, bn_kwargs=bn_kwargs)
            self.value_down = ConvBN(dim, dim, dw_kernel, kv_stride, groups=dim, act=None, bn_kwargs=bn_kwargs)
        else:
            self.key_down = nn.Identity()
            self.value_down = nn.Identity()
        self.key = nn.Conv2d(dim, kv_heads * key_dim, 1, bias=False)
        self.value = nn.Conv2d(dim, kv_heads * value_dim, 1, bias=False)
        self.core = AttentionCore(key_dim)
        self.output = nn.Conv2d(heads * value_dim, out_dim or dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        g = self.kv_heads
        q = self.query(x).reshape(b * g, self.key_dim, -1)  # [B*g, dk, r*N]
        k = self.key(self.key_down(x)).reshape(b * g, self.key_dim, -1)  # [B*g, dk, M]
        v = self.value(self.value_down(x)).reshape(b * g, self.value_dim, -1)  # [B*g, dv, M]
        o = self.core(q, k, v)  # [B*g, dv, r*N]
        return self.output(o.reshape(b, -1, h, w))


class AttentionBlock(nn.Module):
    """Pre-norm attention block (docs/architecture.md §2.6): BN -> attention -> layer scale -> residual."""

    def __init__(
        self,
        dim: int,
        heads: int,
        key_dim: int,
        value_dim: int,
        kv_heads: int = 1,
        kv_stride: int = 1,
        dw_kernel: int = 3,
        layer_scale_init: float | None = None,
        drop_path: float = 0.0,
        bn_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.norm = _bn(dim, bn_kwargs)
        self.attn = GroupedQueryAttention(
            dim, heads, key_dim, value_dim, kv_heads, kv_stride, dw_kernel, bn_kwargs=bn_kwargs
        )
        self.layer_scale = _layer_scale(dim, layer_scale_init)
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.layer_scale(self.attn(self.norm(x))))


class MobileMQA(AttentionBlock):
    """Mobile MQA block: many query heads, one shared key and value head (docs/architecture.md §2.6)."""

    def __init__(self, dim: int, heads: int, key_dim: int, value_dim: int, **kwargs) -> None:
        super().__init__(dim, heads, key_dim, value_dim, kv_heads=1, **kwargs)


class MHSA(AttentionBlock):
    """Standard multi-head self-attention block with the same interface, for the MQA ablation (paper Tab. 2)."""

    def __init__(self, dim: int, heads: int, key_dim: int, value_dim: int, **kwargs) -> None:
        super().__init__(dim, heads, key_dim, value_dim, kv_heads=heads, **kwargs)


def init_weights(module: nn.Module) -> None:
    """Initialisation for training from scratch.

    Convs: He-normal on fan-out (what the MobileNet family trains well with in PyTorch); attention
    projections: Xavier-uniform, which timm found stabilises the hybrids; classifier: small normal.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, GroupedQueryAttention):
            for conv in (m.query, m.key, m.value, m.output):
                nn.init.xavier_uniform_(conv.weight)
