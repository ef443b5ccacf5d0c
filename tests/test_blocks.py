"""Block semantics of docs/architecture.md §2: rounding, UIB instantiations, residual rule, attention maths."""

import math

import pytest
import torch
from torch import nn

from mnv4.models.blocks import MHSA, UIB, ConvBN, FusedIB, MobileMQA, make_divisible
from mnv4.perf import profile


@pytest.mark.parametrize(
    "value, expected", [(3, 8), (11, 16), (12, 16), (20, 24), (192, 192), (80 * 6, 480), (96 * 0.35, 32), (1.0, 8)]
)
def test_make_divisible_tf_rule(value, expected):
    assert make_divisible(value) == expected


def _kinds(block: UIB) -> tuple[bool, bool]:
    return not isinstance(block.dw_start, nn.Identity), not isinstance(block.dw_mid, nn.Identity)


@pytest.mark.parametrize("start, mid, name", [(0, 3, "IB"), (3, 0, "ConvNext"), (3, 5, "ExtraDW"), (0, 0, "FFN")])
def test_uib_instantiations(start, mid, name):
    block = UIB(32, 32, start_dw=start, mid_dw=mid, stride=1, expand_ratio=3.0)
    assert _kinds(block) == (bool(start), bool(mid))
    assert block.expand.conv.out_channels == 96  # expansion from the *input* channels
    assert block.has_skip
    if start:
        assert isinstance(block.dw_start.act, nn.Identity)  # start DW: BN, no activation
        assert block.dw_start.conv.kernel_size == (start, start)
    if mid:
        assert isinstance(block.dw_mid.act, nn.ReLU)  # middle DW: BN + activation
    assert isinstance(block.expand.act, nn.ReLU)
    assert isinstance(block.project.act, nn.Identity)  # linear bottleneck


def test_uib_stride_placement_and_residual_rule():
    extra = UIB(16, 24, start_dw=3, mid_dw=5, stride=2)
    assert extra.dw_start.conv.stride == (1, 1) and extra.dw_mid.conv.stride == (2, 2)
    convnext = UIB(16, 24, start_dw=3, mid_dw=0, stride=2)
    assert convnext.dw_start.conv.stride == (2, 2)
    assert not extra.has_skip and not UIB(16, 24, 3, 3, 1).has_skip and not UIB(16, 16, 3, 3, 2).has_skip
    with pytest.raises(ValueError, match="strided UIB"):
        UIB(16, 16, 0, 0, stride=2)
    x = torch.randn(1, 16, 9, 11)
    assert extra.eval()(x).shape == (1, 24, 5, 6)


def test_expansion_rounds_with_make_divisible():
    block = UIB(20, 20, 0, 3, 1, expand_ratio=2.5)  # 50 -> 48
    assert block.expand.conv.out_channels == 48
    assert FusedIB(24, 48, 3, 2, 4.0).expand.conv.out_channels == 96


def test_residual_adds_input():
    block = UIB(8, 8, 3, 3, 1).eval()
    nn.init.zeros_(block.project.bn.weight)  # branch output becomes the BN bias (zero)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(block(x), x)


def test_stochastic_depth_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    block = UIB(8, 8, 3, 3, 1, drop_path=0.5)
    nn.init.ones_(block.project.bn.bias)  # make the branch clearly non-zero
    x = torch.randn(64, 8, 4, 4)
    out = block.train()(x)
    dropped = [(out[i] == x[i]).all().item() for i in range(64)]
    assert 10 < sum(dropped) < 54
    kept = out[[not d for d in dropped]] - x[[not d for d in dropped]]
    assert (kept.abs().amax(dim=(1, 2, 3)) > 0).all()  # kept samples carry the branch
    out_eval = block.eval()(x)
    assert not any((out_eval[i] == x[i]).all() for i in range(64))


def test_layer_scale_multiplies_branch():
    block = UIB(8, 8, 3, 3, 1, layer_scale_init=1e-5).eval()
    x = torch.randn(1, 8, 5, 5)
    assert (block(x) - x).abs().max() < 1e-3


def _naive_mqa(block: MobileMQA, x: torch.Tensor) -> torch.Tensor:
    """Textbook multi-query attention on mnv4's channel order (query channel = d * heads + h)."""
    a = block.attn
    b, c, height, width = x.shape
    y = block.norm(x)
    q = a.query(y).reshape(b, a.key_dim, a.heads, height * width)
    k = a.key(a.key_down(y)).flatten(2)  # [b, dk, m]
    v = a.value(a.value_down(y)).flatten(2)  # [b, dv, m]
    heads = []
    for h in range(a.heads):
        logits = torch.einsum("bdn,bdm->bnm", q[:, :, h], k) / math.sqrt(a.key_dim)
        heads.append(torch.einsum("bnm,bvm->bvn", logits.softmax(-1), v))
    o = torch.stack(heads, dim=2).reshape(b, a.value_dim * a.heads, height, width)
    return x + block.layer_scale(a.output(o))


@pytest.mark.parametrize("kv_stride", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (7, 9), (5, 12)])
def test_mqa_matches_textbook_attention_on_any_shape(kv_stride, size):
    torch.manual_seed(0)
    block = MobileMQA(24, heads=4, key_dim=8, value_dim=6, kv_stride=kv_stride, layer_scale_init=0.5).eval()
    x = torch.randn(2, 24, *size)
    out = block(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _naive_mqa(block, x), rtol=1e-5, atol=1e-5)


def test_mqa_shares_one_key_value_head_and_mhsa_has_one_per_head():
    mqa = MobileMQA(64, heads=4, key_dim=16, value_dim=16, kv_stride=2)
    mhsa = MHSA(64, heads=4, key_dim=16, value_dim=16, kv_stride=2)
    assert mqa.attn.key.out_channels == 16 and mqa.attn.value.out_channels == 16
    assert mhsa.attn.key.out_channels == 64 and mhsa.attn.value.out_channels == 64
    assert isinstance(mqa.attn.key_down, ConvBN) and mqa.attn.key_down is not mqa.attn.value_down
    assert mqa.attn.key_down.conv.groups == 64 and mqa.attn.key_down.conv.stride == (2, 2)
    x = torch.randn(1, 64, 7, 10)
    assert mhsa.eval()(x).shape == x.shape
    n_mqa = sum(p.numel() for p in mqa.parameters())
    n_mhsa = sum(p.numel() for p in mhsa.parameters())
    assert n_mhsa - n_mqa == 2 * 64 * 16 * 3  # three more K and V heads


def test_mhsa_matches_torch_multihead_attention_maths():
    torch.manual_seed(0)
    block = MHSA(16, heads=2, key_dim=8, value_dim=8).eval()
    a = block.attn
    x = torch.randn(1, 16, 3, 5)
    y = block.norm(x).flatten(2).transpose(1, 2)  # [1, N, C]
    q = (y @ a.query.weight.flatten(1).T).reshape(1, -1, 2, 8).transpose(1, 2)  # head-major for MHSA
    k = (y @ a.key.weight.flatten(1).T).reshape(1, -1, 2, 8).transpose(1, 2)
    v = (y @ a.value.weight.flatten(1).T).reshape(1, -1, 2, 8).transpose(1, 2)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # [1, h, N, dv]
    o = o.transpose(2, 3).reshape(1, 16, -1)  # channels ordered (head, dv)
    ref = x + (a.output.weight.flatten(1) @ o).reshape_as(x)
    torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)


def test_attention_macs_follow_spec_worked_example():
    # docs/architecture.md §4: the Hybrid-M stage-4 MQA at 16x16x160 costs 30.9 MMACs (convs + both matmuls).
    prof = profile("mnv4_hybrid_medium", resolution=256)
    block = [layer for layer in prof.layers if layer.name.startswith("stages.2.4.")]
    assert sum(layer.macs for layer in block) / 1e6 == pytest.approx(30.9, abs=0.05)
    core = next(layer for layer in block if layer.kind == "attention")
    assert core.macs == 256 * 4 * 64 * (64 + 64)
