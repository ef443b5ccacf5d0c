"""Per-layer INT8 sensitivity (mnv4.deploy.sensitivity): a layer made fragile on purpose ranks first."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mnv4.deploy import fuse
from mnv4.deploy.sensitivity import analyze, plot_sensitivity, quantizable_layers
from mnv4.errors import MNv4Error

from .outlier_channel import add_outlier_channel
from .test_export import RES, _tiny

FRAGILE = "stages.3.0.layers.2.conv"  # the last UIB's projection, after its expansion (ReLU between)
FEEDER = "stages.3.0.layers.1.conv"


def _with_outlier_channel(model, images, factor: float = 300.0):
    """The fused model with FRAGILE's most active input channel ``factor`` times larger (tests/outlier_channel.py):
    per-tensor INT8 of FRAGILE's input then rounds every other channel to a few levels."""
    fused = fuse(model)
    layers = quantizable_layers(fused)
    add_outlier_channel(fused, layers[FEEDER], layers[FRAGILE], images, factor)
    return fused


@pytest.fixture(scope="module")
def images():
    return torch.randn(24, 3, RES, RES, generator=torch.Generator().manual_seed(1))


def test_outlier_channel_layer_ranks_first(images):
    model = _tiny()
    fragile = _with_outlier_channel(model, images)
    with torch.inference_mode():  # the edit kept the function: an oracle that the test is fair
        torch.testing.assert_close(fragile(images), model(images), rtol=1e-4, atol=1e-3)
    report = analyze(fragile, images)
    assert report.layers[0].name == FRAGILE
    assert report.layers[0].kind == "conv"
    assert report.layers[0].snr_db < report.layers[1].snr_db - 6  # clearly, not by a hair
    # without the outlier the same layer is unremarkable
    plain = {r.name: r.snr_db for r in analyze(model, images).layers}
    assert plain[FRAGILE] > report.layers[0].snr_db + 10
    assert len(report.layers) == len(quantizable_layers(fuse(model)))


def test_accuracy_on_labelled_images_and_files(tmp_path, images):
    model = _tiny()
    labels = model(images).argmax(1).detach().numpy()  # labels the float model gets all right
    report = analyze(model, images[:12], eval_x=images[12:], labels=labels[12:], layers=[FEEDER, "classifier"])
    assert report.accuracy_fp32 == 1.0
    assert {r.name for r in report.layers} == {FEEDER, "classifier"}
    assert all(r.accuracy == r.top1_agreement for r in report.layers)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["layers"][0]["snr_db"] is None or math.isfinite(d["layers"][0]["snr_db"])
    png = plot_sensitivity(report, tmp_path / "s.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_unknown_layer_is_one_clear_error(images):
    with pytest.raises(MNv4Error, match="no conv/linear layer named nope"):
        analyze(_tiny(), images, layers=["nope"])


def test_cli_quantize_analyze_writes_json_and_plot(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from mnv4.cli import main

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            pixels = np.random.default_rng(i + ord(c)).integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / c / f"{i}.png")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(_tiny().spec.to_dict()))
    argv = ["quantize", "analyze", "--spec", str(spec), "--calib", str(tmp_path / "imgs"), "--input-size", "32"]
    assert main([*argv, "--calib-samples", "4", "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    d = json.loads((tmp_path / "out" / "sensitivity.json").read_text())
    assert d["samples"] == 4 and len(d["layers"]) == len(quantizable_layers(fuse(_tiny())))
    assert (tmp_path / "out" / "sensitivity.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out
    assert main([*argv, "--calib-samples", "1", "-o", str(tmp_path / "x")]) == 2  # one image: one clear line
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == ["mnv4: error: --calib-samples 1 is invalid: must be >= 2"]
    assert not (tmp_path / "x").exists()


def _onnx_weight_quantized(path) -> dict[str, bool]:
    """Per Conv/Gemm node: its module path (from torch's namespace metadata) -> weight dequantized?"""
    import onnx

    graph = onnx.load(str(path)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    out = {}
    for n in graph.node:
        if n.op_type in ("Conv", "Gemm"):
            scope = next(p.value for p in n.metadata_props if p.key == "namespace").split("/")[-2].split(":")[0]
            out[scope.removeprefix("model.")] = producer.get(n.input[1]) == "DequantizeLinear"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_export_keeps_the_named_and_most_sensitive_layers_float(tmp_path, images, fmt):
    from .conftest import require

    require("onnxruntime" if fmt == "onnx" else "nncf")
    from mnv4.deploy.export import export

    model = _tiny()
    worst = analyze(model, images).worst(1)[0]
    assert worst != "stages.2.1.query"
    out = tmp_path / ("q.onnx" if fmt == "onnx" else "q.xml")
    kw = dict(precision="int8", calib_data=images, input_size=RES, samples=8, min_top1=0.0, verbose=False)
    r = export(model, fmt, out, keep_float=1, keep_float_layers=("stages.2.1.query",), **kw)
    assert r.report.float_layers == ["stages.2.1.query", worst]
    cost = r.report.keep_float_cost
    assert 0 <= cost["top1_agreement_without"] <= 1 and cost["latency_ms_with"] > 0
    if fmt == "onnx":
        quantized = _onnx_weight_quantized(out)
        assert not quantized[worst] and not quantized["stages.2.1.query"]
        assert quantized[FEEDER if worst != FEEDER else FRAGILE] and quantized["stages.2.1.key"]
    else:  # NNCF puts a FakeQuantize in front of each conv it quantizes: the kept ones lose theirs
        plain = tmp_path / "plain.xml"
        export(model, fmt, plain, **kw)
        # The float ends (stem, head conv, classifier) are float anyway; the classifier is a MatMul, not
        # counted below, so only convs outside the ends count.
        ends = {"stem.conv", "head_conv.conv", "classifier"}
        newly_float = {"stages.2.1.query", worst} - ends
        assert _openvino_quantized_convs(plain) - _openvino_quantized_convs(out) == len(newly_float)


def _openvino_quantized_convs(path) -> int:
    import openvino as ov

    def fed_by_fake_quantize(op) -> bool:
        return any("Fake" in i.get_source_output().get_node().get_type_name() for i in op.inputs())

    ops = ov.Core().read_model(str(path)).get_ordered_ops()
    return sum(fed_by_fake_quantize(op) for op in ops if op.get_type_name() in ("Convolution", "GroupConvolution"))


def test_keep_float_needs_an_int8_route_that_can(tmp_path, images):
    from mnv4.deploy.export import export

    with pytest.raises(MNv4Error, match="keep_float"):
        export(_tiny(), "litert", tmp_path / "q.tflite", precision="int8", calib_data=images, keep_float=1)
    with pytest.raises(MNv4Error, match="no conv/linear layer named nope"):
        export(_tiny(), "onnx", tmp_path / "q.onnx", precision="int8", calib_data=images, input_size=RES,
               keep_float_layers=("nope",), verbose=False)  # fmt: skip
