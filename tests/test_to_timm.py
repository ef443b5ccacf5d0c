"""mnv4 -> timm: `mnv4.weights.to_timm` and `mnv4 convert --to timm` write what timm's own loader
(`pretrained_cfg_overlay=dict(file=...)`, offline) turns into identical logits. timm is the oracle."""

import pytest
import torch

import mnv4
from mnv4.cli import main
from mnv4.models.registry import MODELS
from mnv4.weights import to_timm

from .conftest import randomize_

timm = pytest.importorskip("timm")

SLOW = ("mnv4_conv_large", "mnv4_hybrid_large", "mnv4_hybrid_large_075", "mnv4_conv_aa_large")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max() / a.abs().max()) <= 1e-4


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in mnv4.list_models()]
)
def test_to_timm_state_dict_loads_strictly_into_timm_with_the_same_logits(name):
    model = randomize_(mnv4.create_model(name)).eval()
    ref = timm.create_model(MODELS[name].timm_name).eval()
    ref.load_state_dict(to_timm(model), strict=True)
    x = torch.randn(1, 3, 64, 72)
    with torch.no_grad():
        assert _close(ref(x), model(x))


@pytest.mark.parametrize("name", ["mnv4_conv_small", "mnv4_hybrid_medium", "mnv4_conv_aa_medium"])
def test_convert_to_timm_cli_and_timm_pretrained_file_loading(name, tmp_path, capsys):
    """A fine-tuned (10-class) mnv4 checkpoint -> `mnv4 convert --to timm` -> timm.create_model(pretrained=True,
    file=...) gives the same logits; mnv4 reads the timm file back as the same model."""
    model = randomize_(mnv4.create_model(name, num_classes=10)).eval()
    model.class_names = [f"c{i}" for i in range(10)]
    src, dst = tmp_path / "run.safetensors", tmp_path / "timm.safetensors"
    mnv4.save_model(model, src)
    assert main(["convert", "--to", "timm", str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert MODELS[name].timm_name in out and "pretrained_cfg_overlay" in out
    ref = timm.create_model(
        MODELS[name].timm_name,
        pretrained=True,
        num_classes=10,
        pretrained_cfg_overlay=dict(file=str(dst), num_classes=10),
    ).eval()
    back = mnv4.create_model(checkpoint=dst).eval()
    assert back.spec == model.spec and back.class_names == model.class_names  # aa variants named by the header
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        assert _close(expected, ref(x)) and _close(expected, back(x))


def test_convert_to_timm_refuses_what_timm_cannot_build(tmp_path, tiny_hybrid_spec, capsys):
    mnv4.save_model(mnv4.create_model(tiny_hybrid_spec), tmp_path / "tiny.safetensors")
    assert main(["convert", "--to", "timm", str(tmp_path / "tiny.safetensors"), str(tmp_path / "t.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "timm has no architecture for tiny_hybrid" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t.safetensors").exists()
    with pytest.raises(mnv4.MNv4Error, match="features_only"):
        to_timm(mnv4.create_model("mnv4_conv_small", features_only=True))
