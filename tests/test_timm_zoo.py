"""Every MobileNetV4 that timm has is registered, with timm's preprocessing, and gives timm's logits.

timm is the test oracle: its architectures, pretrained configs and (random, BN-randomised) weights.
"""

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

import mnv4
from mnv4.models.registry import MODELS, get_entry, split_name

from .conftest import randomize_

timm = pytest.importorskip("timm")

TIMM_TAGS = sorted(timm.list_models("mobilenetv4*", pretrained=True))
SLOW_ARCHS = ("large",)  # 30M+ parameter builds: seconds each


def _param(name: str):
    slow = any(s in name for s in SLOW_ARCHS)
    return pytest.param(name, marks=pytest.mark.slow) if slow else name


def test_every_timm_architecture_and_tag_is_registered():
    ours = {e.timm_name for e in MODELS.values()}
    assert ours == set(timm.list_models("mobilenetv4*"))
    mine = {f"{e.timm_name}.{t.tag}" for e in MODELS.values() for t in e.tags}
    assert mine == set(TIMM_TAGS)
    for e in MODELS.values():  # the default tag is timm's default (its first tag with weights)
        cfg = timm.get_pretrained_cfg(e.timm_name)
        assert (e.default_tag.tag if e.tags else "untrained") == cfg.tag


@pytest.mark.parametrize("name", TIMM_TAGS)
def test_tag_preprocessing_and_classes_are_timms(name):
    cfg = timm.get_pretrained_cfg(name)
    arch, tag_name = split_name(name)
    tag = get_entry(arch).get_tag(tag_name)
    pp = tag.preprocess
    assert tag.num_classes == cfg.num_classes
    assert tag.hub_id == cfg.hf_hub_id.rstrip("/") or tag.hub_id == f"timm/{name}"
    assert (3, pp.input_size, pp.input_size) == tuple(cfg.input_size)
    assert pp.crop_pct == cfg.crop_pct and pp.interpolation == cfg.interpolation
    assert pp.mean == tuple(cfg.mean) and pp.std == tuple(cfg.std)
    test_size = (3, pp.test_input_size, pp.test_input_size) if pp.test_input_size else None
    assert test_size == (tuple(cfg.test_input_size) if cfg.test_input_size else None)
    assert pp.test_crop_pct == cfg.test_crop_pct


@pytest.mark.parametrize("name", [_param(n) for n in TIMM_TAGS])
def test_every_tag_gives_timm_logits(name, tmp_path):
    """The tag's own head size (11821 for in12k) through timm's layout -> mnv4 -> the same logits."""
    cfg = timm.get_pretrained_cfg(name)
    torch.manual_seed(0)
    ref = randomize_(timm.create_model(split_name(name)[0], num_classes=cfg.num_classes).eval())
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = mnv4.create_model(name, checkpoint=path).eval()
    assert model.num_classes == cfg.num_classes and model.pretrained_tag == split_name(name)[1]
    x = torch.randn(1, 3, 64, 72)
    with torch.no_grad():
        expected, got = ref(x), model(x)
    assert float((expected - got).abs().max() / expected.abs().max()) <= 1e-4
    assert expected.std() > 0.01


@pytest.mark.parametrize("name", ["mnv4_conv_aa_medium", "mnv4_conv_blur_medium"])
def test_the_downsampling_is_what_makes_the_aa_logits(name, tmp_path):
    """The same weights in the plain architecture (strided convs) do not give the aa model's logits,
    so the parity above rests on the pooling, not on shared keys."""
    ref = randomize_(timm.create_model(MODELS[name].timm_name).eval())
    plain = mnv4.create_model(dataclasses.replace(MODELS[name].spec, downsample="conv"))
    mnv4.load_weights(plain, ref.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = ref(x), plain.eval()(x)
    # 100x the parity tolerance (the pooled logits differ by about 1%, the feature maps by about 4%)
    assert float((expected - got).abs().max() / expected.abs().max()) > 1e-3


def test_blur_pool_is_a_binomial_low_pass_that_keeps_the_strided_size():
    from mnv4.models.blocks import BlurPool

    pool = BlurPool(2)
    x = torch.zeros(1, 2, 5, 7)
    x[0, 0, 1, 2] = 16.0  # an impulse between two output rows is shared by both
    x[0, 1] = 16.0  # a constant map
    y = pool(x)
    assert y.shape == (1, 2, 3, 4)  # ceil(5/2) x ceil(7/2), like a stride-2 3x3 conv with padding 1
    assert y[0, 0, 0, 1] == 2.0 and y[0, 0, 1, 1] == 2.0 and y[0, 0].sum() == 4.0  # weights 1/4 * 2/4
    assert y[0, 1, 1, 1] == 16.0  # the filter sums to one
    assert y[0, 1, 0, 0] == 9.0  # zero padding: 3/4 of each direction's taps fall inside
    assert "kernel" not in pool.state_dict()  # fixed filter: not part of checkpoints


def test_spec_downsample_round_trips_and_is_checked():
    spec = MODELS["mnv4_conv_aa_large"].spec
    assert spec.downsample == "avg" and mnv4.models.ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown downsample"):
        dataclasses.replace(spec, downsample="max")


def test_models_verbose_lists_every_timm_tag(capsys):
    from mnv4.cli import main

    assert main(["models", "-v"]) == 0
    out = capsys.readouterr().out
    for name in TIMM_TAGS:
        assert name.replace("mobilenetv4_", "mnv4_") in out
    assert "448 @ 0.95" in out and "544 @ 1" in out and "84.67" in out  # conv_aa_large's default tag
    assert "mnv4_conv_blur_medium (blur)" in out


@pytest.mark.parametrize("name", ["mnv4_conv_aa_medium", "mnv4_conv_blur_medium"])
def test_bn_folding_keeps_the_pooling(name):
    from mnv4.deploy.fusion import fuse

    model = randomize_(mnv4.create_model(name)).eval()
    x = torch.randn(1, 3, 67, 93)  # odd sizes: avg pooling rounds down where a strided conv rounds up
    with torch.no_grad():
        expected, got = model(x), fuse(model)(x)
    assert float((expected - got).abs().max() / expected.abs().max()) <= 1e-5
