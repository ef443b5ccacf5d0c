"""Detector export (mnv4.detect.export): raw network and decoding + NMS graphs, parity, the CLI branch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mnv4.detect import create_detector, save_detector
from mnv4.detect.export import NMSNetwork, RawNetwork, export_detector, match_detections
from mnv4.errors import MNv4Error

from .cli_run import run_mnv4
from .conftest import randomize_, require

SIZE = 64


def _busy(detector):
    """Trained-like statistics and class biases at 0, so random images give many detections to compare."""
    randomize_(detector).eval()
    cls = detector.model.head.classification_head
    predictors = [cls.cls_logits[-1]] if hasattr(cls, "cls_logits") else [m[-1] for m in cls.module_list]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # spread the scores: near-equal ones would make NMS's order a coin toss
        for conv in detector.model.head.modules():
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(conv.weight, generator=g)
        for conv in predictors:
            conv.bias.zero_()
    return detector


@pytest.fixture(params=["retinanet", "ssdlite", "ssdlite-stride8"])
def detector(request, tiny_hybrid_spec):
    kw = dict(width=32, num_convs=2) if request.param == "retinanet" else dict(extra_widths=[32, 16])
    if request.param == "ssdlite-stride8":  # a stride-8 map and small default boxes: 3 + 2 maps
        kw.update(levels=[2, 3, 4], min_ratio=0.05)
    head = request.param.split("-")[0]
    det = create_detector(tiny_hybrid_spec, head=head, num_classes=3, image_size=SIZE, **kw)
    return _busy(det)


def _normalised(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_nms_graph_equals_torchvisions_decoding(detector):
    x = _normalised(3)
    module = NMSNetwork(detector, score_thresh=0.05, nms_thresh=0.5, max_det=50).eval()
    with torch.no_grad():
        cls, box = detector.network(x)
        reference = detector.decode(cls, box, score_thresh=0.05, nms_thresh=0.5, max_det=50)
        total = 0
        for i, ref in enumerate(reference):
            got = module(x[i : i + 1]).numpy()
            want = torch.cat([ref["boxes"], ref["scores"][:, None], ref["labels"][:, None].float()], 1).numpy()
            m = match_detections(want, got)
            assert m["reference"] == m["exported"] and m["min_iou"] >= 0.999 and m["same_class"], m
            total += len(want)
    assert total > 10  # the comparison saw real detections


def test_match_detections_notices_a_moved_box_and_a_changed_class():
    ref = np.array([[0, 0, 10, 10, 0.9, 1], [20, 20, 40, 40, 0.8, 2]], dtype=np.float32)
    assert match_detections(ref, ref[::-1].copy())["min_iou"] == 1.0  # order does not matter
    moved = ref.copy()
    moved[0, :4] += 1
    assert match_detections(ref, moved)["min_iou"] < 0.99
    relabelled = ref.copy()
    relabelled[1, 5] = 0
    assert not match_detections(ref, relabelled)["same_class"]
    assert match_detections(ref, ref[:1])["exported"] == 1


@pytest.mark.slow
def test_onnx_raw_export_matches_network_and_ships_the_anchors(detector, tmp_path):
    ort = require("onnxruntime")
    path = export_detector(detector, "onnx", tmp_path / "det.onnx", samples=2, verbose=False)
    assert json.loads((tmp_path / "det.onnx.parity.json").read_text())["passed"]
    x = _normalised(2, seed=5)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        cls, box = detector.network(x)
    np.testing.assert_allclose(got[..., : cls.shape[2]], cls.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[..., cls.shape[2] :], box.numpy(), rtol=1e-4, atol=1e-4)
    side = json.loads((tmp_path / "det.onnx.detector.json").read_text())
    assert np.allclose(np.array(side["anchors"]), detector.anchors().numpy())
    assert side["classes"] == detector.classes


@pytest.mark.slow
def test_onnx_with_nms_gives_torchvisions_boxes(detector, tmp_path):
    ort = require("onnxruntime")
    path = export_detector(detector, "onnx", tmp_path / "nms.onnx", with_nms=True, samples=2, verbose=False)
    report = json.loads((tmp_path / "nms.onnx.parity.json").read_text())
    assert report["passed"] and report["detections"] > 0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _normalised(1, seed=9)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    m = detector.model  # the graph decodes at the eager detector's own thresholds (SSDLite: 0.001 / 0.55)
    with torch.no_grad():
        ref = detector.decode(*detector.network(x), m.score_thresh, m.nms_thresh, m.detections_per_img)[0]
    want = torch.cat([ref["boxes"], ref["scores"][:, None], ref["labels"][:, None].float()], 1).numpy()
    m = match_detections(want, got)
    assert len(want) > 0 and m["exported"] == m["reference"] and m["min_iou"] >= 0.99 and m["same_class"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(fmt="litert", with_nms=True), "cannot hold NMS"),
        (dict(fmt="onnx", with_nms=True, precision="int8"), "fp32"),
        (dict(fmt="onnx", with_nms=True, max_det=0), "max_det"),
        (dict(fmt="onnx", output="x.tflite", with_nms=True), "must end in .onnx"),
    ],
)
def test_bad_export_requests_are_one_line_errors(tiny_hybrid_spec, tmp_path, kwargs, match):
    det = create_detector(tiny_hybrid_spec, num_classes=2, image_size=SIZE, width=16, num_convs=1)
    kwargs.setdefault("output", tmp_path / "d.onnx")
    with pytest.raises(MNv4Error, match=match) as info:
        export_detector(det, **kwargs)
    assert "\n" not in str(info.value)


def test_raw_network_module_is_what_network_returns(detector):
    x = _normalised(2)
    with torch.no_grad():
        joined = RawNetwork(detector)(x)
        cls, box = detector.network(x)
    assert torch.equal(joined, torch.cat([cls, box], -1))


@pytest.mark.slow
def test_cli_export_detects_a_detector_checkpoint(tiny_hybrid_spec, tmp_path):
    require("onnxruntime")
    det = _busy(create_detector(tiny_hybrid_spec, num_classes=2, image_size=SIZE, width=16, num_convs=1))
    ckpt = save_detector(det, tmp_path / "det.safetensors")
    out = tmp_path / "det.onnx"
    r = run_mnv4(["export", "--checkpoint", str(ckpt), "--format", "onnx", "-o", str(out), "--samples", "2"])
    assert r.returncode == 0, r.stderr
    assert out.exists() and (tmp_path / "det.onnx.detector.json").exists()
    r = run_mnv4(["export", "--checkpoint", str(ckpt), "--format", "litert", "--with-nms", "-o", "x.tflite"])
    assert r.returncode != 0 and "cannot hold NMS" in r.stderr and "Traceback" not in r.stderr


def test_bench_builds_detectors_like_classifiers():
    from mnv4.deploy.zoo import build, zoo_entry
    from mnv4.errors import InvalidValue
    from mnv4.models.meta import weights_meta

    assert zoo_entry("ssdlite_mnv4_conv_small").source == "detector"
    model, entry = build("ssdlite_mnv4_conv_small", input_size=64)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    anchors = model.detector.anchors().shape[0]
    assert out.shape == (1, anchors, 91 + 1 + 4) and weights_meta(model).random
    with pytest.raises(InvalidValue, match="detector name"):
        zoo_entry("retinanet_mnv4_conv_smol")


@pytest.mark.slow
def test_openvino_with_nms_matches_eager(tiny_hybrid_spec, tmp_path):
    require("openvino")
    det = _busy(create_detector(tiny_hybrid_spec, num_classes=3, image_size=SIZE, width=32, num_convs=2))
    export_detector(det, "openvino", tmp_path / "nms.xml", with_nms=True, samples=2, verbose=False)
    report = json.loads((tmp_path / "nms.xml.parity.json").read_text())
    assert report["passed"] and report["detections"] > 0 and report["min_iou"] >= 0.99


@pytest.mark.slow
def test_onnx_int8_raw_export_goes_through_the_classifier_route(detector, tmp_path):
    require("onnxruntime")
    from mnv4.deploy.inputs import random_inputs

    export_detector(
        detector, "onnx", tmp_path / "q.onnx", precision="int8", calib_data=random_inputs(8, SIZE, seed=2),
        samples=2, verbose=False,
    )  # fmt: skip
    report = json.loads((tmp_path / "q.onnx.parity.json").read_text())
    assert report["passed"] and report["precision"] == "int8" and report["cosine"] > 0.9


def test_export_checks_the_evaluation_set_before_writing_anything(tiny_hybrid_spec, tmp_path):
    det = create_detector(tiny_hybrid_spec, num_classes=2, image_size=SIZE, width=16, num_convs=1)
    (tmp_path / "photos" / "cat").mkdir(parents=True)  # a classification folder, not a detection set
    with pytest.raises(MNv4Error, match="is not a detection dataset"):
        export_detector(det, "onnx", tmp_path / "d.onnx", eval_data=tmp_path / "photos")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_drawn_images_never_replace_the_images_read(tmp_path):
    from mnv4.detect.predict import check_drawn_paths, drawn_paths

    imgs = [tmp_path / "a.png", tmp_path / "sub" / "a.jpg", tmp_path / "b.jpg"]
    assert [p.name for p in drawn_paths(imgs, tmp_path / "out")] == ["a.png", "a-2.png", "b.png"]
    check_drawn_paths(imgs, tmp_path / "out")  # another folder: fine
    with pytest.raises(MNv4Error, match=r"the drawn a.png would replace the input image .*a.png; choose another"):
        check_drawn_paths(imgs, tmp_path)
