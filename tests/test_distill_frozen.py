"""Frozen-backbone teachers: cached pooled features, the fitted head, and the teacher file it makes."""

from __future__ import annotations

import json

import pytest
import torch

from mnv4.cli import main
from mnv4.distill import frozen
from mnv4.distill.engines import parity_sample
from mnv4.distill.frozen import FrozenConfig, cached_features, feature_extractor, fit_linear_head
from mnv4.distill.quality import teacher_quality
from mnv4.distill.sources import open_source, to_uint8
from mnv4.distill.teachers import load_teacher, save_teacher
from mnv4.models.registry import Preprocess

from .distill_helpers import COLORS, make_folder

timm = pytest.importorskip("timm")


@pytest.fixture
def timm_weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "init.pth"
    torch.save(timm.create_model("test_efficientnet", num_classes=5).state_dict(), path)
    return str(path)


def test_head_fits_separable_features_of_any_scale():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(400) % 4
    x = centres[y] + torch.randn(400, 16, generator=g)
    # raw features far from zero mean / unit scale: the head must fold its standardisation back in
    scale, shift = torch.logspace(-2, 3, 16), torch.linspace(-500, 500, 16)
    head = fit_linear_head(x[:300] * scale + shift, y[:300], 4)
    pred = head(x[300:] * scale + shift).argmax(1)
    assert pred.eq(y[300:]).float().mean() >= 0.97
    # a stronger penalty gives a smaller weight (the penalty is applied), same decisions on easy data
    weak = fit_linear_head(x[:300], y[:300], 4, weight_decay=1e-4).weight.norm()
    strong = fit_linear_head(x[:300], y[:300], 4, weight_decay=1.0).weight.norm()
    assert strong < weak


def test_cached_features_equal_a_fresh_forward_and_are_reused(tmp_path, timm_weights, monkeypatch):
    photos = make_folder(tmp_path / "photos", per_class=3)
    teacher = load_teacher("timm:test_efficientnet", timm_weights, input_size=32)
    source = open_source(photos)
    cfg = FrozenConfig("timm:test_efficientnet", str(photos), str(tmp_path / "run"), batch_size=4)
    cache = tmp_path / "cache"
    feats, index = cached_features(teacher, source, None, cfg, cache, progress=False)
    assert index.tolist() == list(range(len(source)))

    # the oracle: timm's own pre-logits path on the teacher's evaluation view
    net = timm.create_model("test_efficientnet", num_classes=5)
    net.load_state_dict(torch.load(timm_weights, weights_only=True))
    views = torch.stack([teacher.view(to_uint8(source.load(i))) for i in range(len(source))])
    with torch.no_grad():
        want = net.eval().forward_head(net.forward_features(teacher.model_input(views)), pre_logits=True)
    torch.testing.assert_close(feats, want, rtol=1e-4, atol=1e-5)

    aug0, _ = cached_features(teacher, source, 0, cfg, cache, progress=False)
    aug1, _ = cached_features(teacher, source, 1, cfg, cache, progress=False)
    assert not torch.allclose(aug0, feats) and not torch.allclose(aug0, aug1)
    assert len(list(cache.glob("*.safetensors"))) == 3

    # a rerun with the same teacher, data and view reads the cache and runs no forward pass
    def no_forward(*a, **k):
        raise AssertionError("the teacher ran although its features were cached")

    monkeypatch.setattr(frozen, "pooled_features", no_forward)
    again, _ = cached_features(teacher, source, 0, cfg, cache, progress=False)
    assert torch.equal(again, aug0)
    other_seed = FrozenConfig("timm:test_efficientnet", str(photos), "x", seed=1)
    with pytest.raises(AssertionError, match="cached"):
        cached_features(teacher, source, 0, other_seed, cache, progress=False)  # another view: not a cache hit


@pytest.mark.slow
def test_frozen_teacher_file_labels_evaluates_and_matches_its_summary(tmp_path, timm_weights, capsys):
    photos = make_folder(tmp_path / "photos" / "train", per_class=10).parent
    make_folder(photos / "val", per_class=5, seed=9)
    run = tmp_path / "teacher"
    args = ["distill", "finetune", "--mode", "frozen", "--teacher", "timm:test_efficientnet"]
    args += ["--teacher-checkpoint", timm_weights, "--data", str(photos), "--input-size", "32", "--views", "1"]
    assert main([*args, "-o", str(run), "--no-progress", "--head-wd", "1e-2"]) == 0
    out = capsys.readouterr().out
    assert "with a fitted head at 32 px: val top-1" in out and "use it as --teacher" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_images"] == 30 and summary["views"] == 1

    t = load_teacher(str(run / "best.safetensors"))
    assert t.class_names == ["blue", "green", "red"] and t.num_classes == 3 and t.input_size == 32
    # the saved network, end to end on the val images, agrees with the head's score on cached features
    val = open_source(photos / "val")
    probs = t.probs(torch.stack([t.view(to_uint8(val.load(i))) for i in range(len(val))]))
    target = torch.tensor([t.class_names.index(val.class_names[c]) for c in val.labels])
    assert 100 * probs.argmax(1).eq(target).float().mean().item() == pytest.approx(summary["val"]["top1"])
    assert probs.max(1).values.mean().item() == pytest.approx(summary["val"]["mean_max_prob"], abs=1e-3)
    q = teacher_quality(run / "best.safetensors", photos)  # the scorer reports use: the same figures
    assert q.images == len(val) and q.top1 == pytest.approx(summary["val"]["top1"])
    assert q.mean_max_prob == pytest.approx(summary["val"]["mean_max_prob"], abs=1e-3)

    labels = tmp_path / "labels"
    assert (
        main(
            ["distill", "label", "--teacher", str(run / "best.safetensors"), "--data", str(photos)]
            + ["-o", str(labels), "--aug", "none", "--no-progress"]
        )
        == 0
    )
    manifest = json.loads((labels / "manifest.json").read_text())
    assert manifest["records"] == 30 and manifest["teacher"]["arch"] == "test_efficientnet"
    assert manifest["teacher_check"]["top1"] == pytest.approx(summary["train"]["top1"])
    assert main(["eval", "--checkpoint", str(run / "best.safetensors"), "--data", str(photos)]) == 0


def test_ensemble_file_averages_its_members_probabilities(tmp_path, capsys):
    files = []
    for i, pp in enumerate([Preprocess(32, 1.0, "bicubic"), Preprocess(40, 0.9, "bilinear", (0.5,) * 3, (0.5,) * 3)]):
        torch.manual_seed(i)
        net = timm.create_model("test_efficientnet", num_classes=3)
        with torch.no_grad():
            net.get_classifier().weight.mul_(40)  # confident, distinct members: averaging is visible
        files.append(str(save_teacher(net, tmp_path / f"t{i}.safetensors", "timm", "test_efficientnet", pp, COLORS)))
    photos = make_folder(tmp_path / "photos" / "val", per_class=2).parent
    args = ["distill", "finetune", "--ensemble", *files, "-o", str(tmp_path / "ens"), "--data", str(photos)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ensemble of 2 teachers" in out
    ens = load_teacher(str(tmp_path / "ens" / "best.safetensors"))
    val = open_source(photos / "val")  # the printed score is the ensemble's own on the val split
    probs = ens.probs(torch.stack([ens.view(to_uint8(val.load(i))) for i in range(len(val))]))
    target = torch.tensor([ens.class_names.index(val.class_names[c]) for c in val.labels])
    assert f"ensemble val top-1 {100 * probs.argmax(1).eq(target).float().mean().item():.2f}%" in out
    assert f"on {len(val)} images" in out
    unlabelled = tmp_path / "flat"
    unlabelled.mkdir()
    (photos / "val" / val.ids[0]).rename(unlabelled / "a.png")
    assert main([*args[:-1], str(unlabelled), "--exist-ok"]) == 2
    assert "no labels" in capsys.readouterr().err
    assert ens.identity["family"] == "ensemble" and ens.class_names == list(COLORS) and ens.input_size == 40

    images = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    members = [load_teacher(f) for f in files]
    want = torch.stack([m.probs(images) for m in members]).mean(0)
    # a member alone resizes uint8 (rounded), inside the ensemble float: inputs up to a grey level apart,
    # which these deliberately over-confident members turn into a few 1e-3 of probability
    torch.testing.assert_close(ens.probs(images), want, atol=6e-3, rtol=0)
    assert not torch.allclose(members[0].probs(images), members[1].probs(images), atol=0.1)

    assert main(["distill", "finetune", "--ensemble", files[0], "-o", str(tmp_path / "one")]) == 2
    assert "at least two" in capsys.readouterr().err


@pytest.mark.slow
def test_features_on_onnxruntime_equal_eager_features_and_share_the_cache(tmp_path, timm_weights):
    pytest.importorskip("onnxruntime")
    photos = make_folder(tmp_path / "photos", per_class=3)
    teacher = load_teacher("timm:test_efficientnet", timm_weights, input_size=32)
    source = open_source(photos)
    cfg = FrozenConfig("timm:test_efficientnet", str(photos), str(tmp_path / "run"), batch_size=4)
    eager, _ = cached_features(teacher, source, None, cfg, tmp_path / "eager", progress=False)
    said: list[str] = []
    fast = feature_extractor(teacher, "onnxruntime", parity_sample(source, teacher), said.append)
    assert fast.identity["engine"] == "onnxruntime" and said[0].startswith("teacher runs on onnxruntime: features")
    got, _ = cached_features(fast, source, None, cfg, tmp_path / "fast", progress=False)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-5)
    # the cache is keyed by teacher, data and view, not by the route: both runs wrote the same file name
    assert [p.name for p in (tmp_path / "eager").iterdir()] == [p.name for p in (tmp_path / "fast").iterdir()]
