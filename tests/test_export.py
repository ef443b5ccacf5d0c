"""Export routes: each artefact is run in its runtime and checked against eager PyTorch, with a report."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import mnv4
from mnv4.deploy.export import export
from mnv4.deploy.parity import ParityError, parity_path
from mnv4.errors import MNv4Error
from mnv4.models.specs import ModelSpec, cn, fib, mqa, uib

RES = 64


def _tiny() -> torch.nn.Module:
    spec = ModelSpec(
        name="tiny_export",
        stem=cn(3, 2, 8),
        stages=(
            (fib(3, 2, 16),),
            (uib(3, 5, 2, 16, 2.0),),
            (uib(3, 3, 2, 24, 2.0), mqa(2, 8, kv_stride=2)),
            (uib(5, 0, 2, 32, 2.0), mqa(2, 8)),
        ),
        layer_scale_init=0.5,
        num_features=48,
        head_hidden_size=64,
    )
    model = mnv4.create_model(spec, num_classes=6)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.classifier.weight.mul_(30)  # logits of O(1), so top-1 is not decided by rounding noise
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A labelled ImageFolder of smooth random images (3 classes x 12)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class{c}").mkdir()
        for i in range(12):
            base = rng.random((6, 8, 3)) * 255
            img = Image.fromarray(base.astype(np.uint8)).resize((72, 80), Image.BILINEAR)
            img.save(root / f"class{c}" / f"{i}.png")
    return root


def _check_report(path, fmt, precision):
    report = json.loads(parity_path(path).read_text())
    assert report["format"] == fmt and report["precision"] == precision
    assert report["passed"] is True and report["failures"] == []
    assert report["samples"] > 0 and report["input_shape"] == [3, RES, RES]
    return report


@pytest.mark.parametrize("fmt,suffix", [("pt2", ".pt2"), ("torchscript", ".pt")])
def test_torch_native_exports(tiny, tmp_path, fmt, suffix):
    out = tmp_path / f"m{suffix}"
    result = export(tiny, fmt, out, resolution=RES, samples=4, verbose=False)
    assert result.path == out and out.is_file()
    report = _check_report(out, fmt, "fp32")
    assert report["max_rel_diff"] < 1e-5 and report["top1_agreement"] == 1.0
    assert report["dynamic_batch"] is True and report["batch_sizes"] == [1, 4]


def test_onnx_fp32_dynamic_batch(tiny, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    export(tiny, "onnx", out, resolution=RES, samples=4, verbose=False)
    report = _check_report(out, "onnx", "fp32")
    assert report["max_abs_diff"] < 1e-4
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 3, RES, RES)).astype(np.float32)
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        ref = tiny(torch.from_numpy(x)).numpy()
    assert y.shape == (3, 6) and np.abs(y - ref).max() < 1e-4


def test_failed_parity_is_an_error(tiny, tmp_path, monkeypatch):
    import mnv4.deploy.export as export_mod

    real = export_mod.load_runner

    def broken(*args, **kwargs):
        run = real(*args, **kwargs)
        return lambda x: run(x) + 0.05  # a runtime that is subtly wrong

    monkeypatch.setattr(export_mod, "load_runner", broken)
    out = tmp_path / "bad.pt2"
    with pytest.raises(ParityError, match="failed its parity check"):
        export(tiny, "pt2", out, resolution=RES, samples=4, verbose=False)
    report = json.loads(parity_path(out).read_text())
    assert report["passed"] is False and report["failures"]


def test_onnx_int8_with_calibration_and_labels(tiny, tmp_path, image_folder):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "q.onnx"
    result = export(
        tiny,
        "onnx",
        out,
        resolution=RES,
        precision="int8",
        calib_dir=image_folder,
        eval_dir=image_folder,
        samples=12,
        calib_samples=16,
        verbose=False,
    )
    report = _check_report(out, "onnx", "int8")
    assert 0.0 <= report["top1_agreement"] <= 1.0 and report["cosine"] > 0.95
    assert report["accuracy_reference"] is not None and report["accuracy_delta"] is not None
    assert "QuantizeLinear" in out.read_bytes().decode("latin-1")
    assert result.report.max_abs_diff > 0  # really quantized, not a copy of the fp32 graph
    assert any("stem conv and head" in n for n in report["notes"])


def _weight_dequantized(path, node_type: str) -> list[bool]:
    """Per ``node_type`` node in graph order: is its weight input produced by a DequantizeLinear?"""
    import onnx

    graph = onnx.load(str(path)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    return [producer.get(n.input[1]) == "DequantizeLinear" for n in graph.node if n.op_type == node_type]


def test_onnx_int8_keeps_stem_and_head_float_unless_asked(tiny, tmp_path, image_folder):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    kw = dict(resolution=RES, precision="int8", calib_dir=image_folder, samples=4, calib_samples=8, verbose=False)
    export(tiny, "onnx", tmp_path / "ends.onnx", **kw)
    convs = _weight_dequantized(tmp_path / "ends.onnx", "Conv")
    # stem and the post-pool head conv float, every conv between them int8; classifier float
    assert not convs[0] and not convs[-1] and all(convs[1:-1])
    assert _weight_dequantized(tmp_path / "ends.onnx", "Gemm") == [False]
    export(tiny, "onnx", tmp_path / "all.onnx", int8_all_layers=True, **kw)
    assert all(_weight_dequantized(tmp_path / "all.onnx", "Conv"))
    assert _weight_dequantized(tmp_path / "all.onnx", "Gemm") == [True]


def test_float_end_ops_picks_stem_and_post_pool_compute():
    from mnv4.deploy.quantize import float_end_ops

    ops = [("in", "Parameter"), ("c0", "Conv"), ("r", "Relu"), ("c1", "Conv"), ("mm", "MatMul")]
    ops += [("gap", "ReduceMean"), ("head", "Conv"), ("fc", "Gemm"), ("out", "Result")]
    assert float_end_ops(ops) == ["c0", "head", "fc"]
    # no pooling: only the stem; no compute at all: nothing
    assert float_end_ops(ops[:5]) == ["c0"]
    assert float_end_ops([("a", "Relu")]) == []
    # OpenVINO op types
    assert float_end_ops([("s", "Convolution"), ("d", "GroupConvolution"), ("p", "AvgPool"), ("l", "MatMul")]) == [
        "s",
        "l",
    ]


def test_argument_errors(tiny, tmp_path, monkeypatch):
    with pytest.raises(MNv4Error, match="calibration images"):
        export(tiny, "onnx", tmp_path / "a.onnx", resolution=RES, precision="int8")
    with pytest.raises(MNv4Error, match="no INT8 route"):
        export(tiny, "torchscript", tmp_path / "a.pt", resolution=RES, precision="int8", calib_dir=tmp_path)
    with pytest.raises(MNv4Error, match="must end in .onnx"):
        export(tiny, "onnx", tmp_path / "a.tflite", resolution=RES)
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(MNv4Error, match=r"pip install 'mnv4\[openvino\]'"):
        export(tiny, "openvino", tmp_path / "a.xml", resolution=RES)


@pytest.mark.slow
def test_cli_export_torchscript(tmp_path, capsys):
    from mnv4.cli import main

    out = tmp_path / "cs.pt"
    assert main(["export", "mnv4_conv_small", "--format", "torchscript", "--res", "64", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "parity torchscript/fp32" in text and "PASS" in text
    assert parity_path(out).is_file()


@pytest.mark.slow
def test_openvino_fp32_and_int8(tiny, tmp_path, image_folder):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    export(tiny, "openvino", tmp_path / "m.xml", resolution=RES, samples=4, verbose=False)
    assert (tmp_path / "m.bin").is_file()
    assert _check_report(tmp_path / "m.xml", "openvino", "fp32")["max_rel_diff"] < 1e-5
    export(
        tiny, "openvino", tmp_path / "q.xml", resolution=RES, precision="int8", calib_dir=image_folder, verbose=False
    )
    assert _check_report(tmp_path / "q.xml", "openvino", "int8")["cosine"] > 0.95


@pytest.mark.slow
def test_executorch_fp32_and_int8(tiny, tmp_path, image_folder):
    pytest.importorskip("executorch.runtime")
    pytest.importorskip("torchao")
    export(tiny, "executorch", tmp_path / "m.pte", resolution=RES, samples=4, verbose=False)
    assert _check_report(tmp_path / "m.pte", "executorch", "fp32")["max_rel_diff"] < 1e-5
    export(
        tiny, "executorch", tmp_path / "q.pte", resolution=RES, precision="int8", calib_dir=image_folder, verbose=False
    )
    assert _check_report(tmp_path / "q.pte", "executorch", "int8")["cosine"] > 0.95


@pytest.mark.slow
def test_litert_fp32_and_int8(tiny, tmp_path, image_folder):
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    export(tiny, "litert", tmp_path / "m.tflite", resolution=RES, samples=4, verbose=False)
    assert _check_report(tmp_path / "m.tflite", "litert", "fp32")["max_rel_diff"] < 1e-5
    export(
        tiny, "litert", tmp_path / "q.tflite", resolution=RES, precision="int8", calib_dir=image_folder, verbose=False
    )
    assert _check_report(tmp_path / "q.tflite", "litert", "int8")["cosine"] > 0.95


@pytest.mark.slow
def test_coreml_conversion_structure(tiny, tmp_path):
    pytest.importorskip("coremltools")
    out = tmp_path / "m.mlpackage"
    export(tiny, "coreml", out, resolution=RES, precision="fp16", verbose=False)
    report = _check_report(out, "coreml", "fp16")
    assert report["structure"]["inputs"] == [[1, 3, RES, RES]] and report["structure"]["outputs"] == [[1, 6]]
    ops = report["structure"]["ops"]
    assert ops.get("matmul", 0) == 4 and ops.get("softmax", 0) == 2  # two attention blocks, transpose-free
