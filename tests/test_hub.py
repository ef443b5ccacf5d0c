"""Hugging Face Hub layout: push (to a folder or a stubbed upload, never the network) and load back in
mnv4 and, for timm architectures, in timm (the oracle), with identical logits."""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

import mnv4
from mnv4.cli import build_parser, main
from mnv4.errors import MNv4Error
from mnv4.hub.card import train_command
from mnv4.models.batchnorm import recalibrate_batchnorm
from mnv4.models.registry import Preprocess

from .conftest import randomize_, require

CLASSES = ["cat", "dog", "eel", "fox", "gnu"]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def _model(name="mnv4_conv_small_050", **kw):
    """Random weights with BatchNorm statistics of their own activations, so logits differ per image."""
    model = randomize_(mnv4.create_model(name, num_classes=len(CLASSES), **kw))
    recalibrate_batchnorm(model, torch.randn(8, 3, 64, 64), batch_size=4).eval()
    model.class_names = list(CLASSES)
    model.preprocess = Preprocess(
        input_size=96, crop_pct=0.9, interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3
    )
    return model


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def _serve(monkeypatch, folder: Path, served: str) -> list[tuple[str, str]]:
    """Stand in for the Hub: hf_hub_download of repository ``served`` returns files of ``folder``."""
    asked: list[tuple[str, str]] = []

    def download(repo_id: str, filename: str, revision=None, cache_dir=None, **_):
        asked.append((repo_id, filename))
        if repo_id != served:
            raise FileNotFoundError(f"no repository {repo_id}")
        return str(folder / filename)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return asked


def test_a_pushed_folder_loads_identically_in_mnv4_and_in_timm(tmp_path):
    timm = require("timm")
    model = _model()
    repo = tmp_path / "repo"
    assert mnv4.push_to_hub(model, "me/pets", local_dir=repo) == str(repo)
    assert sorted(p.name for p in repo.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    cfg = json.loads((repo / "config.json").read_text())
    assert cfg["architecture"] == "mobilenetv4_conv_small_050" and cfg["num_classes"] == 5
    assert cfg["label_names"] == CLASSES and cfg["pretrained_cfg"]["input_size"] == [3, 96, 96]
    assert cfg["pretrained_cfg"]["mean"] == [0.5] * 3 and cfg["pretrained_cfg"]["interpolation"] == "bilinear"

    x = torch.randn(2, 3, 96, 96)
    back = mnv4.create_model(checkpoint=repo).eval()
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert back.class_names == CLASSES and back.preprocess == model.preprocess

    # timm reads the same folder two ways: its local-dir loader, and a pretrained_cfg_overlay file
    ref = timm.create_model(f"local-dir:{repo}", pretrained=True).eval()
    assert ref.pretrained_cfg["label_names"] == CLASSES and ref.pretrained_cfg["crop_pct"] == 0.9
    ref2 = timm.create_model(
        "mobilenetv4_conv_small_050",
        pretrained=True,
        num_classes=5,
        pretrained_cfg_overlay=dict(file=str(repo / "model.safetensors"), num_classes=5),
    ).eval()
    with torch.no_grad():
        y = model(x)
        assert _rel_err(y[0], y[1]) > 1e-2  # two images, two answers: the comparison below means something
        assert _rel_err(y, ref(x)) <= 1e-4 and _rel_err(y, ref2(x)) <= 1e-4


def test_hf_hub_names_load_from_the_hub_in_mnv4_and_timm(tmp_path, monkeypatch):
    timm = require("timm")
    model = _model("mnv4_hybrid_medium")  # MQA weights are permuted to timm's head-major order and back
    repo = tmp_path / "repo"
    mnv4.push_to_hub(model, "me/hm", local_dir=repo)
    asked = _serve(monkeypatch, repo, "me/hm")
    monkeypatch.setattr("timm.models._hub.hf_hub_download", __import__("huggingface_hub").hf_hub_download)

    back = mnv4.create_model("hf-hub:me/hm").eval()
    assert {f for _, f in asked} == {"config.json", "model.safetensors"}
    assert back.weights_source == "hf-hub:me/hm" and back.class_names == CLASSES
    x = torch.randn(1, 3, 64, 64)
    ref = timm.create_model("hf-hub:me/hm", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
        assert _rel_err(model(x), ref(x)) <= 1e-4
    with pytest.raises(MNv4Error, match="cannot get config.json of me/other from the Hugging Face hub"):
        mnv4.create_model("hf-hub:me/other")
    with pytest.raises(MNv4Error, match="not a hub model id"):
        mnv4.create_model("hf-hub:no-owner")


def test_a_custom_spec_travels_in_mnv4_layout_with_its_bn_epsilon(tmp_path, tiny_hybrid_spec):
    model = randomize_(mnv4.create_model(tiny_hybrid_spec, num_classes=3, bn_eps=1e-3, in_chans=1))
    recalibrate_batchnorm(model, torch.randn(8, 1, 64, 64), batch_size=4).eval()
    repo = Path(mnv4.push_to_hub(model, "me/tiny", local_dir=tmp_path / "repo"))
    cfg = json.loads((repo / "config.json").read_text())
    assert cfg["architecture"] == "tiny_hybrid" and cfg["mnv4"]["weights_layout"] == "mnv4"
    assert cfg["model_args"] == {"in_chans": 1, "bn_eps": 1e-3}
    assert json.loads((repo / "spec.json").read_text()) == tiny_hybrid_spec.to_dict()
    assert _front_matter((repo / "README.md").read_text())["library_name"] == "mnv4"
    back = mnv4.create_model(checkpoint=repo).eval()
    assert back.spec == tiny_hybrid_spec
    assert {m.eps for m in back.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_upload_sends_the_written_folder_to_the_hub_api(tmp_path, monkeypatch):
    import huggingface_hub

    calls: dict = {}

    def create_repo(self, repo_id, private=False, exist_ok=False, **_):
        calls["create"] = (repo_id, private, exist_ok)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, commit_message=None, **_):
        calls["upload"] = repo_id
        shutil.copytree(folder_path, tmp_path / "uploaded")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = _model()
    url = mnv4.push_to_hub(model, "me/pets", private=True)
    assert url == "https://huggingface.co/me/pets"
    assert calls == {"create": ("me/pets", True, True), "upload": "me/pets"}
    back = mnv4.create_model(checkpoint=tmp_path / "uploaded").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))

    def refuse(self, *a, **k):
        raise RuntimeError("401 Client Error: Unauthorized")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
    with pytest.raises(MNv4Error, match="could not upload .* me/pets .*401.*hf auth login"):
        mnv4.push_to_hub(model, "me/pets")


def test_bad_input_is_one_clear_error(tmp_path, monkeypatch, capsys):
    model = _model()
    with pytest.raises(MNv4Error, match="not a Hub repository id"):
        mnv4.push_to_hub(model, "me/bad name", local_dir=tmp_path / "r")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: mnv4_conv_small\n")
    with pytest.raises(MNv4Error, match="has not finished and holds no weights yet .*mnv4 train --resume"):
        mnv4.push_to_hub(tmp_path / "run", "me/x", local_dir=tmp_path / "r")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(MNv4Error, match=r"pip install 'mnv4\[hub\]'"):
        mnv4.push_to_hub(model, "me/x")
    # a folder with someone's files is never written over; an earlier push's folder is updated in place
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("my notes")
    with pytest.raises(MNv4Error, match=r"holds files that are not an mnv4 repository folder \(README.md\)"):
        mnv4.push_to_hub(model, "me/x", local_dir=tmp_path / "mine")
    assert (tmp_path / "mine" / "README.md").read_text() == "my notes"
    again = tmp_path / "pushed"
    mnv4.push_to_hub(model, "me/x", local_dir=again)
    assert mnv4.push_to_hub(model, "me/x", local_dir=again) == str(again)
    assert (
        main(["hub", "push", str(tmp_path / "missing"), "--repo-id", "me/x", "--local-dir", str(tmp_path / "n")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mnv4: error: ") and "does not exist" in err[0]


def test_what_is_not_a_trained_classifier_is_named_with_what_to_do(tmp_path, tiny_hybrid_spec):
    from mnv4.detect import create_detector, save_detector

    det = save_detector(create_detector(tiny_hybrid_spec, classes=["a"], image_size=64), tmp_path / "det.safetensors")
    with pytest.raises(MNv4Error, match="holds a detector; `mnv4 hub push` shares classifiers only"):
        mnv4.push_to_hub(det, "me/x", local_dir=tmp_path / "r")
    (tmp_path / "found").mkdir()
    (tmp_path / "found" / "spec.json").write_text("{}")
    with pytest.raises(MNv4Error, match="an `mnv4 search` result, not a trained model; train its architecture"):
        mnv4.push_to_hub(tmp_path / "found", "me/x", local_dir=tmp_path / "r")


def test_the_reproducing_command_parses_back_to_the_run_config():
    from mnv4.train import resolve_config

    cfg = resolve_config("quick", model="mnv4_conv_small_050", lr=0.01, crop_scale=(0.5, 1.0), input_size=16)
    cfg = dataclasses.replace(cfg, output="/somewhere/run", workers=3, pretrained="e3000_r224_in1k")
    saved = yaml.safe_load(yaml.safe_dump({**cfg.to_dict(), "derived": {"total_steps": 4}}))  # as config.yaml
    cmd = shlex.split(train_command(saved))
    assert cmd[:2] == ["mnv4", "train"] and "/somewhere/run" not in cmd and "derived" not in " ".join(cmd)
    args = build_parser().parse_args(cmd[1:])
    assert (args.recipe, args.model, args.lr, args.input_size) == ("quick", "mnv4_conv_small_050", 0.01, 16)
    assert args.pretrained == "e3000_r224_in1k" and args.workers is None
    sets = dict(s.split("=", 1) for s in args.set)
    assert set(sets) == {"crop_scale"} and yaml.safe_load(sets["crop_scale"]) == [0.5, 1.0]


@pytest.mark.slow
def test_a_fine_tuned_run_round_trips_through_hub_push(tmp_path, capsys):
    timm = require("timm")
    run, repo = tmp_path / "run", tmp_path / "repo"
    argv = ["train", "-m", "mnv4_conv_small_050", "--epochs", "0.1", "--input-size", "16", "--lr", "0.01"]
    assert main([*argv, "-o", str(run), "--no-progress"]) == 0
    assert main(["hub", "push", str(run), "--repo-id", "me/digits", "--local-dir", str(repo)]) == 0
    assert "nothing uploaded" in capsys.readouterr().out

    summary = json.loads((run / "summary.json").read_text())
    trained = mnv4.create_model(checkpoint=run / "best.safetensors").eval()
    back = mnv4.create_model(checkpoint=repo).eval()
    ref = timm.create_model(f"local-dir:{repo}", pretrained=True).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), trained(x)) and _rel_err(trained(x), ref(x)) <= 1e-4
    assert back.class_names == [str(i) for i in range(10)] and back.preprocess.input_size == 16
    # trained at 16 px: the 256 px test setting of the architecture's published weights does not apply
    assert back.preprocess.test_input_size is None
    assert "test_input_size" not in json.loads((repo / "config.json").read_text())["pretrained_cfg"]

    readme = (repo / "README.md").read_text()
    meta = _front_matter(readme)
    assert meta["library_name"] == "timm" and meta["license"] == "apache-2.0" and "timm" in meta["tags"]
    assert f"| val top-1 (best epoch) | {summary['val_top1']:.2f}% |" in readme
    assert "| data | digits |" in readme and "| recipe | quick |" in readme
    cmd = next(line for line in readme.splitlines() if line.startswith("mnv4 train"))
    args = build_parser().parse_args(shlex.split(cmd)[1:])
    assert (args.model, args.epochs, args.input_size, args.lr) == ("mnv4_conv_small_050", 0.1, 16, 0.01)


def test_the_card_names_the_base_weights_and_the_hub_dataset_of_a_run(tmp_path):
    from mnv4.train import resolve_config

    run = tmp_path / "run"
    run.mkdir()
    model = _model()
    mnv4.save_model(model, run / "best.safetensors")
    cfg = resolve_config("finetune", model="mobilenetv4_conv_small_050", data="cifar10", pretrained="default")
    (run / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict()))))
    summary = {"dataset": "cifar10", "val_top1": 91.234, "val_top5_final": 99.5, "best_epoch": 3, "epochs": 4}
    (run / "summary.json").write_text(json.dumps({**summary, "best_checkpoint": str(tmp_path / "moved.safetensors")}))
    repo = Path(mnv4.push_to_hub(run, "me/c10", local_dir=tmp_path / "repo", license="mit"))
    readme = (repo / "README.md").read_text()
    meta = _front_matter(readme)
    assert meta["base_model"] == "timm/mobilenetv4_conv_small_050.e3000_r224_in1k"
    assert meta["datasets"] == ["uoft-cs/cifar10"] and meta["license"] == "mit"
    assert json.loads((repo / "config.json").read_text())["pretrained_cfg"]["license"] == "mit"
    assert "| val top-1 (best epoch) | 91.23% |" in readme and "| started from | timm weights (default) |" in readme
    assert "--pretrained" in readme and "epoch 3 of 4" in readme
    with pytest.raises(MNv4Error, match="holds a training run"):
        mnv4.push_to_hub(run, "me/c10", local_dir=run)


def test_a_folder_timm_writes_for_the_hub_loads_in_mnv4(tmp_path):
    timm = require("timm")
    from timm.models import save_for_hf

    ref = timm.create_model("mobilenetv4_conv_small_050", num_classes=5).eval()
    randomize_(ref)
    recalibrate_batchnorm(ref, torch.randn(8, 3, 64, 64), batch_size=4).eval()
    save_for_hf(ref, str(tmp_path / "repo"), model_config={"label_names": CLASSES}, safe_serialization=True)
    model = mnv4.create_model(checkpoint=tmp_path / "repo").eval()
    assert model.spec.name == "mnv4_conv_small_050" and model.class_names == CLASSES
    assert model.preprocess.input_size == ref.pretrained_cfg["input_size"][-1]
    assert model.preprocess.crop_pct == ref.pretrained_cfg["crop_pct"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = ref(x)
        assert _rel_err(y[0], y[1]) > 1e-2 and _rel_err(y, model(x)) <= 1e-4
