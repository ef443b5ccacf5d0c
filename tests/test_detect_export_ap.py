"""AP before and after export (mnv4.detect.export.compare_ap, mnv4.detect.evaluate.evaluate_artefact): the
artefact's outputs decoded by the detector's own code score what the eager detector scores; INT8 reports both."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnv4.cli import main
from mnv4.detect import create_detector, save_detector
from mnv4.detect.data import load_detection_data
from mnv4.detect.evaluate import evaluate_artefact, evaluate_detector, letterboxed_images, predict_records
from mnv4.detect.export import export_detector
from mnv4.detect.formats import DetRecord, write_yolo_txt
from mnv4.detect.transforms import FILL

from .conftest import require

require("faster_coco_eval")
SIZE = 64
CLASSES = ["a", "b", "c"]


def _last_convs(sub: torch.nn.Module, name: str) -> list[torch.nn.Conv2d]:
    """The predictor convs of a RetinaNet (``name``: a Sequential) or SSDLite (``module_list``) head part."""
    return [getattr(sub, name)[-1]] if hasattr(sub, name) else [m[-1] for m in sub.module_list]


def _detector(tiny_hybrid_spec, head: str = "retinanet", spread: float = 2.0, bias: float = -3.0):
    """Random weights that see their input: BatchNorm statistics estimated on noise (default ones leave the
    features almost constant, so every image would get the same boxes and scores, whose ties float noise
    reorders); class logits of mean ``bias`` (RetinaNet's sigmoid: under the 100 detections kept) and standard
    deviation ``spread`` (neither tied nor saturated); box deltas small, so boxes stay inside the image."""
    from mnv4.detect.export import RawNetwork
    from mnv4.models.batchnorm import noise_batches, recalibrate_batchnorm

    torch.manual_seed(0)
    kw = dict(width=32, num_convs=2) if head == "retinanet" else dict(extra_widths=[32, 16])
    det = create_detector(tiny_hybrid_spec, head=head, classes=CLASSES, image_size=SIZE, **kw)
    for conv in det.model.head.modules():
        if isinstance(conv, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(conv.weight)
    recalibrate_batchnorm(RawNetwork(det), noise_batches(SIZE, 2, 8, seed=1))
    det.eval()
    heads = det.model.head
    with torch.no_grad():
        outputs = det.network(torch.randn(4, 3, SIZE, SIZE))
        parts = (_last_convs(heads.classification_head, "cls_logits"), _last_convs(heads.regression_head, "bbox_reg"))
        for convs, out, (mean, std) in zip(parts, outputs, ((bias, spread), (0.0, 0.1))):
            gain = std / float(out.std())
            for conv in convs:  # outputs -> about N(mean, std)
                conv.bias.copy_(mean - gain * (float(out.mean()) - conv.bias))
                conv.weight.mul_(gain)
    return det


def _own_boxes_set(root: Path, detector, n: int = 6, keep_above: float = 0.5) -> Path:
    """A YOLO set of noise images (square: boxes in a letterbox's padding would be clipped away from the ground
    truth but not from the detections) of three sizes, whose ground truth is two in three
    of the eager detector's confident boxes: its AP is neither 0 nor 1, and only the same boxes, scores and
    classes score the same AP."""
    rng = np.random.default_rng(0)
    images = root / "valid" / "images"
    images.mkdir(parents=True)
    for i in range(n):
        h = w = SIZE + 16 * (i % 3 - 1)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{i}.png")
    records = [DetRecord(str(p), 0, 0, np.zeros((0, 4)), np.zeros(0)) for p in sorted(images.iterdir())]
    for r, p in zip(records, predict_records(detector, records, SIZE)):
        keep = (p["scores"] >= keep_above).nonzero().flatten()
        keep = keep[keep % 3 != 1]
        w, h = Image.open(r.path).size
        rec = DetRecord(r.path, w, h, p["boxes"][keep].numpy(), p["labels"][keep].numpy())
        write_yolo_txt(root / "valid" / "labels" / f"{Path(r.path).stem}.txt", rec)
    (root / "data.yaml").write_text(f"val: valid/images\nnames: {CLASSES}\n")
    return root


@pytest.mark.parametrize("head", ["retinanet", "ssdlite"])
def test_fp32_onnx_artefact_scores_the_eager_ap(tiny_hybrid_spec, tmp_path, head, capsys):
    require("onnxruntime")
    det = _detector(tiny_hybrid_spec, head)
    data = _own_boxes_set(tmp_path / "data", det)
    records = load_detection_data(data, CLASSES, warn=False).split("val")
    eager, _ = evaluate_detector(det, records, CLASSES, SIZE)  # the oracle: the eager detector's own path
    assert 0.05 < eager.AP < 0.95 and eager.num_boxes > 5, eager.as_dict()

    path = export_detector(det, "onnx", tmp_path / "d.onnx", samples=2, eval_data=data)
    stored = json.loads((tmp_path / "d.onnx.parity.json").read_text())
    ap = stored["detection_ap"]
    assert stored["passed"] and ap["split"] == "val" and ap["images"] == 6
    assert ap["before"]["AP"] == pytest.approx(eager.AP, abs=1e-9)
    assert ap["after"]["AP"] == pytest.approx(eager.AP, abs=1e-6)
    assert ap["after"]["AP50"] == pytest.approx(eager.AP50, abs=1e-6)
    assert f"AP {eager.AP:.3f} -> {eager.AP:.3f}" in capsys.readouterr().out
    # one output, as the sidecar says: class logits (SSDLite: with its background column) and box deltas joined
    import onnxruntime as ort

    side = json.loads((tmp_path / "d.onnx.detector.json").read_text())
    columns = len(CLASSES) + (head == "ssdlite") + 4
    assert side["artefact_outputs"] == [{"part": "class logits + box deltas", "columns": columns}]
    shapes = [o.shape[1:] for o in ort.InferenceSession(str(path)).get_outputs()]
    assert shapes == [[len(side["anchors"]), columns]]
    # on its own, the artefact is decoded by a detector rebuilt from its sidecar (no weights needed)
    alone = evaluate_artefact(path, data, "val")
    assert alone.AP == pytest.approx(eager.AP, abs=1e-6) and alone.per_class_AP == pytest.approx(eager.per_class_AP)


@pytest.mark.slow
def test_int8_onnx_reports_ap_before_and_after(tiny_hybrid_spec, tmp_path, capsys):
    require("onnxruntime")
    det = _detector(tiny_hybrid_spec)
    data = _own_boxes_set(tmp_path / "data", det, n=8)
    export_detector(
        det, "onnx", tmp_path / "q.onnx", precision="int8", calib_dir=data / "valid" / "images", calib_samples=6,
        samples=2, eval_data=data,
    )  # fmt: skip
    stored = json.loads((tmp_path / "q.onnx.parity.json").read_text())
    ap = stored["detection_ap"]
    assert stored["precision"] == "int8" and "2 given images" in stored["inputs"]  # the 2 held out of 8
    assert 0.05 < ap["before"]["AP"] < 0.95 and 0.0 <= ap["after"]["AP"] <= 1.0
    assert ap["delta_AP"] == pytest.approx(ap["after"]["AP"] - ap["before"]["AP"])
    side = json.loads((tmp_path / "q.onnx.detector.json").read_text())
    assert side["precision"] == "int8" and side["batch"] is None
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("AP on")]
    assert len(line) == 1 and f"AP {ap['before']['AP']:.3f} -> {ap['after']['AP']:.3f}" in line[0]


def test_calibration_images_are_letterboxed_like_evaluation(tiny_hybrid_spec, tmp_path):
    """A 128 x 64 white image at 64 px: 16 rows of grey padding above and below, white between, normalised."""
    det = create_detector(tiny_hybrid_spec, classes=CLASSES, image_size=SIZE, width=16, num_convs=1)
    Image.new("RGB", (128, 64), (255, 255, 255)).save(tmp_path / "wide.png")
    x = letterboxed_images(det, tmp_path, limit=4)
    mean = torch.tensor(det.config["preprocess"]["mean"]).view(3, 1)
    std = torch.tensor(det.config["preprocess"]["std"]).view(3, 1)
    assert x.shape == (1, 3, SIZE, SIZE)
    torch.testing.assert_close(x[0, :, 0, :], ((FILL / 255 - mean) / std).expand(3, SIZE))
    torch.testing.assert_close(x[0, :, SIZE // 2, :], ((1.0 - mean) / std).expand(3, SIZE))
    torch.testing.assert_close(x[0, :, 15, :], x[0, :, 0, :])
    torch.testing.assert_close(x[0, :, 48, :], x[0, :, 0, :])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--checkpoint", "{det}", "--eval", "{tmp}/nowhere"], "detection evaluation set not found"),
        (["--checkpoint", "{det}", "--eval", "digits", "--with-nms"], "drop --with-nms"),
        (["-m", "mnv4_conv_small", "--eval-data", "{data}"], "is a YOLO detection dataset"),
    ],
)
def test_bad_ap_requests_are_one_line(tiny_hybrid_spec, tmp_path, capsys, argv, match):
    det = create_detector(tiny_hybrid_spec, classes=CLASSES, image_size=SIZE, width=16, num_convs=1)
    ckpt = save_detector(det, tmp_path / "det.safetensors")
    data = tmp_path / "set"
    (data / "valid" / "images").mkdir(parents=True)
    (data / "data.yaml").write_text(f"val: valid/images\nnames: {CLASSES}\n")
    argv = [a.format(det=ckpt, tmp=tmp_path, data=data) for a in argv]
    code = main(["export", "--format", "onnx", "-o", str(tmp_path / "x.onnx"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("mnv4") and match in err[-1], err
    assert not any("Traceback" in line for line in err) and not (tmp_path / "x.onnx").exists()


def test_output_tail_nodes_are_the_ops_after_the_last_compute():
    """x -> c1 -> relu -> {c2 -> reshape, c3} -> concat: the tail is c2, c3, reshape and concat."""
    onnx = require("onnx")
    from onnx import helper

    from mnv4.deploy.quantize import output_tail_nodes

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Conv", ["b", "w2"], ["c"], name="c2"),
        helper.make_node("Reshape", ["c", "shape"], ["d"], name="reshape"),
        helper.make_node("Conv", ["b", "w3"], ["e"], name="c3"),
        helper.make_node("Concat", ["d", "e"], ["y"], name="concat", axis=1),
    ]
    graph = helper.make_graph(nodes, "g", [], [])
    assert output_tail_nodes(graph) == ["c2", "reshape", "c3", "concat"]
    assert output_tail_nodes(helper.make_graph(nodes[:2], "g", [], [])) == ["c1", "relu"]
    assert onnx is not None


@pytest.mark.slow
def test_int8_onnx_detector_output_stays_float(tiny_hybrid_spec, tmp_path):
    """ORT's QDQ would give the joined class logits and box deltas one uint8 scale; the float ends keep the
    output assembly float, so no QuantizeLinear lies between the last conv and the output."""
    onnx = require("onnx")
    require("onnxruntime")
    det = _detector(tiny_hybrid_spec)
    path = export_detector(
        det, "onnx", tmp_path / "q.onnx", precision="int8", calib_data=torch.randn(4, 3, SIZE, SIZE), samples=2,
        verbose=False,
    )  # fmt: skip
    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    seen, todo = [], [graph.output[0].name]
    while todo:  # walk back from the output to the convs
        node = producer.get(todo.pop())
        if node is None:
            continue
        seen.append(node.op_type)
        if node.op_type != "Conv":
            todo += list(node.input)
    assert "Conv" in seen and "QuantizeLinear" not in seen and "DequantizeLinear" not in seen, seen
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # the rest is INT8


@pytest.mark.slow
def test_cli_detector_int8_takes_the_ptq_flags(tiny_hybrid_spec, tmp_path):
    """`mnv4 export` of a detector hands every request field (here a PTQ setting) to the raw network's export."""
    require("onnxruntime")
    det = _detector(tiny_hybrid_spec)
    ckpt = save_detector(det, tmp_path / "det.safetensors")
    data = _own_boxes_set(tmp_path / "data", det)
    out = tmp_path / "q.onnx"
    calib = str(data / "valid" / "images")
    argv = ["export", "--checkpoint", str(ckpt), "--format", "onnx", "--int8", "--calib", calib]
    code = main([*argv, "--weight-granularity", "per-tensor", "--samples", "2", "-o", str(out), "--eval", str(data)])
    report = json.loads((tmp_path / "q.onnx.parity.json").read_text())
    assert code == 0 and report["ptq"] == {"weight_granularity": "per-tensor"}
    assert report["detection_ap"]["images"] == 6


@pytest.mark.slow
def test_an_artefact_failing_its_check_still_reports_its_ap(tiny_hybrid_spec, tmp_path, monkeypatch, capsys):
    """An impossible bar fails the parity check: the AP line is printed and stored before the error."""
    require("onnxruntime")
    from mnv4.deploy.parity import CRITERIA, Criteria, ParityError

    monkeypatch.setitem(CRITERIA, "fp32", Criteria(max_rel=None, min_cosine=2.0, min_top1=None))
    det = _detector(tiny_hybrid_spec)
    data = _own_boxes_set(tmp_path / "data", det)
    with pytest.raises(ParityError, match="cosine"):
        export_detector(det, "onnx", f"{tmp_path / 'out'}/", samples=2, eval_data=data)
    artefact = tmp_path / "out" / f"retinanet_{tiny_hybrid_spec.name}_{SIZE}_fp32.onnx"  # a folder: default name
    stored = json.loads(artefact.with_name(artefact.name + ".parity.json").read_text())
    assert not stored["passed"] and stored["detection_ap"]["after"]["AP"] > 0.05
    assert "AP on data val" in capsys.readouterr().out


def _conv_spec():
    """A small conv-only MNv4 (no attention, no layer scale): random weights INT8 quantizes as trained ones do."""
    from mnv4.models.specs import ModelSpec, cn, fib, uib

    stages = ((fib(3, 2, 16),), (uib(3, 5, 2, 16, 2.0), uib(0, 3, 1, 16, 2.0)), (uib(3, 3, 2, 24, 2.0),))
    stages += ((uib(5, 0, 2, 32, 2.0),),)
    return ModelSpec(name="tiny_conv", stem=cn(3, 2, 8), stages=stages, num_features=64, head_hidden_size=96)


def _artefact_output_shapes(path: Path, fmt: str) -> list[list[int]]:
    if fmt == "litert":
        from ai_edge_litert.interpreter import Interpreter

        return [list(d["shape"]) for d in Interpreter(model_path=str(path)).get_output_details()]
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")
    return [list(y.shape) for y in method.execute([torch.zeros(1, 3, SIZE, SIZE)])]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["litert", "executorch"])
def test_int8_mobile_detector_keeps_parity_and_ap(tmp_path, fmt):
    """pt2e INT8 gives class logits and box deltas their own scales (two outputs) and quantizes the head at every
    pyramid level: the artefact passes the INT8 cosine bar and keeps the eager AP (one shared scale: cosine 0.85,
    AP -0.03 on this detector). The outputs are those the sidecar describes; the runner joins them."""
    require("torchao")
    require("litert_torch" if fmt == "litert" else "executorch")
    det = _detector(_conv_spec())
    data = _own_boxes_set(tmp_path / "data", det, n=8)
    path = export_detector(
        det, fmt, tmp_path / f"q{'.tflite' if fmt == 'litert' else '.pte'}", precision="int8",
        calib_dir=data / "valid" / "images", calib_samples=6, samples=2, eval_data=data, verbose=False,
    )  # fmt: skip
    stored = json.loads(path.with_name(path.name + ".parity.json").read_text())
    ap = stored["detection_ap"]
    assert stored["passed"] and stored["cosine"] >= 0.95, stored["failures"]
    assert 0.05 < ap["before"]["AP"] < 0.95 and abs(ap["delta_AP"]) <= 0.02, ap
    side = json.loads(path.with_name(path.name + ".detector.json").read_text())
    anchors, columns = len(side["anchors"]), len(CLASSES)
    assert side["artefact_outputs"] == [
        {"part": "class logits", "columns": columns},
        {"part": "box deltas", "columns": 4},
    ]
    assert _artefact_output_shapes(path, fmt) == [[1, anchors, o["columns"]] for o in side["artefact_outputs"]]
    assert side["output"] == f"[B, A, {columns} class logits + 4 box deltas]"
