"""Mobile-ready inputs (docs/deploy.md, "Mobile-ready inputs"): artefacts that take NHWC and/or uint8
pixels with the normalisation in the graph, fixed or dynamic batch. The oracle is the float model
given the pixels normalised by torchvision's own ``Normalize``, and each artefact runs through its
runtime's own API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchvision.transforms import v2 as T

from mnv4.deploy.export import export
from mnv4.deploy.formats import FORMATS, get_format
from mnv4.deploy.parity import parity_path
from mnv4.errors import InvalidValue, MNv4Error
from mnv4.models.meta import weights_meta

from .conftest import require
from .test_export import RES, _tiny

# the routes whose runtimes take uint8 arrays straight from numpy in a few lines of their own API
_NATIVE = ("onnx", "openvino", "pt2")


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _pixels(n: int = 4, seed: int = 3) -> np.ndarray:
    """Camera-like frames: uint8 NHWC."""
    return np.random.default_rng(seed).integers(0, 256, (n, RES, RES, 3), dtype=np.uint8)


def _oracle(model, pixels: np.ndarray) -> np.ndarray:
    """The float model given the pixels as its eval transform would make them."""
    pp = weights_meta(model).preprocess
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        return model(T.Normalize(pp.mean, pp.std)(x)).numpy()


def _run_native(fmt: str, path, x: np.ndarray) -> np.ndarray:
    if fmt == "onnx":
        ort = require("onnxruntime")
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x})[0]
    if fmt == "openvino":
        ov = require("openvino")
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return np.asarray(compiled([x])[compiled.output(0)])
    if fmt == "pt2":
        with torch.inference_mode():
            return torch.export.load(str(path)).module()(torch.from_numpy(x)).numpy()
    raise AssertionError(fmt)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.mark.parametrize("fmt", _NATIVE)
def test_nhwc_uint8_artefact_matches_float_model_given_raw_pixels(tiny, tmp_path, fmt):
    for m in get_format(fmt).packages:
        require(m)
    out = tmp_path / f"m{get_format(fmt).suffix}"
    r = export(tiny, fmt, out, input_size=RES, input_layout="nhwc", input_dtype="uint8", samples=4, verbose=False)
    assert r.report.passed and r.report.input_shape == [RES, RES, 3]
    pixels = _pixels(5)  # a batch size the check did not use: the batch stays dynamic
    got = _run_native(fmt, out, pixels)
    assert _rel(_oracle(tiny, pixels), got) < 1e-4
    report = json.loads(parity_path(out).read_text())
    assert report["input_format"].startswith("NHWC uint8")


def test_onnx_input_is_uint8_nhwc_and_fixed_batch_when_asked(tiny, tmp_path):
    onnx = require("onnx")
    out = tmp_path / "fixed.onnx"
    export(tiny, "onnx", out, input_size=RES, input_layout="nhwc", input_dtype="uint8", batch="3", verbose=False)
    inp = onnx.load(str(out)).graph.input[0].type.tensor_type
    assert inp.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in inp.shape.dim] == [3, RES, RES, 3]
    pixels = _pixels(3, seed=9)
    assert _rel(_oracle(tiny, pixels), _run_native("onnx", out, pixels)) < 1e-4


def test_nchw_float_nhwc_only_transposes(tiny, tmp_path):
    out = tmp_path / "nhwc.pt2"
    export(tiny, "pt2", out, input_size=RES, input_layout="nhwc", verbose=False)
    x = np.random.default_rng(0).standard_normal((2, 3, RES, RES)).astype(np.float32)
    with torch.inference_mode():
        ref = tiny(torch.from_numpy(x)).numpy()
    got = _run_native("pt2", out, np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    assert _rel(ref, got) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["litert", "executorch"])
def test_fixed_batch_mobile_routes_take_uint8_nhwc(tiny, tmp_path, fmt):
    """The fixed-batch routes, through mnv4's runners (their own APIs are exercised in test_export)."""
    for m in get_format(fmt).packages:
        require(m)
    from mnv4.deploy.formats import load_runner

    out = tmp_path / f"m{get_format(fmt).suffix}"
    kw = dict(input_layout="nhwc", input_dtype="uint8", batch="2", samples=3)
    r = export(tiny, fmt, out, input_size=RES, verbose=False, **kw)
    assert r.report.passed and r.report.batch_sizes == [2]
    pixels = _pixels(2, seed=5)
    assert _rel(_oracle(tiny, pixels), load_runner(out)(pixels)) < 1e-4


@pytest.mark.slow
def test_int8_onnx_takes_uint8_pixels(tmp_path):
    """INT8 calibrates on raw pixels too: the quantized graph given pixels agrees with the float model."""
    from .test_export import DIGITS, _labelled_images  # noqa: F401  (the digits fixture's helpers)

    require("onnxruntime")

    from mnv4.data.datasets import DataBundle
    from mnv4.data.digits import digits_split
    from mnv4.train import resolve_config, train

    tr, va = digits_split(0.2, seed=0, size=16)
    for i in range(200):
        image, label = tr[i]
        (tmp_path / "calib" / str(label)).mkdir(parents=True, exist_ok=True)
        image.save(tmp_path / "calib" / str(label) / f"{i}.png")
    cfg = resolve_config("quick", model=DIGITS.to_dict(), epochs=3, batch_size=64, lr=4e-3, output=str(tmp_path / "r"))
    result = train(cfg, data=DataBundle("digits", tr, va, list(tr.classes), 16), progress=False)
    import mnv4

    model = mnv4.create_model(checkpoint=result.summary["best_checkpoint"]).eval()
    out = tmp_path / "q.onnx"
    r = export(model, "onnx", out, precision="int8", calib_dir=tmp_path / "calib", calib_samples=64, samples=32,
               input_layout="nhwc", input_dtype="uint8", min_top1=0.9, verbose=False)  # fmt: skip
    assert r.report.passed and r.report.top1_agreement >= 0.9


@pytest.mark.parametrize(
    "fmt, kwargs, error, message",
    [
        ("coreml", {"input_dtype": "uint8"}, MNv4Error, "cannot take uint8"),
        ("litert", {"batch": "dynamic"}, MNv4Error, "fixed batch"),
        ("torchscript", {"batch": "2"}, MNv4Error, "any batch"),
        ("onnx", {"batch": "0"}, InvalidValue, "batch"),
        ("onnx", {"batch": "two"}, InvalidValue, "batch"),
        ("onnx", {"input_layout": "chwn"}, InvalidValue, "input_layout"),
    ],
)
def test_bad_input_requests_fail_before_any_work(tiny, tmp_path, fmt, kwargs, error, message):
    with pytest.raises(error, match=message):
        export(tiny, fmt, tmp_path / f"x{get_format(fmt).suffix}", input_size=RES, verbose=False, **kwargs)
    assert not list(tmp_path.iterdir())


def test_every_format_says_what_inputs_it_holds():
    assert {f.name for f in FORMATS.values() if not f.uint8_input} == {"coreml"}
    assert {f.name for f in FORMATS.values() if not f.fixed_batch} == {"torchscript"}


def test_cli_flags_come_from_the_request(capsys):
    """The export flags parse into the request's own fields, so the CLI and the API cannot drift apart."""
    from mnv4.cli import args as A
    from mnv4.cli import build_parser, main
    from mnv4.deploy.requests import ExportRequest

    assert main(["export", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--input-layout", "--input-dtype", "--batch"):
        assert flag in text
    argv = ["export", "-m", "x", "--format", "onnx", "--input-layout", "nhwc", "--input-dtype", "uint8", "--batch", "3"]
    request = A.request_from_args(ExportRequest, build_parser().parse_args(argv))
    assert request == ExportRequest("onnx", input_layout="nhwc", input_dtype="uint8", batch="3")
    default = A.request_from_args(ExportRequest, build_parser().parse_args(["export", "-m", "x", "--format", "onnx"]))
    assert default == ExportRequest("onnx")
