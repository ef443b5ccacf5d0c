"""timm checkpoints load into mnv4 and give timm's logits (timm is the oracle, test-only)."""

import pytest
import torch
from safetensors.torch import save_file

import mnv4
from mnv4.models.registry import MODELS
from mnv4.weights.timm import mnv4_to_timm

from .conftest import randomize_

timm = pytest.importorskip("timm")


def _timm_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(timm.create_model(MODELS[name].timm_name).eval())


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("name", mnv4.list_models())
def test_timm_checkpoint_gives_timm_logits(name, tmp_path):
    ref = _timm_model(name)
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in mnv4.create_model(name).parameters())
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = mnv4.create_model(name, checkpoint=path).eval()
    for shape in [(2, 3, 64, 64), (1, 3, 72, 104)]:  # square and non-square
        x = torch.randn(shape)
        with torch.no_grad():
            expected, got = ref(x), model(x)
            assert _rel_err(expected, got) <= 1e-4
            assert _rel_err(ref.forward_features(x), model.forward_features(x)) <= 1e-4
    assert expected.std() > 0.01  # the logits differ between classes, so the comparison means something


@pytest.mark.parametrize("name", ["mnv4_conv_small", "mnv4_hybrid_medium"])
def test_pickled_checkpoints_with_prefixes_and_without_bn_counters(name, tmp_path):
    ref = _timm_model(name)
    sd = {f"module._orig_mod.{k}": v for k, v in ref.state_dict().items() if "num_batches_tracked" not in k}
    path = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    model = mnv4.create_model(checkpoint=path).eval()  # architecture inferred from the weights
    assert model.spec.name == name
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _rel_err(ref(x), model(x)) <= 1e-4


def test_hub_folder_layout_with_config_json(tmp_path):
    ref = _timm_model("mnv4_hybrid_medium")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"architecture": "mobilenetv4_hybrid_medium", "num_classes": 1000}')
    model = mnv4.create_model(checkpoint=tmp_path).eval()
    assert model.spec.name == "mnv4_hybrid_medium"
    with pytest.raises(mnv4.MNv4Error, match="checkpoint is for mnv4_hybrid_medium"):
        mnv4.create_model("mnv4_conv_medium", checkpoint=tmp_path)


@pytest.mark.parametrize("name", ["mnv4_hybrid_medium", "mnv4_hybrid_large_075"])
def test_mnv4_to_timm_round_trip_is_exact(name):
    ref = _timm_model(name)
    model = mnv4.create_model(name)
    mnv4.load_weights(model, ref.state_dict())
    back = mnv4_to_timm(model.state_dict(), model)
    assert set(back) == set(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


def test_features_only_loads_classifier_checkpoint_and_matches_timm_levels(tmp_path):
    ref = _timm_model("mnv4_conv_medium")
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    feats = mnv4.create_model("mnv4_conv_medium", checkpoint=path, features_only=True, out_indices=(0, 1, 2, 3))
    tfeats = timm.create_model("mobilenetv4_conv_medium", features_only=True, out_indices=(0, 1, 2, 3))
    randomize_(tfeats)
    tfeats.load_state_dict({k: v for k, v in ref.state_dict().items() if k in tfeats.state_dict()})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(tfeats.eval()(x), feats.eval()(x)):
            assert _rel_err(a, b) <= 1e-4


@pytest.mark.parametrize("name", ["mnv4_conv_medium", "mnv4_hybrid_large"])
def test_linear_drop_path_schedule_is_timms_ramp(name):
    """`linear` reproduces timm's per-block rates exactly (blocks without a residual have none)."""
    ref = timm.create_model(MODELS[name].timm_name, drop_path_rate=0.2)
    ours = mnv4.create_model(name, drop_path_rate=0.2, drop_path_schedule="linear")
    theirs = [block for stage in ref.blocks[:-1] for block in stage]  # the last timm stage is the 960 conv
    mine = [block for stage in ours.stages for block in stage]
    assert len(mine) == len(theirs)
    # Only blocks with a residual apply stochastic depth (timm builds a DropPath it never uses on the others).
    pairs = [(m, t) for m, t in zip(mine, theirs) if getattr(m, "has_skip", True)]
    got = [getattr(m.drop_path, "p", 0.0) for m, _ in pairs]
    expected = [t.drop_path.drop_prob for _, t in pairs]
    assert len(pairs) > 10 and all(r > 0 for r in got)
    assert got == pytest.approx(expected, abs=1e-12)
