"""One suite over every registered model: shapes, gradients, determinism, features, counts, export."""

import pytest
import torch

import mnv4
from mnv4.models.registry import MODELS, PUBLISHED
from mnv4.perf import profile

from .conftest import randomize_

ALL = mnv4.list_models()

# The expected counts are the registry's facts (mnv4/models/registry.py, sourced in
# docs/architecture.md §4): TF unit-test counts for the five models, timm's builds for the width variants.


def test_registry_covers_names_and_aliases():
    assert set(MODELS) == set(ALL) and all(MODELS[n].params > 0 and MODELS[n].gmacs for n in ALL)
    for name in ALL:
        alias = MODELS[name].timm_name
        assert mnv4.models.get_entry(alias).name == name
    with pytest.raises(mnv4.MNv4Error, match="did you mean"):
        mnv4.create_model("mnv4_conv_smal")


@pytest.mark.parametrize("name", ALL)
def test_exact_parameter_count(name):
    with torch.device("meta"):
        model = mnv4.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == MODELS[name].params


def _analytic_macs(model: torch.nn.Module, resolution: int) -> int:
    """MACs by hand (docs/architecture.md §4's counting rule), independent of mnv4.perf's FlopCounterMode:
    k_h*k_w*(C_in/groups)*C_out*H_out*W_out per conv, in*out per linear, N*heads*M*(key_dim + value_dim)
    for attention's two matmuls; pooling is not counted (the anti-aliased models' blur filters included).
    Only the modules' input and output sizes come from running the model (on the meta device)."""
    from mnv4.models.blocks import GroupedQueryAttention

    seen: dict[torch.nn.Module, tuple[torch.Size, torch.Size]] = {}
    kinds = (torch.nn.Conv2d, torch.nn.Linear, GroupedQueryAttention)

    def record(m: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        seen.setdefault(m, (args[0].shape, out.shape))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, kinds)]
    with torch.no_grad():
        model(torch.empty(1, 3, resolution, resolution, device="meta"))
    for h in hooks:
        h.remove()
    total = 0
    for m, (x, out) in seen.items():
        if isinstance(m, torch.nn.Conv2d):
            kh, kw = m.kernel_size
            total += kh * kw * (m.in_channels // m.groups) * m.out_channels * out[2] * out[3]
        elif isinstance(m, torch.nn.Linear):
            total += m.in_features * m.out_features
        else:  # queries attend to the (possibly down-sampled) keys and values
            keys = seen[m.key][1]
            total += x[2] * x[3] * m.heads * keys[2] * keys[3] * (m.key_dim + m.value_dim)
    return total


@pytest.mark.parametrize("name", ALL)
def test_macs_match_a_hand_count_and_the_registry(name):
    entry = MODELS[name]
    with torch.device("meta"):
        model = mnv4.create_model(name).eval()
    macs = _analytic_macs(model, entry.resolution)
    assert profile(name, resolution=entry.resolution).macs == macs
    assert round(macs / 1e9, 3) == entry.gmacs  # the registry's figure, to its 3 decimals


# External facts (docs/architecture.md §4): GMACs at the native resolution counted from the TF Model
# Garden layer tables (timm's model cards agree, e.g. Conv-M 1.1 @ 256), and the paper's Tab. 6, which
# reports Conv-S the same and the M/L models 5-8% lower without saying why.
TF_GMACS = {
    "mnv4_conv_small": 0.186,
    "mnv4_conv_medium": 1.080,
    "mnv4_hybrid_medium": 1.271,
    "mnv4_conv_large": 6.376,
    "mnv4_hybrid_large": 7.712,
}
TF_PARAMS = {  # the TF unit tests' backbone counts less BatchNorm statistics, plus a 1000-class classifier
    "mnv4_conv_small": 3_774_024,
    "mnv4_conv_medium": 9_715_512,
    "mnv4_hybrid_medium": 11_074_648,
    "mnv4_conv_large": 32_590_864,
    "mnv4_hybrid_large": 37_764_624,
}
PAPER_GMACS = {
    "mnv4_conv_small": 0.2,
    "mnv4_conv_medium": 1.0,
    "mnv4_hybrid_medium": 1.2,
    "mnv4_conv_large": 5.9,
    "mnv4_hybrid_large": 7.2,
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_counts_are_the_tf_and_paper_figures(name):
    gmacs = MODELS[name].gmacs
    assert gmacs == TF_GMACS[name] and MODELS[name].params == TF_PARAMS[name]
    paper = PAPER_GMACS[name]
    assert round(gmacs, 1) == paper if name == "mnv4_conv_small" else 1.05 <= gmacs / paper <= 1.09


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_and_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = mnv4.create_model(name, num_classes=7, drop_rate=0.1).train()
    x = torch.randn(2, 3, 64, 80)
    out = model(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"parameters with an all-zero gradient: {zero[:5]}"


@pytest.mark.parametrize("name", ALL)
def test_interface_shapes(name):
    model = mnv4.create_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, model.num_features, 2, 2)
        emb = model.forward_head(feats, pre_logits=True)
        assert emb.shape == (1, model.head_hidden_size) == (1, 1280)
        assert model.forward_head(feats).shape == (1, 1000)
        model.reset_classifier(0)
        assert model(x).shape == (1, 1280)
        model.reset_classifier(5)
        assert model(x).shape == (1, 5)
    assert model.num_features == MODELS[name].spec.num_features
    assert model.preprocess.input_size == MODELS[name].default_preprocess.input_size


@pytest.mark.parametrize("name", ALL)
def test_eval_is_deterministic_and_batch_independent(name):
    torch.manual_seed(0)
    # randomize_: a fresh model's logits are under 1e-5 (untrained BatchNorm), which any tolerance would pass
    model = randomize_(mnv4.create_model(name)).eval()
    x = torch.randn(3, 3, 72, 56)
    with torch.no_grad():
        batched = model(x)
        again = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    assert batched.std() > 1e-2
    assert torch.equal(batched, again)
    torch.testing.assert_close(single, batched, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", PUBLISHED)
@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_features_only_levels_match_feature_info(name, output_stride):
    model = mnv4.create_model(name, features_only=True, output_stride=output_stride).eval()
    assert [f["num_chs"] for f in model.feature_info] == list(MODELS[name].endpoints)
    expected = [min(r, output_stride) for r in (4, 8, 16, 32)]
    assert [f["reduction"] for f in model.feature_info] == expected
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = model(x)
    for f, info in zip(feats, model.feature_info):
        assert f.shape == (1, info["num_chs"], 64 // info["reduction"], 96 // info["reduction"])


def test_out_indices_select_levels_including_stem():
    model = mnv4.create_model("mnv4_conv_small", features_only=True, out_indices=(0, 4)).eval()
    assert [(f["num_chs"], f["reduction"]) for f in model.feature_info] == [(32, 2), (128, 32)]
    assert [t.shape[1] for t in model(torch.randn(1, 3, 64, 64))] == [32, 128]
    with pytest.raises(mnv4.MNv4Error, match="out_indices"):
        mnv4.create_model("mnv4_conv_small", features_only=True, out_indices=(5,))


def test_expansion_levels_are_the_strided_blocks_expansions_and_the_960_conv(tmp_path):
    # feature_location="expansion" (SSDLite's taps): level L is the 1x1 expansion of stage L+1's first
    # block, at level L's stride; level 4 is the classifier's 960 conv, loaded from its checkpoint.
    torch.manual_seed(0)
    full = mnv4.create_model("mnv4_conv_small", num_classes=5).eval()
    path = mnv4.save_model(full, tmp_path / "c.safetensors")
    kwargs = dict(features_only=True, out_indices=(2, 3, 4), feature_location="expansion")
    feats = mnv4.create_model("mnv4_conv_small", checkpoint=path, **kwargs).eval()
    assert [(f["num_chs"], f["reduction"]) for f in feats.feature_info] == [(192, 8), (576, 16), (960, 32)]
    seen = {}
    for level in (2, 3):
        full.stages[level][0].expand.register_forward_hook(lambda m, i, o, level=level: seen.__setitem__(level, o))
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        last = full.forward_features(x)
        levels = feats(x)
    assert torch.equal(levels[0], seen[2]) and torch.equal(levels[1], seen[3])
    assert torch.equal(levels[2], last)
    assert levels[1].shape == (2, 576, 6, 4)
    # the stage-end model reads the same weights; only where it reads differs
    stage = mnv4.create_model("mnv4_conv_small", checkpoint=path, features_only=True, out_indices=(3,)).eval()
    assert [f["num_chs"] for f in stage.feature_info] == [96]
    with pytest.raises(mnv4.MNv4Error, match="level 1 has no expansion map"):
        mnv4.create_model("mnv4_conv_small", features_only=True, out_indices=(1,), feature_location="expansion")
    with pytest.raises(mnv4.MNv4Error, match="feature_location"):
        mnv4.create_model("mnv4_conv_small", features_only=True, feature_location="middle")
    with pytest.raises(mnv4.MNv4Error, match="features_only"):
        mnv4.create_model("mnv4_conv_small", feature_location="expansion")
    # a level without an expansion map (stage 2 starts with a plain conv) is read at its stage end
    with torch.no_grad():
        maps = feats.forward_intermediates(x, [0, 1, 2, 3], intermediates_only=True)
    assert [t.shape[1] for t in maps] == [32, 32, 192, 576]


def test_classifier_model_levels_and_in_chans():
    model = mnv4.create_model("mnv4_conv_medium", in_chans=1, num_classes=3).eval()
    assert [f["reduction"] for f in model.feature_info] == [2, 4, 8, 16, 32]
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 3)


def test_hybrid_large_uses_exact_gelu_everywhere():
    with torch.device("meta"):
        model = mnv4.create_model("mnv4_hybrid_large")
    gelus = [m for m in model.modules() if isinstance(m, torch.nn.GELU)]
    assert gelus and all(m.approximate == "none" for m in gelus)
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())


@pytest.mark.parametrize("name, count", [("mnv4_hybrid_medium", 30), ("mnv4_hybrid_large", 35), ("mnv4_conv_large", 0)])
def test_layer_scale_placement_and_init(name, count):
    # Hybrids: every UIB and every MQA block (not the stem or FusedIB); conv models: none (docs/architecture.md §2.5).
    model = mnv4.create_model(name)
    gammas = [m.gamma for m in model.modules() if isinstance(m, mnv4.models.LayerScale)]
    assert len(gammas) == count
    assert all(torch.all(g == 1e-5) for g in gammas)


@pytest.mark.slow
@pytest.mark.parametrize("name", PUBLISHED)
def test_torch_export(name):
    model = randomize_(mnv4.create_model(name)).eval()  # logits well above the tolerance (see above)
    x = torch.randn(2, 3, 64, 64)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    y = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(y)
        assert expected.std() > 1e-2
        torch.testing.assert_close(ep.module()(y), expected, rtol=1e-4, atol=1e-6)


def test_cpu_channels_last_eval_is_the_same_function(tiny_hybrid_spec):
    torch.manual_seed(0)
    model = mnv4.create_model(tiny_hybrid_spec, num_classes=7).eval()
    feats = mnv4.create_model(tiny_hybrid_spec, features_only=True).eval()
    feats.load_state_dict({k: v for k, v in model.state_dict().items() if k in feats.state_dict()})
    x = torch.randn(3, 3, 72, 56)
    with torch.no_grad():
        fast, fast_levels = model(x), feats(x)
        assert fast.is_contiguous() and all(f.is_contiguous() for f in fast_levels)  # caller's layout back
        model.cpu_channels_last = feats.cpu_channels_last = False
        slow, slow_levels = model(x), feats(x)
    assert (fast - slow).abs().max() <= 1e-5 * slow.abs().max()
    for a, b in zip(fast_levels, slow_levels):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    model.cpu_channels_last = True
    graph = str(torch.export.export(model, (x,)).graph)  # exported graphs carry no layout change
    assert "channels_last" not in graph and "clone" not in graph


def test_preprocess_names_its_normalisation():
    from mnv4.models.registry import Preprocess

    assert Preprocess().normalization == "imagenet"  # mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)
    assert Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).normalization == "inception"
    assert Preprocess(mean=(0.5, 0.5, 0.5)).normalization == "custom"
