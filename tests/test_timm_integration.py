"""`import mnv4.integrations.timm` makes mnv4's models (and searched specs) timm models; timm is the oracle
for the logits of its own architectures and for how timm-based code reads a model's preprocessing."""

import json

import pytest
import torch
from safetensors.torch import save_file

import mnv4
from mnv4.models.mobilenetv4 import MobileNetV4
from mnv4.models.registry import MODELS

from .conftest import randomize_

timm = pytest.importorskip("timm")
integration = pytest.importorskip("mnv4.integrations.timm")


def test_every_mnv4_model_is_a_timm_model():
    assert set(timm.list_models("mnv4_*")) >= set(MODELS)
    model = timm.create_model("mnv4_hybrid_medium", num_classes=7, drop_path_rate=0.1, in_chans=1)
    assert isinstance(model, MobileNetV4) and model.num_classes == 7 and model.stem.conv.in_channels == 1
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 7)
    assert timm.create_model("mobilenetv4_conv_small").__class__.__name__ == "MobileNetV3"  # timm's own, untouched


@pytest.mark.parametrize("name", ["mnv4_conv_small", "mnv4_conv_blur_medium"])
def test_timm_pretrained_file_loading_gives_timms_logits(name, tmp_path):
    ref = randomize_(timm.create_model(MODELS[name].timm_name, num_classes=5).eval())
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    ours = timm.create_model(
        name, pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(file=str(path), num_classes=5)
    ).eval()
    assert isinstance(ours, MobileNetV4)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x)
        assert float((expected - ours(x)).abs().max() / expected.abs().max()) <= 1e-4


def test_timm_checkpoint_path_loads_an_mnv4_checkpoint(tmp_path):
    src = randomize_(mnv4.create_model("mnv4_conv_small", num_classes=4)).eval()
    mnv4.save_model(src, tmp_path / "run.safetensors")
    model = timm.create_model("mnv4_conv_small", num_classes=4, checkpoint_path=str(tmp_path / "run.safetensors"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(src(x), model.eval()(x))


def test_tag_preprocessing_reaches_timms_data_config():
    model = timm.create_model("mnv4_conv_small.e3600_r256_in1k")
    cfg = timm.data.resolve_data_config({}, model=model)
    theirs = timm.data.resolve_data_config(
        {}, pretrained_cfg=timm.get_pretrained_cfg("mobilenetv4_conv_small.e3600_r256_in1k").to_dict()
    )
    assert cfg == theirs and cfg["mean"] == (0.5, 0.5, 0.5)
    assert model.pretrained_tag == "e3600_r256_in1k" and model.weights_source is None  # a tag alone loads nothing


def test_features_only_through_timm_has_timms_feature_info_accessors():
    model = timm.create_model("mnv4_conv_medium", features_only=True, out_indices=(1, 2, 3))
    feats = model(torch.randn(1, 3, 64, 64))
    assert model.feature_info.channels() == [f.shape[1] for f in feats] == [48, 80, 160]
    assert model.feature_info.reduction() == [4, 8, 16] and model.feature_info.channels(0) == 48


def test_register_spec_from_a_search_folder(tmp_path, tiny_hybrid_spec):
    (tmp_path / "spec.json").write_text(json.dumps(tiny_hybrid_spec.to_dict()))
    name = integration.register_spec(tmp_path, "mnv4_test_tiny")
    assert name == "mnv4_test_tiny" and "mnv4_test_tiny" in timm.list_models("mnv4_test*")
    model = timm.create_model("mnv4_test_tiny", num_classes=3)
    assert model.spec == tiny_hybrid_spec and model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    # with weights from a local checkpoint
    src = mnv4.create_model(tiny_hybrid_spec, num_classes=3)
    randomize_(src).eval()
    mnv4.save_model(src, tmp_path / "w.safetensors")
    loaded = timm.create_model(
        "mnv4_test_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.safetensors"))
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(src(x), loaded(x))
    with pytest.raises(mnv4.MNv4Error, match="no published weights"):
        timm.create_model("mnv4_test_tiny", pretrained=True)


def test_register_spec_refuses_bad_input_and_timms_own_names(tmp_path, tiny_hybrid_spec):
    with pytest.raises(mnv4.MNv4Error, match="timm already has a model named 'resnet18'"):
        integration.register_spec(tiny_hybrid_spec, "resnet18")
    with pytest.raises(mnv4.MNv4Error, match="identifiers"):
        integration.register_spec(tiny_hybrid_spec, "my-net")
    with pytest.raises(mnv4.MNv4Error, match="spec file not found"):
        integration.register_spec(tmp_path / "missing.json")
    with pytest.raises(mnv4.MNv4Error, match="not a model spec"):
        integration.register_spec({"name": "x"})
