"""Detectors (mnv4.detect): shapes, label convention, anchors, saving, bad input (docs/detection.md)."""

from __future__ import annotations

import pytest
import torch

from mnv4.detect import create_detector, list_detectors, load_detector, save_detector
from mnv4.detect.model import feature_sizes
from mnv4.errors import MNv4Error

from .conftest import randomize_

SIZE = 96


def _images(n: int = 2, size: int = SIZE) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, size, size, generator=g) for _ in range(n)]


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[10.0, 12.0, 50.0, 70.0], [60.0, 5.0, 90.0, 30.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # a valid negative
    ]


@pytest.fixture(
    params=[
        "retinanet_mnv4_conv_small",
        "ssdlite_mnv4_conv_small",
        "ssdlite_mnv4_conv_small-expansion",
        "ssdlite_mnv4_conv_small-stride8",
        "retinanet_mnv4_hybrid_medium",
        "tiny-retinanet",
        "tiny-ssdlite",
    ]
)
def detector(request, tiny_hybrid_spec):
    name = request.param
    if name.startswith("tiny-"):
        return create_detector(tiny_hybrid_spec, head=name[5:], num_classes=3, image_size=SIZE)
    if name.endswith("-expansion"):
        return create_detector(name.split("-")[0], num_classes=3, image_size=SIZE, feature_location="expansion")
    if name.endswith("-stride8"):  # SSDLite on strides 8/16/32 + extras, with small default boxes
        return create_detector(name.split("-")[0], num_classes=3, image_size=SIZE, levels=[2, 3, 4], min_ratio=0.05)
    return create_detector(name, num_classes=3, image_size=SIZE)


def test_train_mode_returns_the_two_losses_and_every_head_parameter_learns(detector):
    detector.train()
    losses = detector(_images(), _targets())
    assert set(losses) == {"classification", "bbox_regression"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    head_params = [p for n, p in detector.model.head.named_parameters()]
    assert all(p.grad is not None for p in head_params)


def test_eval_mode_returns_boxes_scores_labels_in_range(detector):
    randomize_(detector).eval()
    with torch.no_grad():
        out = detector(_images(), None)
    assert len(out) == 2
    for det in out:
        n = det["boxes"].shape[0]
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,) and det["labels"].dtype == torch.int64
        if n:
            assert 0 <= int(det["labels"].min()) and int(det["labels"].max()) < 3
            assert float(det["boxes"].min()) >= 0 and float(det["boxes"].max()) <= SIZE


def test_network_anchors_and_decode_agree_with_forward(detector):
    randomize_(detector).eval()
    images = _images()
    pre = detector.config["preprocess"]
    mean, std = torch.tensor(pre["mean"]).view(3, 1, 1), torch.tensor(pre["std"]).view(3, 1, 1)
    batch = torch.stack([(im - mean) / std for im in images])
    with torch.no_grad():
        cls, box = detector.network(batch)
        expected = detector(images)
    anchors = detector.anchors()
    assert cls.shape[:2] == box.shape[:2] == (2, anchors.shape[0]) and box.shape[2] == 4
    assert cls.shape[2] == (3 if detector.head_kind == "retinanet" else 4)  # SSD: + background column
    m = detector.model
    got = detector.decode(cls, box, m.score_thresh, m.nms_thresh, m.detections_per_img)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g["boxes"], e["boxes"])
        assert torch.equal(g["labels"], e["labels"])


def test_retinanet_anchor_count_follows_the_pyramid():
    det = create_detector("mnv4_conv_small", num_classes=1, image_size=100)
    # P3..P7 at strides 8..128 with ceil-mode halving, 3 scales x 3 ratios per location
    sides = [13, 7, 4, 2, 1]
    assert feature_sizes(100, 8, 5) == sides
    assert det.anchors().shape == (9 * sum(s * s for s in sides), 4)
    with torch.no_grad():
        cls, _ = det.eval().network(torch.zeros(1, 3, 100, 100))
    assert cls.shape[1] == det.anchors().shape[0]


@pytest.mark.parametrize("head", ["retinanet", "ssdlite"])
def test_labels_are_zero_based_whatever_the_head(head):
    det = create_detector("mnv4_conv_small", head=head, num_classes=3, image_size=64).eval()
    cls, box = det.network(torch.zeros(1, 3, 64, 64))
    cls = torch.full_like(cls, -20.0)
    column = 2 if head == "retinanet" else 3  # class 2; SSD's column 0 is background
    cls[0, 5, column] = 20.0
    if head == "ssdlite":
        cls[0, :, 0] = 0.0  # every other anchor: background
        cls[0, 5, 0] = -20.0
    dets = det.decode(cls, torch.zeros_like(box), score_thresh=0.5, nms_thresh=0.5, max_det=10)
    assert dets[0]["labels"].tolist() == [2]
    torch.testing.assert_close(dets[0]["boxes"][0], det.anchors()[5].clamp(0, 64))


def test_registry_names_cover_both_heads_and_every_backbone():
    names = list_detectors()
    assert "retinanet_mnv4_conv_medium" in names and "ssdlite_mnv4_conv_small" in names
    assert list_detectors("ssdlite_*") == [n for n in names if n.startswith("ssdlite_")]
    det = create_detector("ssdlite_mobilenetv4_conv_small", num_classes=2, image_size=64)  # timm alias
    assert det.head_kind == "ssdlite" and det.config["backbone"] == "mnv4_conv_small"


def test_save_load_round_trip_gives_identical_outputs(tmp_path, tiny_hybrid_spec):
    det = create_detector(tiny_hybrid_spec, num_classes=2, classes=["cat", "dog"], image_size=64, width=32)
    randomize_(det).eval()
    path = save_detector(det, tmp_path / "det.safetensors")
    back = load_detector(path).eval()
    assert back.classes == ["cat", "dog"] and back.image_size == 64 and back.config == det.config
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(det.network(x), back.network(x)):
            assert torch.equal(a, b)
    again = create_detector(checkpoint=path)
    assert again.config == det.config


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(model="mnv4_conv_smol", num_classes=3), "unknown model"),
        (dict(model="mnv4_conv_small", num_classes=0), "num_classes"),
        (dict(model="mnv4_conv_small"), "num_classes"),
        (dict(model="mnv4_conv_small", head="yolo", num_classes=3), "head"),
        (dict(model="retinanet_mnv4_conv_small", head="ssdlite", num_classes=3), "retinanet head"),
        (dict(model="mnv4_conv_small", num_classes=3, widht=8), "unknown retinanet option"),
        (dict(model="mnv4_conv_small", num_classes=3, box_loss="mse"), "box_loss"),
        (dict(model="ssdlite_mnv4_conv_small", num_classes=3, feature_location="mid"), "feature_location"),
        (dict(model="mnv4_conv_small", num_classes=3, feature_location="expansion"), "unknown retinanet option"),
        (dict(model="ssdlite_mnv4_conv_small", num_classes=3, bn_momentum=1.5), "bn_momentum"),
        (dict(model="ssdlite_mnv4_conv_small", num_classes=3, min_ratio=0.5, max_ratio=0.4), "below `max_ratio`"),
        (dict(model="ssdlite_mnv4_conv_small", num_classes=3, min_ratio=0.0), "min_ratio"),
        (dict(model="mnv4_conv_small", num_classes=3, min_ratio=0.1), "unknown retinanet option"),
        (dict(model="ssdlite_mnv4_conv_small", num_classes=3, levels=[2, 3]), "ending at the stride-32"),
        (dict(model="ssdlite_mnv4_conv_small", num_classes=3, levels=[2, 4]), "consecutive"),
        (dict(model="ssdlite_mnv4_conv_small", num_classes=3, levels="2,3,4"), "levels"),
        (dict(model="mnv4_conv_small", num_classes=3, bn_eps="small"), "bn_eps"),
        (dict(model="mnv4_conv_small", num_classes=2, classes=["a"]), "differs"),
        (dict(model="TINY", num_classes=2, pretrained=True), "registered backbones only"),
        (dict(model="mnv4_conv_small", num_classes=2, image_size=16), "image_size"),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs, match, tiny_hybrid_spec):
    if kwargs.get("model") == "TINY":
        kwargs = {**kwargs, "model": tiny_hybrid_spec}
    with pytest.raises(MNv4Error, match=match) as info:
        create_detector(**kwargs)
    assert "\n" not in str(info.value)


def test_corrupt_or_foreign_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(MNv4Error) as info:
        load_detector(bad)
    assert "\n" not in str(info.value)
    from mnv4.weights.io import write_safetensors

    foreign = write_safetensors(tmp_path / "cls.safetensors", {"w": torch.zeros(2)}, {"format": "mnv4"})
    with pytest.raises(MNv4Error, match="not an mnv4 detector"):
        load_detector(foreign)


def test_wrong_image_size_is_refused():
    det = create_detector("mnv4_conv_small", num_classes=1, image_size=64).eval()
    with pytest.raises(MNv4Error, match="3x64x64"):
        det([torch.rand(3, 64, 80)])


@pytest.mark.parametrize("backbone", ["mnv4_conv_medium", "mnv4_hybrid_medium"])
def test_paper_detector_matches_tab7_params_and_macs_within_3_percent(backbone):
    from mnv4.detect.profile import COCO_CLASSES, PAPER_TAB7, paper_counts

    det = create_detector(backbone, num_classes=COCO_CLASSES, image_size=384)
    counts = paper_counts(det)
    paper_params, paper_macs = PAPER_TAB7[backbone]
    assert counts.paper_params / 1e6 == pytest.approx(paper_params, rel=0.03)
    assert counts.paper_macs / 1e9 == pytest.approx(paper_macs, rel=0.03)
    # the classification tail is counted from an independent full classifier: 256->960 and 960->1280 convs + BN
    c5 = det.backbone.feature_info[-1]["num_chs"]
    assert counts.tail_params == c5 * 960 + 960 * 1280 + 2 * (960 + 1280)
    # and the detector itself is exactly its parameters
    assert counts.params == sum(p.numel() for p in det.parameters())


def test_roofline_pixel6_latency_is_near_tab7():
    from mnv4.detect.profile import PAPER_TAB7_PIXEL6_MS, pixel6_latency_ms

    det = create_detector("mnv4_conv_medium", num_classes=91, image_size=384)
    # within 10%: a model anchored on classifiers only, so a loose bar; a head 2x heavier would fail it
    assert pixel6_latency_ms(det) == pytest.approx(PAPER_TAB7_PIXEL6_MS["mnv4_conv_medium"], rel=0.10)


def test_dense_fpn_convs_would_miss_tab7():
    from mnv4.detect.profile import PAPER_TAB7, paper_counts

    det = create_detector("mnv4_conv_medium", num_classes=91, image_size=384, fpn_separable=False)
    assert paper_counts(det).paper_macs / 1e9 > 1.2 * PAPER_TAB7["mnv4_conv_medium"][1]


def test_ssdlite_extras_match_torchvisions_ssdlite320():
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    from mnv4.detect.heads import ssdlite_extras

    ref = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=91).backbone.extra
    ours = ssdlite_extras(480)  # torchvision's reduced-tail MobileNetV3 ends in 480 channels
    assert [sum(p.numel() for p in b.parameters()) for b in ours] == [
        sum(p.numel() for p in b.parameters()) for b in ref
    ]
    det = create_detector("ssdlite_mnv4_conv_small", num_classes=3, image_size=320)
    assert det.anchors().shape[0] == 6 * (20 * 20 + 10 * 10 + 5 * 5 + 3 * 3 + 2 * 2 + 1)  # 6 boxes per location


def _classifier_file(tmp_path, mean=(0.25, 0.5, 0.75)):
    from mnv4 import create_model, save_model
    from mnv4.models.registry import Preprocess

    clf = randomize_(create_model("mnv4_conv_small", num_classes=10), seed=3)
    clf.preprocess = Preprocess(mean=mean)
    return clf, save_model(clf, tmp_path / "clf.safetensors")


def test_backbone_checkpoint_changes_the_backbone_weights_only(tmp_path):
    clf, path = _classifier_file(tmp_path)
    torch.manual_seed(0)
    loaded = create_detector("mnv4_conv_small", num_classes=2, image_size=64, backbone_checkpoint=path)
    torch.manual_seed(0)
    fresh = create_detector("mnv4_conv_small", num_classes=2, image_size=64)
    own = clf.state_dict()
    for k, v in loaded.backbone.state_dict().items():
        assert torch.equal(v, own[k]), k
    assert not torch.equal(fresh.backbone.stem.conv.weight, clf.stem.conv.weight)
    rest = {k: v for k, v in loaded.state_dict().items() if not k.startswith("model.backbone.body.")}
    fresh_sd = fresh.state_dict()
    assert rest and all(torch.equal(v, fresh_sd[k]) for k, v in rest.items())
    assert loaded.config["preprocess"]["mean"] == [0.25, 0.5, 0.75]  # the weights' normalisation


def test_ssdlite_expansion_taps_load_the_960_conv_and_round_trip(tmp_path):
    # feature_location="expansion": SSDLite reads the 576-channel expansion and the 960 conv (as torchvision's
    # SSDLite reads MobileNetV3), so the classifier's final_conv weights come along with the backbone.
    clf, path = _classifier_file(tmp_path)
    det = create_detector(
        "ssdlite_mnv4_conv_small", num_classes=2, image_size=64, backbone_checkpoint=path, feature_location="expansion"
    ).eval()
    assert [f["num_chs"] for f in det.backbone.feature_info] == [576, 960]
    assert torch.equal(det.backbone.final_conv.conv.weight, clf.final_conv.conv.weight)
    back = load_detector(save_detector(det, tmp_path / "det.safetensors")).eval()
    assert back.config["head_options"]["feature_location"] == "expansion"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(det.network(x), back.network(x)):
            assert torch.equal(a, b)


def test_feature_location_auto_takes_the_expansion_maps_where_the_backbone_has_them(tiny_hybrid_spec):
    # conv_small's stride-16 and -32 stages start with a UIB that expands before its stride: expansion maps;
    # the tiny spec's stage 4 strides in its first depthwise, before the expansion: the stage ends instead.
    wide = create_detector("ssdlite_mnv4_conv_small", num_classes=2, image_size=64, feature_location="auto")
    assert wide.config["head_options"]["feature_location"] == "expansion"
    assert [f["num_chs"] for f in wide.backbone.feature_info] == [576, 960]
    tiny = create_detector(tiny_hybrid_spec, head="ssdlite", num_classes=2, image_size=64, feature_location="auto")
    assert tiny.config["head_options"]["feature_location"] == "stage"
    with pytest.raises(MNv4Error, match="no expansion map"):
        create_detector(tiny_hybrid_spec, head="ssdlite", num_classes=2, image_size=64, feature_location="expansion")


@pytest.mark.parametrize("head", ["ssdlite", "retinanet"])
def test_backbone_batchnorm_options_reach_every_backbone_bn_and_survive_save_load(tmp_path, head):
    # bn_eps / bn_momentum set the backbone's BatchNorm (torchvision's SSDLite trains with 0.001 / 0.03);
    # loading a classifier checkpoint keeps them, and the saved detector rebuilds with them.
    _, path = _classifier_file(tmp_path)
    det = create_detector(
        "mnv4_conv_small",
        head=head,
        num_classes=2,
        image_size=64,
        backbone_checkpoint=path,
        bn_eps=1e-3,
        bn_momentum=0.03,
    )
    plain = create_detector("mnv4_conv_small", head=head, num_classes=2, image_size=64)

    def bns(d):
        return [m for m in d.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    assert bns(det) and {(m.eps, m.momentum) for m in bns(det)} == {(1e-3, 0.03)}
    assert {(m.eps, m.momentum) for m in bns(plain)} == {(1e-5, 0.1)}
    back = load_detector(save_detector(det, tmp_path / "det.safetensors"))
    assert {(m.eps, m.momentum) for m in bns(back)} == {(1e-3, 0.03)}
    det.eval(), back.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(det.network(x), back.network(x)):
            assert torch.equal(a, b)


def test_ssdlite_stride8_level_adds_a_map_and_survives_save_load(tmp_path):
    det = create_detector("ssdlite_mnv4_conv_small", num_classes=2, image_size=320, levels=[2, 3, 4])
    assert [f["reduction"] for f in det.backbone.feature_info] == [8, 16, 32]
    assert det._grid == [40, 20, 10, 5, 3, 2, 1]
    assert det.anchors().shape[0] == 6 * sum(g * g for g in det._grid)  # 6 boxes per location on 7 maps
    back = load_detector(save_detector(det, tmp_path / "det.safetensors")).eval()
    assert back.config["head_options"]["levels"] == [2, 3, 4]
    x = torch.rand(1, 3, 320, 320)
    with torch.no_grad():
        logits, boxes = back.network(x)
    assert logits.shape[1] == boxes.shape[1] == back.anchors().shape[0]


def test_ssdlite_min_ratio_sets_the_smallest_default_box_and_survives_save_load(tmp_path):
    # SSD's square boxes on the first map have side min_ratio * image_size (and sqrt(s0 * s1) for the
    # extra one); the aspect-ratio boxes keep the area. 0.2 is torchvision's default (64 px at 320).
    def square_sides(det):
        a = det.anchors()
        w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
        return sorted({round(float(x), 3) for x in w[torch.isclose(w, h)]})

    default = create_detector("ssdlite_mnv4_conv_small", num_classes=2, image_size=320)
    small = create_detector("ssdlite_mnv4_conv_small", num_classes=2, image_size=320, min_ratio=0.1)
    assert square_sides(default)[0] == pytest.approx(64.0, abs=0.01)
    assert square_sides(small)[0] == pytest.approx(32.0, abs=0.01)
    assert small.anchors().shape == default.anchors().shape  # same boxes per location: same head
    back = load_detector(save_detector(small, tmp_path / "det.safetensors"))
    assert back.config["head_options"]["min_ratio"] == 0.1
    assert torch.equal(back.anchors(), small.anchors())


def test_pretrained_tag_goes_through_the_hub_code(monkeypatch, tmp_path):
    clf, path = _classifier_file(tmp_path)
    asked = []

    def fake_download(hub_id, filename="model.safetensors"):
        asked.append(hub_id)
        return path

    monkeypatch.setattr("mnv4.factory.download_weights", fake_download)
    det = create_detector("retinanet_mnv4_conv_small", num_classes=2, image_size=64, pretrained="e1200_r224_in1k")
    assert asked == ["timm/mobilenetv4_conv_small.e1200_r224_in1k"]
    assert torch.equal(det.backbone.stem.conv.weight, clf.stem.conv.weight)
    assert det.config["preprocess"]["mean"] == [0.485, 0.456, 0.406]  # the tag's preprocessing
    with pytest.raises(MNv4Error, match="not both"):
        create_detector("mnv4_conv_small", num_classes=2, pretrained=True, backbone_checkpoint=path)


def test_backbone_checkpoint_of_another_architecture_is_a_one_line_error(tmp_path):
    _, path = _classifier_file(tmp_path)
    with pytest.raises(MNv4Error, match="mnv4_conv_small") as info:
        create_detector("mnv4_conv_medium", num_classes=2, image_size=64, backbone_checkpoint=path)
    assert "\n" not in str(info.value)


def test_cli_profile_counts_detectors_by_name_and_checkpoint(capsys, tmp_path, tiny_hybrid_spec):
    from mnv4.cli import main

    assert main(["profile", "-m", "retinanet_mnv4_conv_medium"]) == 0
    out = capsys.readouterr().out
    det = create_detector("mnv4_conv_medium", num_classes=91, image_size=384)
    assert (
        f"retinanet_mnv4_conv_medium @ 384x384, batch 1, float32: {sum(p.numel() for p in det.parameters()):,}" in out
    )
    assert "as the paper counts" in out and "9.68M params, 5.07 GMACs" in out
    path = save_detector(create_detector(tiny_hybrid_spec, num_classes=2, image_size=64), tmp_path / "d.safetensors")
    assert main(["profile", "--checkpoint", str(path), "--per-layer"]) == 0
    out = capsys.readouterr().out
    assert "@ 64x64" in out and "model.head.classification_head" in out


@pytest.mark.parametrize("head", ["retinanet", "ssdlite"])
def test_a_few_steps_on_one_box_teach_its_place_and_its_zero_based_label(head, tiny_hybrid_spec):
    from torchvision.ops import box_iou

    torch.manual_seed(0)
    kw = dict(width=32, num_convs=2) if head == "retinanet" else dict(extra_widths=[32, 16])
    det = create_detector(tiny_hybrid_spec, head=head, num_classes=3, image_size=64, **kw)
    img = torch.zeros(3, 64, 64)
    img[:, 16:48, 8:40] = 1.0
    target = {"boxes": torch.tensor([[8.0, 16.0, 40.0, 48.0]]), "labels": torch.tensor([2])}
    opt = torch.optim.Adam(det.parameters(), 3e-3)
    for _ in range(60):
        loss = sum(det.train()([img, img.clone()], [target, target]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        top = det.eval()([img])[0]
    assert int(top["labels"][0]) == 2
    assert float(box_iou(top["boxes"][:1], target["boxes"])) > 0.5


def test_box_loss_option_switches_torchvisions_regression_loss():
    losses = {}
    for kind in ("l1", "giou"):
        torch.manual_seed(0)
        det = create_detector("mnv4_conv_small", num_classes=3, image_size=SIZE, box_loss=kind)
        losses[kind] = det.train()(_images(), _targets())
    torch.testing.assert_close(losses["l1"]["classification"], losses["giou"]["classification"])
    assert not torch.isclose(losses["l1"]["bbox_regression"], losses["giou"]["bbox_regression"])
