"""Inference fusion: fold BatchNorm and layer scale into convs, drop the training-only modules.

``fuse(model)`` returns an eval-only copy whose blocks are lean replacements of the training
blocks: every conv carries its BN as a bias, UIB/FusedIB become a plain chain of conv(+act) with
an optional residual, and each attention block becomes one module with folded projections.
The result is an ordinary ``nn.Module`` of standard ops, so it exports exactly like the original.

Where folding is *not* exact, it is not done:

* The attention pre-norm BN folds into the 1x1 query/key/value convs (they gain a bias), but not
  into the zero-padded stride-``kv_stride`` depthwise K/V down-sampling convs: there the padded
  border would see ``BN(0) = beta`` rather than 0. Those convs get a per-channel affine in front
  (computed once and shared by K and V); their *own* BN still folds into them.
* Layer scale folds into the last conv of a UIB (the projection, or the end DW when present) and
  into the attention output conv, because both are linear per output channel.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..models.blocks import UIB, AttentionBlock, AttentionCore, ConvBN, FusedIB, LayerScale

__all__ = [
    "fuse",
    "fold_bn",
    "bn_affine",
    "ConvAct",
    "FusedChain",
    "FusedAttention",
    "is_fused",
    "token_major_attention",
]


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with ``bn(x) == x * scale + shift`` per channel in eval mode."""
    mean = bn.running_mean if bn.running_mean is not None else torch.zeros(bn.num_features)
    var = bn.running_var if bn.running_var is not None else torch.ones(bn.num_features)
    # Computed in float64 so that folding does not add its own rounding to the 1e-5 budget.
    scale = torch.rsqrt(var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def _conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    new = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=bias is not None,
        padding_mode=conv.padding_mode,
    )
    dtype = conv.weight.dtype
    with torch.no_grad():
        new.weight.copy_(weight.to(dtype))
        if bias is not None:
            new.bias.copy_(bias.to(dtype))
    return new.to(conv.weight.device)


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, out_scale: torch.Tensor | None = None) -> nn.Conv2d:
    """A new conv computing ``bn(conv(x)) * out_scale`` (either part optional) with a bias."""
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)
    if bn is not None:
        s, t = bn_affine(bn)
        w = w * s.view(-1, 1, 1, 1)
        b = b * s + t
    if out_scale is not None:
        g = out_scale.detach().double()
        w = w * g.view(-1, 1, 1, 1)
        b = b * g
    return _conv_like(conv, w, b)


def _fold_input_affine(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> nn.Conv2d:
    """A new 1x1 conv computing ``conv(x * scale + shift)``; exact only because a 1x1 conv has no padding."""
    if conv.kernel_size != (1, 1) or conv.groups != 1:
        raise ValueError("input-side folding is only exact for dense 1x1 convs")
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)
    b = b + w[:, :, 0, 0] @ shift
    w = w * scale.view(1, -1, 1, 1)
    return _conv_like(conv, w, b)


class ConvAct(nn.Module):
    """A conv with BN folded in, then its activation (absent for linear layers)."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = conv
        self.act = act if act is not None and not isinstance(act, nn.Identity) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.act(x) if self.act is not None else x


class FusedChain(nn.Module):
    """A fused UIB or FusedIB: its convs in order, then the residual add when it has one.

    ``tap`` is the number of leading layers that make a UIB's :meth:`~mnv4.models.blocks.UIB.expanded`
    (None when the block has no expansion map at its input's resolution), so a features_only model read at
    ``feature_location="expansion"`` runs fused as it runs unfused."""

    def __init__(self, layers: list[nn.Module], has_skip: bool, tap: int | None = None) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.has_skip = has_skip
        self.tap = tap

    @property
    def taps_expansion(self) -> bool:
        return self.tap is not None

    def expanded(self, x: torch.Tensor) -> torch.Tensor:
        if self.tap is None:
            raise ValueError("this fused block has no expansion map to read")
        return self.layers[: self.tap](x)

    def from_expanded(self, y: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        y = self.layers[self.tap :](y)
        return shortcut + y if self.has_skip else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x)
        return x + y if self.has_skip else y


class _UnscaledCore(AttentionCore):
    """The attention core with 1/sqrt(d) already folded into the key projection (one op fewer)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        attn = torch.bmm(q.transpose(1, 2), k).softmax(dim=-1)  # [G, L, M]
        return torch.bmm(v, attn.transpose(1, 2))  # [G, dv, L]


class FusedAttention(nn.Module):
    """A whole pre-norm attention block (norm, Q/K/V, core, output, layer scale, residual), folded.

    Keeps the block's transpose-free channel layout (kv group, dim, head) so that the two batched
    matmuls need no copies, and stays made of standard ops so it exports to every runtime.

    ``token_major`` (multi-query attention only; :func:`token_major_attention`) computes the same
    block on ``[B, tokens, channels]`` matrices with the query/output channels reordered head-major:
    in NHWC memory (LiteRT) every reshape is then free, where the channel-major form needs a transpose
    around each (docs/deploy.md "Attention layout on NHWC runtimes").
    """

    def __init__(
        self,
        query: nn.Conv2d,
        key: nn.Conv2d,
        value: nn.Conv2d,
        output: nn.Conv2d,
        key_dim: int,
        value_dim: int,
        kv_heads: int,
        key_down: nn.Conv2d | None = None,
        value_down: nn.Conv2d | None = None,
        kv_scale: torch.Tensor | None = None,
        kv_shift: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.query, self.key, self.value, self.output = query, key, value, output
        self.key_down, self.value_down = key_down, value_down
        self.key_dim, self.value_dim, self.kv_heads = key_dim, value_dim, kv_heads
        self.core = _UnscaledCore(key_dim)
        self.token_major = False
        self.has_kv_affine = kv_scale is not None
        if kv_scale is not None:
            self.register_buffer("kv_scale", kv_scale.view(1, -1, 1, 1).clone())
            self.register_buffer("kv_shift", kv_shift.view(1, -1, 1, 1).clone())

    def _key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key_down is not None:
            # The pre-norm as an explicit affine: the padded DW convs must see BN(x), zero-padded.
            # (mul + add rather than addcmul: Core ML's converter has no addcmul.)
            kv = x * self.kv_scale + self.kv_shift if self.has_kv_affine else x
            return self.key(self.key_down(kv)), self.value(self.value_down(kv))
        return self.key(x), self.value(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_major:
            return self._forward_tokens(x)
        b, _, h, w = x.shape
        g = self.kv_heads
        q = self.query(x).reshape(b * g, self.key_dim, -1)
        k, v = self._key_value(x)
        o = self.core(q, k.reshape(b * g, self.key_dim, -1), v.reshape(b * g, self.value_dim, -1))
        return x + self.output(o.reshape(b, -1, h, w))

    def _forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        # Query channels are (head, key dim), output channels (head, value dim) here: row-major
        # [B, H, W, heads * dk] reshapes to [B, H*W*heads, dk] without moving data.
        b, _, h, w = x.shape
        q = self.query(x).permute(0, 2, 3, 1).reshape(b, -1, self.key_dim)  # [B, N*heads, dk]
        k, v = self._key_value(x)
        k = k.permute(0, 2, 3, 1).reshape(b, -1, self.key_dim)  # [B, M, dk]
        v = v.permute(0, 2, 3, 1).reshape(b, -1, self.value_dim)  # [B, M, dv]
        o = torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1), v)  # [B, N*heads, dv]
        return x + self.output(o.reshape(b, h, w, -1).permute(0, 3, 1, 2))

    def to_token_major(self) -> None:
        """Switch to the token-major form in place (class docstring); the outputs stay the same."""
        if self.kv_heads != 1:
            raise ValueError("the token-major form is for multi-query attention (kv_heads=1)")
        if self.token_major:
            return
        heads = self.query.out_channels // self.key_dim
        # channel-major index (d, head) -> head-major (head, d)
        q_order = torch.arange(self.key_dim * heads).view(self.key_dim, heads).t().reshape(-1)
        o_order = torch.arange(self.value_dim * heads).view(self.value_dim, heads).t().reshape(-1)
        with torch.no_grad():
            self.query.weight.copy_(self.query.weight[q_order])
            if self.query.bias is not None:
                self.query.bias.copy_(self.query.bias[q_order])
            self.output.weight.copy_(self.output.weight[:, o_order])
        self.token_major = True


def token_major_attention(model: nn.Module) -> nn.Module:
    """A copy of a fused ``model`` whose multi-query attention blocks run token-major (for NHWC runtimes:
    LiteRT's graph loses the transposes around each attention reshape; ``FusedAttention``)."""

    def mqa_blocks(m: nn.Module) -> list[FusedAttention]:
        return [b for b in m.modules() if isinstance(b, FusedAttention) and b.kv_heads == 1]

    if not mqa_blocks(model):
        return model
    model = copy.deepcopy(model)
    for block in mqa_blocks(model):
        block.to_token_major()
    return model


def _fuse_convbn(m: ConvBN, out_scale: torch.Tensor | None = None) -> ConvAct:
    return ConvAct(fold_bn(m.conv, m.bn, out_scale), m.act)


def _gamma(ls: nn.Module) -> torch.Tensor | None:
    return ls.gamma.detach() if isinstance(ls, LayerScale) else None


def _fuse_uib(m: UIB) -> FusedChain:
    parts = [p for p in (m.dw_start, m.expand, m.dw_mid, m.project, m.dw_end) if isinstance(p, ConvBN)]
    gamma = _gamma(m.layer_scale)
    if gamma is not None and parts[-1].act is not None and not isinstance(parts[-1].act, nn.Identity):
        raise ValueError("layer scale after a non-linear conv cannot be folded")  # never built by UIB
    layers = [_fuse_convbn(p) for p in parts[:-1]] + [_fuse_convbn(parts[-1], gamma)]
    tap = parts.index(m.expand) + 1 if m.taps_expansion else None
    return FusedChain(layers, m.has_skip, tap)


def _fuse_fused_ib(m: FusedIB) -> FusedChain:
    return FusedChain([_fuse_convbn(m.expand), _fuse_convbn(m.project)], m.has_skip)


def _fuse_attention(m: AttentionBlock) -> FusedAttention:
    a = m.attn
    s, t = bn_affine(m.norm)
    gamma = _gamma(m.layer_scale)
    dk_scale = torch.tensor(a.key_dim**-0.5, dtype=torch.float64)
    query = _fold_input_affine(a.query, s, t)
    output = fold_bn(a.output, None, gamma) if gamma is not None else fold_bn(a.output)
    if isinstance(a.key_down, ConvBN):
        key_down, value_down = fold_bn(a.key_down.conv, a.key_down.bn), fold_bn(a.value_down.conv, a.value_down.bn)
        key = fold_bn(a.key, None, dk_scale.expand(a.key.out_channels))
        value = fold_bn(a.value)
        kv_scale, kv_shift = s.to(a.query.weight.dtype), t.to(a.query.weight.dtype)
    else:
        key_down = value_down = kv_scale = kv_shift = None
        key = _fold_input_affine(fold_bn(a.key, None, dk_scale.expand(a.key.out_channels)), s, t)
        value = _fold_input_affine(a.value, s, t)
    return FusedAttention(
        query, key, value, output, a.key_dim, a.value_dim, a.kv_heads, key_down, value_down, kv_scale, kv_shift
    )


def _fuse_module(m: nn.Module) -> nn.Module | None:
    """The fused replacement of ``m``, or None when ``m`` is not a fusable block."""
    if isinstance(m, ConvBN):
        return _fuse_convbn(m)
    if isinstance(m, UIB):
        return _fuse_uib(m)
    if isinstance(m, FusedIB):
        return _fuse_fused_ib(m)
    if isinstance(m, AttentionBlock):
        return _fuse_attention(m)
    if isinstance(m, nn.Dropout):
        return nn.Identity()
    return None


def _fold_sequential_bn(seq: nn.Sequential) -> None:
    """Fold ``Conv2d -> BatchNorm2d`` neighbours of a Sequential (how torchvision builds its nets)."""
    children = list(seq.named_children())
    for (name, conv), (bn_name, bn) in zip(children, children[1:]):
        if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
            setattr(seq, name, fold_bn(conv, bn))
            setattr(seq, bn_name, nn.Identity())


def _fuse_children(parent: nn.Module) -> None:
    if isinstance(parent, nn.Sequential):
        _fold_sequential_bn(parent)
    for name, child in list(parent.named_children()):
        new = _fuse_module(child)
        if new is None:
            _fuse_children(child)
        else:
            setattr(parent, name, new)


def is_fused(model: nn.Module) -> bool:
    return bool(getattr(model, "is_fused", False))


@torch.no_grad()
def fuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """An inference-only copy of ``model`` (any MobileNetV4) with BN, layer scale and dropout folded away.

    Outputs match ``model.eval()`` to float rounding (within 1e-5 relative, tests/test_fuse.py). The
    fused model can't be trained; metadata (``spec``, ``preprocess``, ``class_names``...) is kept. Other networks get
    their ``Conv2d -> BatchNorm2d`` pairs inside ``nn.Sequential`` folded and dropout removed.
    """
    if is_fused(model):
        return model
    fused = model if inplace else copy.deepcopy(model)
    fused.eval()
    _fuse_children(fused)
    fused.is_fused = True
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused
