"""mnv4's checkpoint format, safe loading, clear errors, and pretrained-weight resolution."""

import json

import pytest
import torch
from safetensors import safe_open

import mnv4
from mnv4.weights.io import CONFIG_KEY

from .conftest import randomize_


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_save_and_reload_round_trip(tmp_path):
    model = randomize_(mnv4.create_model("mnv4_conv_small", num_classes=10))
    model.class_names = [f"c{i}" for i in range(10)]
    path = mnv4.save_model(model, tmp_path / "run" / "best.safetensors")
    with safe_open(str(path), framework="pt") as f:
        cfg = json.loads(f.metadata()[CONFIG_KEY])
    assert cfg["architecture"] == "mnv4_conv_small" and cfg["num_classes"] == 10
    assert cfg["preprocess"]["input_size"] == 224 and "spec" not in cfg
    again = mnv4.create_model(checkpoint=path)
    assert again.class_names == model.class_names and again.num_classes == 10
    assert again.preprocess == model.preprocess
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(_logits(model, x), _logits(again, x))
    assert not list(tmp_path.glob("run/*.tmp"))  # atomic write leaves no temporary file


def test_custom_spec_reloads_without_registry(tmp_path, tiny_hybrid_spec):
    model = randomize_(mnv4.create_model(tiny_hybrid_spec, num_classes=4, in_chans=1))
    path = mnv4.save_model(model, tmp_path / "tiny.safetensors")
    again = mnv4.create_model(checkpoint=path)
    assert again.spec == tiny_hybrid_spec
    x = torch.randn(1, 1, 40, 56)
    assert torch.equal(_logits(model, x), _logits(again, x))


def test_other_num_classes_reinitialises_classifier_with_warning(tmp_path):
    model = randomize_(mnv4.create_model("mnv4_conv_small", num_classes=10))
    path = mnv4.save_model(model, tmp_path / "m.safetensors")
    with pytest.warns(UserWarning, match="10-class classifier"):
        other = mnv4.create_model("mnv4_conv_small", checkpoint=path, num_classes=3)
    assert other.classifier.out_features == 3
    x = torch.randn(1, 3, 64, 64)
    model.reset_classifier(0)
    other.reset_classifier(0)
    assert torch.equal(_logits(model, x), _logits(other, x))  # the backbone still loaded


def test_wrong_architecture_and_shapes_name_the_keys(tmp_path):
    small = mnv4.create_model("mnv4_conv_small")
    torch.save(small.state_dict(), tmp_path / "small.pth")
    with pytest.raises(mnv4.MNv4Error, match="checkpoint is for mnv4_conv_small, not mnv4_conv_medium"):
        mnv4.create_model("mnv4_conv_medium", checkpoint=tmp_path / "small.pth")
    sd = small.state_dict()
    sd["stages.2.0.expand.conv.weight"] = torch.zeros(1)
    del sd["final_conv.bn.bias"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(mnv4.MNv4Error) as err:
        mnv4.create_model("mnv4_conv_small", checkpoint=tmp_path / "broken.pth")
    msg = str(err.value)
    assert "stages.2.0.expand.conv.weight" in msg and "final_conv.bn.bias" in msg and "extra.weight" in msg
    assert "\n" not in msg


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_with_code_are_refused(tmp_path, capsys):
    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(mnv4.MNv4Error, match="only loads plain tensor checkpoints"):
        mnv4.create_model("mnv4_conv_small", checkpoint=tmp_path / "evil.pth")
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, match",
    [(b"", "safely"), (b"\x00" * 40, "safely"), (b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":', "safetensors")],
)
def test_corrupt_files_give_one_line_errors(tmp_path, content, match):
    path = tmp_path / ("bad.safetensors" if b"{" in content else "bad.pth")
    path.write_bytes(content)
    with pytest.raises(mnv4.MNv4Error, match=match):
        mnv4.create_model("mnv4_conv_small", checkpoint=path)


def test_truncated_safetensors(tmp_path):
    path = mnv4.save_model(mnv4.create_model("mnv4_conv_small"), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(mnv4.MNv4Error, match="not a valid safetensors"):
        mnv4.create_model(checkpoint=path)


def test_missing_checkpoint():
    with pytest.raises(mnv4.MNv4Error, match="checkpoint not found"):
        mnv4.create_model("mnv4_conv_small", checkpoint="/nonexistent/x.safetensors")


def test_pretrained_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(mnv4.MNv4Error, match=r"timm/mobilenetv4_conv_small\.e2400_r224_in1k.*checkpoint=PATH"):
        mnv4.create_model("mnv4_conv_small", pretrained=True)


def test_pretrained_resolves_tag_hub_id_and_preprocessing(monkeypatch, tmp_path):
    pytest.importorskip("timm")
    import timm
    from safetensors.torch import save_file

    ref = randomize_(timm.create_model("mobilenetv4_conv_small").eval())
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(weights))
    asked = []

    def fake_download(hub_id, filename="model.safetensors"):
        asked.append((hub_id, filename))
        return weights

    monkeypatch.setattr("mnv4.factory.download_weights", fake_download)
    model = mnv4.create_model("mobilenetv4_conv_small.e3600_r256_in1k", pretrained=True)
    assert asked == [("timm/mobilenetv4_conv_small.e3600_r256_in1k", "model.safetensors")]
    assert model.pretrained_tag == "e3600_r256_in1k"
    assert model.preprocess.input_size == 256 and model.preprocess.mean == (0.5, 0.5, 0.5)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x), rtol=1e-4, atol=1e-4)
    model = mnv4.create_model("mnv4_conv_small", pretrained="e1200_r224_in1k", num_classes=5)
    assert asked[-1][0] == "timm/mobilenetv4_conv_small.e1200_r224_in1k" and model.num_classes == 5


def test_pretrained_errors():
    with pytest.raises(mnv4.MNv4Error, match="unknown weight tag 'nope'.*e2400_r224_in1k"):
        mnv4.create_model("mnv4_conv_small", pretrained="nope")
    with pytest.raises(mnv4.MNv4Error, match="no published weights"):
        mnv4.create_model("mnv4_hybrid_large_075", pretrained=True)
    with pytest.raises(mnv4.MNv4Error, match="not both"):
        mnv4.create_model("mnv4_conv_small", pretrained=True, checkpoint="x")


def test_list_models_with_tags():
    tagged = mnv4.list_models("*conv_small*", pretrained=True)
    assert "mnv4_conv_small.e2400_r224_in1k" in tagged and len(tagged) == 4


@pytest.mark.parametrize(
    "name, content, kind",
    [
        ("cfg.json", b'{"epochs": 3}', "a JSON text file"),
        ("cfg.yaml", b"epochs: 3\n", "a text file"),
        ("x.pt", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "a PNG image"),
        ("x.pth", b"\xff\xd8\xff\xe0" + b"\x00" * 20, "a JPEG image"),
    ],
)
def test_a_file_that_is_evidently_no_checkpoint_is_named_as_what_it_is(tmp_path, name, content, kind):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(mnv4.MNv4Error, match=f"is not a checkpoint \\({kind}\\); pass a .safetensors or .pt"):
        mnv4.create_model(checkpoint=tmp_path / name)


def test_a_detector_file_given_to_the_classifier_side_says_where_it_goes(tmp_path, tiny_hybrid_spec):
    from mnv4.detect import create_detector, save_detector

    det = save_detector(create_detector(tiny_hybrid_spec, classes=["a"], image_size=64), tmp_path / "det.safetensors")
    with pytest.raises(mnv4.MNv4Error, match="is a detector, not a classifier: use it with `mnv4 detect eval"):
        mnv4.create_model(checkpoint=det)
