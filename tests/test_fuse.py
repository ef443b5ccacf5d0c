"""Inference fusion: BN / layer scale / dropout folded away, outputs unchanged to 1e-5 relative."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import StochasticDepth

import mnv4
from mnv4.deploy import fuse
from mnv4.deploy.fusion import FusedAttention
from mnv4.models.blocks import LayerScale
from mnv4.models.specs import ModelSpec, UIBSpec, cn, fib, mhsa, mqa, uib
from mnv4.perf import profile


def _spec(attn=mqa, name: str = "tiny_fuse") -> ModelSpec:
    """Every block type, an end-DW UIB (layer scale after a DW), MQA with and without K/V down-sampling."""
    return ModelSpec(
        name=name,
        stem=cn(3, 2, 8),
        stages=(
            (fib(3, 2, 16),),
            (uib(3, 5, 2, 16, 2.0), UIBSpec(3, 3, 1, 16, 2.0, end_dw=3)),
            (uib(3, 3, 2, 24, 2.0), attn(2, 8, kv_stride=2), uib(0, 0, 1, 24, 2.0)),
            (uib(5, 0, 2, 32, 2.0), attn(2, 8), uib(3, 0, 1, 32, 2.0)),
        ),
        layer_scale_init=1e-5,
        num_features=48,
        head_hidden_size=64,
    )


def _randomize(model: nn.Module, seed: int = 0, beta: float = 0.5) -> nn.Module:
    """Non-trivial BN statistics and affine terms and O(1) layer scales, so that every folded term
    matters; a large BN beta makes a wrong fold at the zero-padded border visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("gamma" in name or name.endswith("weight")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.4)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * beta)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model.eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(1)  # the conv weights: fixed, so no test here depends on what ran before it
    model = _randomize(mnv4.create_model(_spec(), num_classes=10, drop_rate=0.3, drop_path_rate=0.2))
    return model, fuse(model)


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 67, 93), (3, 3, 97, 61), (1, 3, 33, 35)])
def test_fused_matches_eval_model(tiny_pair, shape):
    model, fused = tiny_pair
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert out.shape == ref.shape
    assert _rel_err(ref, out) < 1e-5


def test_fused_model_has_no_training_modules(tiny_pair):
    model, fused = tiny_pair
    kinds = (nn.BatchNorm2d, LayerScale, nn.Dropout, StochasticDepth)
    assert any(isinstance(m, kinds) for m in model.modules())
    assert not [n for n, m in fused.named_modules() if isinstance(m, kinds)]
    # The original is untouched and fusing twice is a no-op.
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert fuse(fused) is fused
    assert not any(p.requires_grad for p in fused.parameters())


def test_kv_downsampling_keeps_the_border_exact(tiny_pair):
    """The pre-norm BN must not be folded into the zero-padded K/V DW convs; check that doing so
    naively (dropping the affine and folding only into Q) would be visibly wrong, i.e. the test bites."""
    model, fused = tiny_pair
    blocks = [m for m in fused.modules() if isinstance(m, FusedAttention) and m.key_down is not None]
    assert blocks, "the tiny spec must contain an MQA with K/V down-sampling"
    x = torch.randn(1, 3, 67, 93, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        assert _rel_err(ref, fused(x)) < 1e-5
        block = blocks[0]
        scale, shift = block.kv_scale.clone(), block.kv_shift.clone()
        # Fold the affine into the DW weights/bias "as if" the padding were BN(0): exact inside only.
        kd, vd = block.key_down, block.value_down
        saved = [t.clone() for t in (kd.weight, kd.bias, vd.weight, vd.bias)]
        for conv in (kd, vd):
            conv.bias += (conv.weight.sum((2, 3)) * shift.view(-1, 1)).view(-1)
            conv.weight *= scale.view(-1, 1, 1, 1)
        block.kv_scale.fill_(1.0)
        block.kv_shift.zero_()
        wrong = fused(x)
        for t, s in zip((kd.weight, kd.bias, vd.weight, vd.bias), saved):
            t.copy_(s)
        block.kv_scale.copy_(scale)
        block.kv_shift.copy_(shift)
    assert _rel_err(ref, wrong) > 1e-4, _rel_err(ref, wrong)
    assert _rel_err(ref, fused(x)) < 1e-5


def test_mhsa_and_features_only_fuse():
    model = _randomize(mnv4.create_model(_spec(mhsa, "tiny_mhsa"), num_classes=5))
    x = torch.randn(2, 3, 72, 56)
    with torch.no_grad():
        assert _rel_err(model(x), fuse(model)(x)) < 1e-5
    feats = _randomize(mnv4.create_model(_spec(), features_only=True))
    with torch.no_grad():
        for a, b in zip(feats(x), fuse(feats)(x)):
            assert _rel_err(a, b) < 1e-5


def test_expansion_levels_survive_fusing():
    # feature_location="expansion" reads inside the strided block: the fused block must still cut there
    feats = _randomize(
        mnv4.create_model("mnv4_hybrid_medium", features_only=True, out_indices=(2, 3, 4), feature_location="expansion")
    )
    x = torch.randn(1, 3, 64, 64)
    fused = fuse(feats)
    with torch.no_grad():
        ref, out = feats(x), fused(x)
    assert [t.shape[1] for t in out] == [480, 960, 960]
    for a, b in zip(ref, out):
        assert _rel_err(a, b) < 1e-5


def test_layer_scale_is_folded_not_dropped():
    model = _randomize(mnv4.create_model(_spec(), num_classes=10))
    fused = fuse(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LayerScale):
                m.gamma.mul_(3.0)
        x = torch.randn(1, 3, 64, 64)
        # Changing gamma after fusing changes the model but not the fused copy.
        assert _rel_err(model(x), fused(x)) > 1e-4
        assert _rel_err(model(x), fuse(model)(x)) < 1e-5


@pytest.mark.slow
def test_conv_small_fused_and_profiled():
    model = _randomize(mnv4.create_model("mnv4_conv_small"))
    fused = fuse(model)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert _rel_err(model(x), fused(x)) < 1e-5
    # The profiler still sees every conv, linear and attention op of the fused model.
    assert profile(fused, 96).macs == profile(model, 96).macs


def test_optimize_for_cpu_matches(tiny_pair):
    from mnv4.deploy.cpu import mkldnn_available, optimize_for_cpu

    if not mkldnn_available():
        pytest.skip("oneDNN not available in this torch build")
    model, _ = tiny_pair
    fast = optimize_for_cpu(model)
    for shape in [(1, 3, 64, 64), (2, 3, 67, 93), (1, 3, 64, 64)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            assert _rel_err(model(x), fast(x)) < 1e-5


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 67, 93)])
def test_token_major_attention_gives_the_same_outputs(tiny_pair, shape):
    # LiteRT's exporter runs MQA token-major (weights reordered head-major): same function, new layout.
    from mnv4.deploy.fusion import token_major_attention

    model, fused = tiny_pair
    tokens = token_major_attention(fused)
    switched = [m for m in tokens.modules() if isinstance(m, FusedAttention)]
    assert len(switched) == 2 and all(m.token_major for m in switched)
    assert not any(m.token_major for m in fused.modules() if isinstance(m, FusedAttention))  # a copy
    assert not torch.equal(switched[0].query.weight, fused.stages[2][1].query.weight)  # reordered
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)
        assert _rel_err(ref, tokens(x)) < 1e-5


def test_token_major_is_for_multi_query_attention_only():
    from mnv4.deploy.fusion import token_major_attention

    torch.manual_seed(0)
    fused = fuse(_randomize(mnv4.create_model(_spec(mhsa, "tiny_mhsa"), num_classes=4)))
    assert token_major_attention(fused) is fused  # MHSA (kv_heads = heads) keeps the channel-major form
    block = next(m for m in fused.modules() if isinstance(m, FusedAttention))
    with pytest.raises(ValueError, match="multi-query"):
        block.to_token_major()
