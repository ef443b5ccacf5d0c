"""Export routes, judged by the tests themselves: every artefact is run in its own runtime through that
runtime's own API (not mnv4's runners) and compared with eager PyTorch here; INT8 is judged on real
labelled digit images with a model that learned them; Core ML (no predictions off macOS) through
the program coremltools reads back from the saved package."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import mnv4
from mnv4.deploy import fuse
from mnv4.deploy.export import export
from mnv4.deploy.formats import FORMATS, format_of, get_format
from mnv4.deploy.parity import ParityError, parity_path
from mnv4.errors import InvalidValue, MNv4Error
from mnv4.models.specs import ModelSpec, cn, fib, mqa, uib

from .conftest import randomize_, require

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
    with torch.random.fork_rng():  # the same weights whatever ran before (INT8 bars are near some seeds' cosines)
        torch.manual_seed(0)
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


@pytest.fixture
def no_flush():
    """Denormals on in this thread for the test, and back off afterwards (loaders turn flushing on)."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)


# --- each runtime through its own API ---------------------------------------------------------------


def run_native(fmt: str, path, x: np.ndarray, precision: str = "fp32") -> np.ndarray:
    """Run artefact ``path`` on ``x`` [N, C, H, W] with the runtime's own Python API (batch N where the
    format's batch is dynamic, one sample at a time otherwise)."""
    if fmt == "onnx":
        ort = require("onnxruntime")
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        dtype = np.float16 if "float16" in inp.type else np.float32
        return sess.run(None, {inp.name: x.astype(dtype)})[0].astype(np.float32)
    if fmt == "openvino":
        ov = require("openvino")
        core = ov.Core()
        model = core.read_model(str(path))
        model.reshape({model.input(0): ov.PartialShape(list(x.shape))})
        hint = "f16" if precision == "fp16" else "f32"  # the CPU plugin would pick bf16 where it can
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        return np.asarray(compiled([x])[compiled.output(0)], dtype=np.float32)
    if fmt == "litert":
        interpreter = require("ai_edge_litert.interpreter")
        interp = interpreter.Interpreter(model_path=str(path))
        interp.allocate_tensors()
        inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
        rows = []
        for xi in x:
            v = xi[None]
            if inp["dtype"] == np.int8:  # fully INT8 models take quantized input
                scale, zero = inp["quantization"]
                v = np.clip(np.round(v / scale + zero), -128, 127).astype(np.int8)
            interp.set_tensor(inp["index"], v)
            interp.invoke()
            y = interp.get_tensor(out["index"])
            if out["dtype"] == np.int8:
                scale, zero = out["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            rows.append(y.astype(np.float32))
        return np.concatenate(rows)
    if fmt == "executorch":
        runtime = require("executorch.runtime")
        method = runtime.Runtime.get().load_program(str(path)).load_method("forward")
        rows = [method.execute([torch.from_numpy(np.ascontiguousarray(xi[None]))])[0].float().numpy() for xi in x]
        return np.concatenate(rows)
    if fmt in ("torchscript", "pt2"):
        module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
        dtype = torch.float16 if precision == "fp16" else torch.float32
        with torch.inference_mode():
            return module(torch.from_numpy(x).to(dtype)).float().numpy()
    raise AssertionError(f"no native runner for {fmt}")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def _eager(model, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def _fresh_inputs(n: int = 3, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, RES, RES)).astype(np.float32)


def _needs(fmt: str, precision: str = "fp32") -> None:
    info = get_format(fmt)
    for module in info.packages + (info.int8_packages if precision == "int8" else ()):
        require(module)


# --- the format table -------------------------------------------------------------------------------


def test_format_records_are_consistent():
    suffixes = [s for f in FORMATS.values() for s in (f.suffix, *f.other_suffixes)]
    assert len(suffixes) == len(set(suffixes))
    assert len({f.runtime for f in FORMATS.values()}) == len(FORMATS)
    for name, f in FORMATS.items():
        assert f.name == name and callable(f.writer) and callable(f.loader)
        assert format_of(f"dir/model{f.suffix.upper()}") is f
        assert f.precisions[0] == "fp32" and set(f.precisions) <= {"fp32", "fp16", "bf16", "int8"}
        assert f.float_ends <= bool(f.int8)  # float ends only exist for an INT8 route
        assert f.denormals
    assert get_format("onnx").precisions == ("fp32", "fp16", "int8")
    assert not get_format("coreml").can_run() or sys.platform == "darwin"
    with pytest.raises(InvalidValue, match="`format` 'tflite' is invalid: choose one of onnx, openvino"):
        get_format("tflite")
    with pytest.raises(MNv4Error, match="cannot tell the format of m.bin"):
        format_of("m.bin")


# --- fp32 / fp16: native runtime vs eager -----------------------------------------------------------

FAST_FP32 = ["torchscript"]
SLOW_FP32 = ["pt2", "onnx", "openvino", "litert", "executorch"]


def _check_fp32(tiny, tmp_path, fmt):
    _needs(fmt)
    info = get_format(fmt)
    out = tmp_path / f"m{info.suffix}"
    export(tiny, fmt, out, input_size=RES, samples=4, verbose=False)
    x = _fresh_inputs()
    y = run_native(fmt, out, x)
    ref = _eager(tiny, x)
    assert y.shape == ref.shape == (3, 6)
    assert _rel(ref, y) < 1e-4
    assert (y.argmax(1) == ref.argmax(1)).all()
    report = json.loads(parity_path(out).read_text())
    # random init with hand-set statistics: exported as given, and its record says what the weights are
    assert report["passed"] and report["random_weights"] is False and report["weights"] == "random init"


@pytest.mark.parametrize("fmt", FAST_FP32)
def test_fp32_artefact_matches_eager(tiny, tmp_path, fmt):
    _check_fp32(tiny, tmp_path, fmt)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", SLOW_FP32)
def test_fp32_artefact_matches_eager_slow_converters(tiny, tmp_path, fmt):
    _check_fp32(tiny, tmp_path, fmt)


def _fp16_weights(fmt: str, path) -> bool:
    """Does the artefact itself store half-precision weights?"""
    if fmt == "onnx":
        import onnx

        inits = onnx.load(str(path)).graph.initializer
        big = [t for t in inits if len(t.dims) == 4]  # conv weights
        return bool(big) and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    if fmt == "openvino":
        ov = require("openvino")
        consts = [op for op in ov.Core().read_model(str(path)).get_ordered_ops() if op.get_type_name() == "Constant"]
        weights = [c for c in consts if len(c.get_output_partial_shape(0)) == 4]
        return bool(weights) and all(c.get_element_type() == ov.Type.f16 for c in weights)
    if fmt == "torchscript":  # frozen: the weights are constants of the graph
        module = torch.jit.load(str(path))  # keep it alive while its graph is read
        consts = module.graph.findAllNodes("prim::Constant")
        tensors = [n.output().toIValue() for n in consts if n.output().type().kind() == "TensorType"]
        weights = [t for t in tensors if t.dim() == 4]
        return bool(weights) and all(t.dtype == torch.float16 for t in weights)
    if fmt == "pt2":
        return next(torch.export.load(str(path)).module().parameters()).dtype == torch.float16
    raise AssertionError(fmt)


FP16_CASES = ["pt2", "torchscript", "onnx", pytest.param("openvino", marks=pytest.mark.slow)]


def _case_names(cases) -> set[str]:
    return {c.values[0] if hasattr(c, "values") else c for c in cases}


@pytest.mark.parametrize("fmt", FP16_CASES)
def test_fp16_artefact_is_half_and_close_to_eager(tiny, tmp_path, fmt):
    _needs(fmt)
    assert "fp16" in get_format(fmt).precisions
    out = tmp_path / f"m{get_format(fmt).suffix}"
    export(tiny, fmt, out, input_size=RES, precision="fp16", samples=4, verbose=False)
    assert _fp16_weights(fmt, out)
    x = _fresh_inputs()
    y, ref = run_native(fmt, out, x, "fp16"), _eager(tiny, x)
    assert 0 < _rel(ref, y) < 3e-2  # really half precision, and still the same function
    assert (y.argmax(1) == ref.argmax(1)).mean() >= 2 / 3


def test_every_fp16_route_is_covered():
    covered = _case_names(FP16_CASES) | {"coreml"}  # coreml: test_coreml_program_*
    assert {f.name for f in FORMATS.values() if f.fp16} == covered


# --- Core ML: the program coremltools reads back ----------------------------------------------------


def _mil_program(path):
    ct = require("coremltools")
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = ct.utils.load_spec(str(path))
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    return spec, load(spec, spec.specificationVersion, str(weights))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_coreml_program_matches_the_fused_model(tiny, tmp_path, precision):
    _needs("coreml")
    out = tmp_path / "m.mlpackage"
    result = export(tiny, "coreml", out, input_size=RES, precision=precision, verbose=False)
    if not get_format("coreml").can_run():  # nothing was compared with eager: not a PASS
        assert result.report.summary().endswith("-> SKIPPED (numerics; IO shapes and ops verified)")
        assert json.loads(parity_path(out).read_text())["numerics_checked"] is False
    spec, program = _mil_program(out)
    assert [list(i.type.multiArrayType.shape) for i in spec.description.input] == [[1, 3, RES, RES]]
    assert [list(o.type.multiArrayType.shape) for o in spec.description.output] == [[1, 6]]
    ops = list(program.functions["main"].operations)
    kinds = [op.op_type for op in ops]
    assert kinds.count("matmul") == 4 and kinds.count("softmax") == 2  # two attention blocks, 2 matmuls each
    # Every conv of the fused model is in the program, in execution order, with its folded weights.
    fused = fuse(tiny)
    convs: list[nn.Conv2d] = []
    hooks = [
        m.register_forward_pre_hook(lambda m, a: convs.append(m)) for m in fused.modules() if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        fused(torch.zeros(1, 3, RES, RES))
    for h in hooks:
        h.remove()
    mil_convs = [op for op in ops if op.op_type == "conv"]
    assert len(mil_convs) == len(convs)
    tol = 1e-3 if precision == "fp16" else 1e-6  # fp16: rounding of the stored weights
    for conv, op in zip(convs, mil_convs):
        w = op.weight.val.astype(np.float32)
        assert op.weight.val.dtype == (np.float16 if precision == "fp16" else np.float32)
        ref = conv.weight.detach().numpy()
        assert w.shape == ref.shape and np.abs(w - ref).max() <= tol * max(1.0, np.abs(ref).max())
        assert op.groups.val == conv.groups
    linear = next(op for op in ops if op.op_type == "linear")
    assert np.allclose(linear.weight.val.astype(np.float32), fused.classifier.weight.numpy(), atol=tol * 30)
    assert list(ops[-1].outputs[0].shape) == [1, 6]


# --- INT8 on real digits, with a model that learned them --------------------------------------------

DIGITS = ModelSpec(
    name="digits_int8",
    stem=cn(3, 1, 16),
    stages=(
        (fib(3, 2, 24),),
        (uib(3, 5, 2, 32, 2.0), uib(0, 3, 1, 32, 2.0)),
        (uib(3, 3, 1, 32, 2.0), mqa(2, 16, kv_stride=2)),
        (uib(5, 0, 2, 48, 2.0),),
    ),
    num_features=64,
    head_hidden_size=96,
)


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """A tiny MNv4 (every block type) trained ~30 s on scikit-learn's digit scans at 16 px, and the
    digits as image folders: train/ (calibration) and val/ (360 held-out labelled scans)."""
    from mnv4.data.datasets import DataBundle
    from mnv4.data.digits import digits_split
    from mnv4.train import resolve_config, train

    root = tmp_path_factory.mktemp("digits")
    train_set, val_set = digits_split(0.2, seed=0, size=16)
    for split, ds in (("train", train_set), ("val", val_set)):
        for i in range(len(ds)):
            image, label = ds[i]
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i}.png")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two busy threads on a shared 2-core machine run several times slower
    try:
        cfg = resolve_config(
            "quick", model=DIGITS.to_dict(), epochs=6, batch_size=64, lr=4e-3, dropout=0.0, output=str(root / "run")
        )
        result = train(cfg, data=DataBundle("digits", train_set, val_set, list(train_set.classes), 16), progress=False)
    finally:
        torch.set_num_threads(threads)
    model = mnv4.create_model(checkpoint=result.summary["best_checkpoint"]).eval()
    return model, root / "train", root / "val"


def _labelled_images(model, folder) -> tuple[np.ndarray, np.ndarray]:
    from mnv4.data.transforms import eval_transform

    tf = eval_transform(model.preprocess)
    xs, ys = [], []
    for label in sorted(os.listdir(folder)):
        for name in sorted(os.listdir(folder / label)):
            with Image.open(folder / label / name) as im:
                xs.append(tf(im.convert("RGB")).numpy())
            ys.append(model.class_names.index(label))
    return np.stack(xs), np.array(ys)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [f.name for f in FORMATS.values() if f.int8])
def test_int8_keeps_accuracy_on_real_digits(digits, tmp_path, fmt):
    _needs(fmt, "int8")
    model, train_dir, val_dir = digits
    out = tmp_path / f"q{get_format(fmt).suffix}"
    export(model, fmt, out, precision="int8", calib_dir=train_dir, calib_samples=128, samples=8, verbose=False)
    x, labels = _labelled_images(model, val_dir)
    ref = _eager(model, x)
    q = run_native(fmt, out, x, "int8")
    fp32_acc = (ref.argmax(1) == labels).mean()
    int8_acc = (q.argmax(1) == labels).mean()
    agreement = (ref.argmax(1) == q.argmax(1)).mean()
    assert fp32_acc >= 0.9, f"the digits model did not learn ({fp32_acc:.1%})"
    assert agreement >= 0.95, f"{fmt} INT8 agrees with fp32 on {agreement:.1%} of {len(x)} digits"
    assert int8_acc >= fp32_acc - 0.03, f"{fmt} INT8 accuracy {int8_acc:.1%} vs fp32 {fp32_acc:.1%}"
    assert _rel(ref, q) > 1e-4  # really quantized, not a copy of the fp32 graph


def test_every_int8_route_is_covered():
    assert {f.name for f in FORMATS.values() if f.int8} == {"onnx", "openvino", "litert", "executorch"}


def _weight_dequantized(path, node_type: str) -> list[bool]:
    """Per ``node_type`` node in graph order: is its weight input produced by a DequantizeLinear?"""
    import onnx

    graph = onnx.load(str(path)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    return [producer.get(n.input[1]) == "DequantizeLinear" for n in graph.node if n.op_type == node_type]


@pytest.mark.slow
def test_onnx_int8_keeps_stem_and_head_float_unless_asked(digits, tmp_path):
    _needs("onnx", "int8")
    model, train_dir, _ = digits
    kw = dict(precision="int8", calib_dir=train_dir, samples=16, calib_samples=64, verbose=False)
    export(model, "onnx", tmp_path / "ends.onnx", **kw)
    convs = _weight_dequantized(tmp_path / "ends.onnx", "Conv")
    # stem and the post-pool head conv float, every conv between them int8; classifier float
    assert not convs[0] and not convs[-1] and all(convs[1:-1])
    assert _weight_dequantized(tmp_path / "ends.onnx", "Gemm") == [False]
    notes = json.loads(parity_path(tmp_path / "ends.onnx").read_text())["notes"]
    assert any("stem conv and head" in n for n in notes)
    export(model, "onnx", tmp_path / "all.onnx", int8_all_layers=True, **kw)
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


# --- parity report, random weights, unreadable images -----------------------------------------------


def test_failed_parity_is_an_error(tiny, tmp_path, monkeypatch):
    import dataclasses

    info = get_format("pt2")
    real = info.loader

    def broken(path, options):
        run = real(path, options)
        return lambda x: run(x) + 0.05  # a runtime that is subtly wrong

    monkeypatch.setitem(FORMATS, "pt2", dataclasses.replace(info, loader=broken))
    out = tmp_path / "bad.pt2"
    with pytest.raises(ParityError, match="failed its parity check"):
        export(tiny, "pt2", out, input_size=RES, samples=4, verbose=False)
    report = json.loads(parity_path(out).read_text())
    assert report["passed"] is False and report["failures"]


def test_random_weights_are_recalibrated_and_reported(tmp_path, no_flush):
    model = mnv4.create_model(ModelSpec.from_dict(_tiny().spec.to_dict()), num_classes=6).eval()
    x = torch.from_numpy(_fresh_inputs(4))
    with torch.no_grad():
        raw = model(x).std().item()
    result = export(model, "pt2", tmp_path / "r.pt2", input_size=RES, samples=4, verbose=False)
    report = json.loads(parity_path(result.path).read_text())
    assert report["random_weights"] is True and "BatchNorm statistics re-estimated on 32 inputs" in report["weights"]
    assert any("not accuracy" in n for n in report["notes"])
    assert "random weights" in result.report.summary()
    # the artefact carries realistic activations; the caller's model is left as it was
    y = run_native("pt2", result.path, x.numpy())
    assert y.std() > 100 * raw and y.std() > 1e-2
    with torch.no_grad():
        assert model(x).std().item() == raw
    # the check compares real numbers, not values near zero
    assert report["max_rel_diff"] < 1e-4


@pytest.mark.slow
def test_int8_on_random_weights_has_its_own_bar(tmp_path):
    _needs("onnx", "int8")
    from mnv4.deploy.export import RANDOM_INT8_MIN_COSINE
    from mnv4.deploy.inputs import random_inputs

    model = mnv4.create_model("mnv4_conv_small_035").eval()
    calib = random_inputs(32, RES, seed=3)
    result = export(
        model, "onnx", tmp_path / "q.onnx", input_size=RES, precision="int8", calib_data=calib, verbose=False
    )
    report = json.loads(parity_path(result.path).read_text())
    assert report["random_weights"] and report["criteria"]["min_cosine"] == RANDOM_INT8_MIN_COSINE < 0.95
    assert any("int8 on random weights" in n for n in report["notes"])
    assert RANDOM_INT8_MIN_COSINE < report["cosine"] < 1.0


@pytest.fixture
def mixed_folder(tmp_path):
    """Images in many PIL modes, plus two files that cannot be read."""
    root = tmp_path / "mixed"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    rng = np.random.default_rng(1)
    rgb = Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8))
    rgb.convert("RGBA").save(root / "a" / "rgba.png")
    rgb.convert("LA").save(root / "a" / "la.png")
    rgb.convert("P").save(root / "a" / "p.png")
    rgb.convert("CMYK").save(root / "b" / "cmyk.jpg")
    Image.fromarray((rng.random((40, 48)) * 65535).astype(np.uint16)).save(root / "b" / "i16.png")
    rgb.save(root / "b" / "rgb.webp")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "b" / "text.jpg").write_text("hello")
    return root


def test_load_images_reads_every_mode_and_skips_unreadable(mixed_folder):
    from mnv4.deploy.inputs import load_images
    from mnv4.models.registry import Preprocess

    s = load_images(mixed_folder, Preprocess(), input_size=32, limit=None)
    assert s.images.shape == (6, 3, 32, 32) and torch.isfinite(s.images).all()
    assert sorted(s.labels.tolist()) == [0, 0, 0, 1, 1, 1] and s.class_names == ["a", "b"]
    bad = {os.path.basename(b.path): b.reason for b in s.unreadable}
    assert set(bad) == {"broken.png", "text.jpg"} and all(bad.values())
    # a limit counts readable images: unreadable ones are replaced by the next file
    assert len(load_images(mixed_folder, Preprocess(), input_size=32, limit=5).images) == 5


def test_unreadable_calibration_images_are_counted_in_the_report(tiny, tmp_path, mixed_folder):
    result = export(tiny, "pt2", tmp_path / "m.pt2", input_size=RES, calib_dir=mixed_folder, verbose=False)
    report = json.loads(parity_path(result.path).read_text())
    assert report["samples"] == 6 and report["unreadable_images"] == 2
    assert sorted(os.path.basename(f["path"]) for f in report["unreadable_files"]) == ["broken.png", "text.jpg"]
    assert "skipped 2 unreadable image(s)" in result.report.summary()


def test_all_images_unreadable_is_one_clear_error(tiny, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_text("no")
    with pytest.raises(MNv4Error, match=r"none of the 1 image files in .*bad could be read \(e.g. .*x.png"):
        export(tiny, "pt2", tmp_path / "m.pt2", input_size=RES, calib_dir=tmp_path / "bad", verbose=False)


# --- request validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(fmt="tflite"), InvalidValue, "`format` 'tflite' is invalid: choose one of onnx"),
        (dict(precision="fp64"), InvalidValue, "`precision` 'fp64' is invalid: choose one of fp32, fp16, bf16, int8"),
        (dict(fmt="litert", precision="fp16"), MNv4Error, "litert has no fp16 route in mnv4; it offers fp32, int8"),
        (dict(fmt="torchscript", precision="int8"), MNv4Error, "torchscript has no int8 route"),
        (dict(precision="int8"), MNv4Error, "INT8 export needs calibration images"),
        (dict(calib_dir="missing"), MNv4Error, "calibration folder not found: .*missing"),
        (dict(eval_dir="missing"), MNv4Error, "evaluation folder not found: .*missing"),
        (dict(input_size=0), InvalidValue, "`input_size` 0 is invalid: must be >= 16"),
        (dict(input_size=4096), InvalidValue, "`input_size` 4096 is invalid"),
        (dict(input_size=64.5), InvalidValue, "`input_size` 64.5 is invalid: must be a whole number"),
        (dict(samples=0), InvalidValue, "`samples` 0 is invalid"),
        (dict(min_top1=1.5), InvalidValue, "`min_top1` 1.5 is invalid"),
        (dict(threads=0), InvalidValue, "`threads` 0 is invalid"),
        (dict(output="m.tflite"), MNv4Error, "a onnx artefact must end in .onnx, got m.tflite"),
    ],
)
def test_bad_export_requests_fail_before_any_work(tiny, tmp_path, kwargs, error, message):
    kw = dict(fmt="onnx", input_size=RES, verbose=False)
    kw.update(kwargs)
    for key in ("calib_dir", "eval_dir", "output"):
        if key in kw:
            kw[key] = str(tmp_path / kw[key])
    fmt = kw.pop("fmt")
    out = kw.pop("output", str(tmp_path / "m.onnx"))
    with pytest.raises(error, match=message):
        export(tiny, fmt, out, **kw)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_missing_runtime_names_its_extra(tiny, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(MNv4Error, match=r"openvino is not installed; install it with: pip install 'mnv4\[openvino\]'"):
        export(tiny, "openvino", tmp_path / "a.xml", input_size=RES)


# --- denormals: every runtime bench drives flushes them -----------------------------------------------


def _denormal_model() -> tuple[nn.Module, torch.Tensor]:
    """A 1x1 conv whose products (1e-20 x 1e-20) are denormal floats."""
    conv = nn.Conv2d(3, 8, 1, bias=False).eval()
    with torch.no_grad():
        conv.weight.fill_(1e-20)
    return nn.Sequential(conv).eval(), torch.full((1, 3, 8, 8), 1e-20)


DENORMAL_CASES = [
    "pt2",
    "torchscript",
    "onnx",
    pytest.param("openvino", marks=pytest.mark.slow),
    pytest.param("litert", marks=pytest.mark.slow),
    pytest.param("executorch", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("fmt", DENORMAL_CASES)
def test_runtime_flushes_denormals(tmp_path, fmt, no_flush):
    from mnv4.deploy.runners import RunOptions
    from mnv4.deploy.writers import WriteJob, write_atomically

    _needs(fmt)
    model, x = _denormal_model()
    with torch.no_grad():
        assert 0 < model(x).abs().max().item() < 1e-38  # eager, not flushed: denormal outputs
    info = get_format(fmt)
    path = write_atomically(tmp_path / f"d{info.suffix}", lambda t: info.writer(model, x, t, WriteJob("fp32")))
    y = info.loader(path, RunOptions(threads=1))(x.numpy())
    assert y.shape == (1, 8, 8, 8) and np.all(y == 0)


@pytest.mark.slow
def test_executorch_runs_on_the_thread_count_asked_for(tmp_path):
    # ExecuTorch's XNNPACK kernels run on its own pool (one thread per core at start-up), not torch's:
    # a --threads 1 timing must size that pool too, or a .pte is timed on more cores than the other routes.
    from mnv4.deploy.runners import RunOptions
    from mnv4.deploy.writers import WriteJob, write_atomically

    _needs("executorch")
    from executorch.extension.pybindings import portable_lib

    before = portable_lib._threadpool_get_thread_count()
    model, x = _denormal_model()
    info = get_format("executorch")
    path = write_atomically(tmp_path / f"d{info.suffix}", lambda t: info.writer(model, x, t, WriteJob("fp32")))
    try:
        for threads in (1, 2):
            run = info.loader(path, RunOptions(threads=threads))
            assert portable_lib._threadpool_get_thread_count() == threads
            assert run(x.numpy()).shape == (1, 8, 8, 8)
    finally:
        portable_lib._unsafe_reset_threadpool(before)


def test_every_benched_runtime_is_checked_for_denormals():
    assert {f.name for f in FORMATS.values() if f.can_run() and f.name != "coreml"} <= _case_names(DENORMAL_CASES)


def test_cli_export_errors_name_the_flags(tmp_path, capsys):
    from mnv4.cli import main

    base = ["export", "-m", "mnv4_conv_small", "--no-progress", "-o", str(tmp_path / "m.onnx")]
    assert main([*base, "--format", "onnx", "--int8"]) == 2
    assert "INT8 export needs calibration images: pass an image folder as --calib" in capsys.readouterr().err
    assert main([*base, "--format", "onnx", "--input-size", "4096"]) == 2
    assert "argument --input-size: expected an integer from 16 to 2048, got '4096'" in capsys.readouterr().err
    assert main([*base, "--format", "onnx", "--calib", str(tmp_path / "none")]) == 2
    assert "calibration folder not found" in capsys.readouterr().err
    assert main([*base, "--format", "litert", "--fp16"]) == 2
    assert "litert has no fp16 route" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_export_torchscript(tmp_path, capsys):
    from mnv4.cli import main

    out = tmp_path / "cs.pt"
    assert main(["export", "mnv4_conv_small", "--format", "torchscript", "--res", "64", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "parity torchscript/fp32" in text and "PASS" in text
    assert parity_path(out).is_file()


def test_docs_tables_match_the_records():
    from pathlib import Path

    from mnv4.deploy.bench import denormal_table
    from mnv4.deploy.formats import format_table

    docs = (Path(__file__).resolve().parent.parent / "docs" / "deploy.md").read_text()
    assert format_table() in docs, "regenerate the format table in docs/deploy.md from format_table()"
    assert denormal_table() in docs, "regenerate the denormal table in docs/deploy.md from denormal_table()"


def _checkpoint_with_default_bn(tmp_path):
    """A freshly initialised Conv-S saved as a checkpoint: BatchNorm statistics at their defaults, where
    re-estimating them changes the outputs a lot."""
    from mnv4.models.batchnorm import has_default_bn_stats
    from mnv4.weights.checkpoint import save_model

    torch.manual_seed(0)
    fresh = mnv4.create_model("mnv4_conv_small", num_classes=10)
    assert has_default_bn_stats(fresh)
    return save_model(fresh, tmp_path / "ck.safetensors")


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=pytest.mark.slow)])
def test_export_reproduces_the_given_checkpoint(tmp_path, capsys, fmt, no_flush):
    from mnv4.cli import main

    _needs(fmt)
    ck = _checkpoint_with_default_bn(tmp_path)
    out = tmp_path / f"m{get_format(fmt).suffix}"
    argv = ["export", "mnv4_conv_small", "--checkpoint", str(ck), "--format", fmt, "--res", str(RES)]
    assert main([*argv, "--no-progress", "-o", str(out)]) == 0
    given = mnv4.create_model(checkpoint=ck).eval()  # the user's model, loaded independently
    x = _fresh_inputs()
    ref = _eager(given, x)
    assert _rel(ref, run_native(fmt, out, x)) < 1e-4
    report = json.loads(parity_path(out).read_text())
    assert report["random_weights"] is False and report["weights"] == f"from {ck}"

    # The explicit option re-estimates them, and that is far from the checkpoint: the check above can fail.
    other = tmp_path / f"r{get_format(fmt).suffix}"
    assert main([*argv, "--no-progress", "--recalibrate-bn", "-o", str(other)]) == 0
    assert _rel(ref, run_native(fmt, other, x)) > 0.1
    report = json.loads(parity_path(other).read_text())
    assert "re-estimated" in report["weights"] and any("not the input's" in n for n in report["notes"])


def test_unchecked_numerics_are_skipped_not_passed():
    from mnv4.deploy.parity import ParityReport

    report = ParityReport("coreml", "fp32", "m.mlpackage", 4, [3, 64, 64], passed=True, numerics_checked=False)
    assert report.summary().endswith("-> SKIPPED (numerics; IO shapes and ops verified)")
    report.numerics_checked = True
    report.max_abs_diff = report.max_rel_diff = 0.0
    report.cosine, report.top1_agreement = 1.0, 1.0
    assert report.summary().endswith("-> PASS")


def test_int8_bar_includes_top1_agreement():
    """Cosine alone lets an INT8 route change one answer in five; the bar also asks for agreement."""
    from mnv4.deploy.parity import CRITERIA, INT8_MIN_TOP1, ParityReport, compare

    ref = np.zeros((16, 10), np.float32)
    ref[:, 0], ref[:, 1] = 5.0, 4.9  # every sample: class 0 just ahead of class 1
    out = ref.copy()
    out[:3, 1] = 5.1  # three of sixteen flip to class 1: 81% agreement, cosine still ~0.999
    report = compare(ref, out, ParityReport("onnx", "int8", "q.onnx", 16, [3, 8, 8]), CRITERIA["int8"])
    assert report.cosine > 0.99 and report.top1_agreement == 13 / 16 < INT8_MIN_TOP1
    assert not report.passed and report.failures == [f"top-1 agreement 81.25% < {INT8_MIN_TOP1:.0%}"]
    assert compare(ref, ref.copy(), ParityReport("onnx", "int8", "q.onnx", 16, [3, 8, 8]), CRITERIA["int8"]).passed


def test_random_weight_int8_bar_fails_an_artefact_that_ignores_its_input():
    """Random weights give every input nearly the same logits: an output equal to their mean for every
    input scores a plain cosine near 0.6 (over the 0.5 bar), so the bar also asks what varies with the
    input to follow it (the centred cosine); a real INT8 rounding of the outputs passes."""
    import dataclasses

    from mnv4.deploy.export import RANDOM_INT8_MIN_CENTRED_COSINE, RANDOM_INT8_MIN_COSINE
    from mnv4.deploy.parity import CRITERIA, ParityReport, compare

    rng = np.random.default_rng(0)
    ref = (3.0 + rng.normal(0, 0.3, (1, 10)) + rng.normal(0, 0.25, (16, 10))).astype(np.float32)
    constant = np.repeat(ref.mean(0, keepdims=True), 16, 0)
    bar = dataclasses.replace(
        CRITERIA["int8"], min_cosine=RANDOM_INT8_MIN_COSINE, min_top1=None,
        min_centred_cosine=RANDOM_INT8_MIN_CENTRED_COSINE,
    )  # fmt: skip
    report = compare(ref, constant, ParityReport("onnx", "int8", "q.onnx", 16, [3, 8, 8]), bar)
    assert report.cosine > RANDOM_INT8_MIN_COSINE and abs(report.centred_cosine) < 1e-5
    assert not report.passed and "do not follow its inputs" in report.failures[0]
    rounded = np.round(ref / 0.1) * 0.1 + rng.normal(0, 0.05, ref.shape)  # int8-like error
    assert compare(ref, rounded, ParityReport("onnx", "int8", "q.onnx", 16, [3, 8, 8]), bar).passed


def test_a_new_export_removes_the_old_report_before_writing(tiny, tmp_path, monkeypatch):
    """If the export dies between writing the artefact and checking it, no earlier PASS is left beside the new
    artefact: the previous artefact and its own report come back together (previous_artefact_kept)."""
    from mnv4.deploy import export as export_module

    out = tmp_path / "m.pt"
    export(tiny, "torchscript", out, input_size=RES, samples=2, verbose=False)
    before = out.read_bytes(), parity_path(out).read_bytes()

    seen = []

    def killed(*args, **kwargs):
        seen.append(parity_path(out).exists())
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "_check_numerics", killed)
    with pytest.raises(KeyboardInterrupt):
        export(tiny, "torchscript", out, input_size=RES, samples=2, verbose=False)
    assert seen == [False]  # while the new artefact was being checked, no report stood beside it
    assert (out.read_bytes(), parity_path(out).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.pt.parity.json"]


def test_one_check_input_still_checks_the_dynamic_batch(tiny, tmp_path):
    result = export(tiny, "torchscript", tmp_path / "m.pt", input_size=RES, samples=1, verbose=False)
    assert result.report.batch_sizes == [1, 2] and result.report.dynamic_batch is True


def test_given_data_of_the_wrong_shape_is_one_error(tiny, tmp_path):
    with pytest.raises(MNv4Error, match=rf"`check_data` must be preprocessed images \[N, C, {RES}, {RES}\]"):
        export(tiny, "torchscript", tmp_path / "m.pt", input_size=RES, check_data=torch.zeros(2, 3, RES + 8, RES + 8))
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("kind", ["file on the way", "folder at the end"])
def test_an_output_path_that_cannot_be_written_fails_before_any_work(tiny, tmp_path, kind):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    (tmp_path / "m.pt").mkdir()
    out = tmp_path / "weights.safetensors" / "m.pt" if kind == "file on the way" else tmp_path / "m.pt"
    match = "is a file, so no file can be made under it" if kind == "file on the way" else "is a folder, not a file"
    with pytest.raises(MNv4Error, match=match):
        export(tiny, "torchscript", out, input_size=RES, samples=2, verbose=False)


def test_the_default_name_carries_an_input_contract_other_than_the_default():
    from mnv4.deploy.export import default_artefact_name
    from mnv4.deploy.requests import ExportRequest

    onnx = get_format("onnx")
    assert default_artefact_name("m", 64, ExportRequest("onnx"), onnx) == "m_64_fp32.onnx"
    camera = ExportRequest("onnx", input_layout="nhwc", input_dtype="uint8", batch="1")
    assert default_artefact_name("m", 64, camera, onnx) == "m_64_fp32_nhwc_uint8_b1.onnx"
    assert default_artefact_name("m", 64, ExportRequest("onnx", batch="dynamic"), onnx) == "m_64_fp32.onnx"


def test_output_folder_gets_the_default_name(tiny, tmp_path):
    folder = tmp_path / "new" / ""  # a path ending in a separator: a folder, made if missing
    result = export(tiny, "torchscript", f"{folder}{os.sep}", input_size=RES, samples=2, verbose=False)
    assert result.path == tmp_path / "new" / f"tiny_export_{RES}_fp32.pt" and result.path.is_file()
    again = export(tiny, "torchscript", tmp_path / "new", input_size=RES, samples=2, verbose=False)  # existing
    assert again.path == result.path


def test_third_party_logging_is_silenced_unless_debug(monkeypatch, capsys, caplog):
    import logging

    import mnv4.cli.models as cli_models
    from mnv4.cli import main

    # a logger no library configures: once imported, nncf's own logger stops propagating to the root
    # (so pytest cannot capture it); the silencing is process-wide, whichever library logs
    def chatty(args):
        logging.getLogger("chatty_converter").warning("INFO:nncf: collecting statistics")
        logging.getLogger("absl").info("absl says hello")
        print("result line")
        return 0

    monkeypatch.setattr(cli_models, "_cmd_models", chatty)
    with caplog.at_level(logging.INFO):
        assert main(["models"]) == 0
        out = capsys.readouterr()
        assert out.out == "result line\n" and out.err == "" and not caplog.records
        assert main(["models", "--debug"]) == 0
    assert {r.getMessage() for r in caplog.records} == {"INFO:nncf: collecting statistics", "absl says hello"}
    assert logging.getLogger("chatty_converter").isEnabledFor(logging.WARNING)  # restored after the command


def test_converter_chatter_follows_progress(tiny, tmp_path, monkeypatch, capsys):
    import dataclasses

    info = get_format("torchscript")
    real = info.writer

    def chatty(model, example, target, job):
        print("Statistics collection 100% 32/32")  # what NNCF's rich bars leave on a pipe
        real(model, example, target, job)

    monkeypatch.setitem(FORMATS, "torchscript", dataclasses.replace(info, writer=chatty))
    export(tiny, "torchscript", tmp_path / "a.pt", input_size=RES, samples=2, verbose=False, progress=False)
    assert capsys.readouterr().out == ""
    export(tiny, "torchscript", tmp_path / "b.pt", input_size=RES, samples=2, verbose=False, progress=True)
    assert "Statistics collection" in capsys.readouterr().out


@pytest.mark.slow
def test_litert_runs_multi_query_attention_without_transposes(tmp_path):
    # LiteRT is NHWC: the channel-major attention reshapes cost a TRANSPOSE each way, the token-major
    # form that write_litert exports costs none (docs/deploy.md "Attention layout on NHWC runtimes").
    _needs("litert")
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter

    from mnv4.deploy.writers import WriteJob, write_litert

    spec = ModelSpec(
        name="tiny_mqa",
        stem=cn(3, 2, 8),
        stages=(
            (uib(3, 3, 2, 12, 2.0),),
            (uib(3, 3, 2, 16, 2.0),),
            (uib(3, 3, 2, 24, 2.0), mqa(2, 8, kv_stride=2)),
            (uib(3, 3, 2, 32, 2.0), mqa(2, 8)),
        ),
        num_features=32,
        head_hidden_size=32,
    )
    torch.manual_seed(0)
    # randomize_: a fresh model's logits (~3e-6) would pass the closeness check below whatever the artefact held
    model = fuse(randomize_(mnv4.create_model(spec, num_classes=4)).eval())
    x = torch.rand(1, 3, 64, 64)

    def transposes(path) -> int:
        ops = Interpreter(model_path=str(path))._get_ops_details()
        return sum(op["op_name"] == "TRANSPOSE" for op in ops)

    litert_torch.convert(model, (x,)).export(str(tmp_path / "channels.tflite"))
    write_litert(model, x, tmp_path / "tokens.tflite", WriteJob("fp32"))
    assert transposes(tmp_path / "channels.tflite") >= 4  # at least q, k, v in and the output back, per block
    assert transposes(tmp_path / "tokens.tflite") <= 1  # the NCHW input's own, at most
    y = run_native("litert", tmp_path / "tokens.tflite", x.numpy())
    with torch.no_grad():
        expected = model(x).numpy()
    assert expected.std() > 1e-2
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("suffix", [".onnx", ".xml"])
def test_a_failed_export_never_replaces_the_previous_artefact(tmp_path, suffix):
    """previous_artefact_kept: a new artefact that fails parity goes to NAME.failed.EXT with its report (OpenVINO's
    .bin beside its .xml) and the previous files come back unchanged; a crash midway removes the partial new
    files; a pass replaces the previous ones; with nothing there before, a failed artefact stays in place."""
    from mnv4.deploy.writers import previous_artefact_kept

    path = tmp_path / f"m{suffix}"
    group = [path, tmp_path / f"m{suffix}.parity.json"] + ([tmp_path / "m.bin"] if suffix == ".xml" else [])

    def write(tag):
        for p in group:
            p.write_text(tag)

    write("good")
    kept = rf"m\.failed{suffix} failed its parity check.*the previous m{suffix} is kept"
    with pytest.raises(ParityError, match=kept):
        with previous_artefact_kept(path):
            write("bad")
            raise ParityError(f"{path} failed its parity check: cosine 0.1 < 0.95 (see {path}.parity.json)")
    assert all(p.read_text() == "good" for p in group)
    failed = sorted(p.name for p in tmp_path.iterdir() if ".failed" in p.name)
    assert failed == sorted(p.name.replace("m.", "m.failed.", 1) for p in group)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no backup folder left
    with pytest.raises(RuntimeError, match="converter crashed"):
        with previous_artefact_kept(path):
            path.write_text("half")
            raise RuntimeError("converter crashed")
    assert all(p.read_text() == "good" for p in group)
    with previous_artefact_kept(path):
        write("new")
    assert all(p.read_text() == "new" for p in group)
    fresh = tmp_path / "fresh.onnx"
    with pytest.raises(ParityError):
        with previous_artefact_kept(fresh):
            fresh.write_text("bad")
            raise ParityError(f"{fresh} failed")
    assert fresh.read_text() == "bad"  # nothing to protect: left in place for inspection


def test_an_export_killed_midway_gets_its_previous_artefact_back_at_the_next_export(tmp_path):
    """previous_artefact_kept moves the previous artefact into .NAME.previous.PID.*; a SIGKILL (no except runs)
    leaves it there beside the killed export's unchecked files. The next export to the same path puts the
    previous files back before it starts, so a failure of that one keeps them too; a live exporter's backup
    is left alone."""
    import subprocess

    from mnv4.deploy.writers import previous_artefact_kept

    path = tmp_path / "m.onnx"
    report = tmp_path / "m.onnx.parity.json"
    path.write_text("good")
    report.write_text("PASS")
    killed = """
import os, signal, sys
from pathlib import Path
from mnv4.deploy.writers import previous_artefact_kept
path = Path(sys.argv[1])
with previous_artefact_kept(path):
    path.write_text("unchecked")
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", killed, str(path)], capture_output=True)
    assert proc.returncode == -9
    backups = [p for p in tmp_path.iterdir() if ".previous." in p.name]
    assert len(backups) == 1 and sorted(p.name for p in backups[0].iterdir()) == ["m.onnx", "m.onnx.parity.json"]
    assert path.read_text() == "unchecked" and not report.exists()
    live = tmp_path / f".m.onnx.previous.{os.getpid()}.live"  # this process's pid: an export still running
    live.mkdir()
    (live / "m.onnx").write_text("theirs")
    with pytest.raises(ParityError):
        with previous_artefact_kept(path):
            assert not path.exists()  # the restored previous files are moved aside again
            path.write_text("bad")
            raise ParityError(f"{path} failed its parity check")
    assert path.read_text() == "good" and report.read_text() == "PASS"
    assert [p.name for p in tmp_path.iterdir() if ".previous." in p.name] == [live.name]


def test_the_temporary_folder_of_a_killed_export_is_removed_by_the_next_one(tmp_path):
    """write_atomically's folder is named like atomic_write's temp files (the writer's pid inside): the next
    export to the same path removes one whose writer was killed, and leaves other files' and live ones."""
    import subprocess

    from mnv4.deploy.writers import write_atomically

    path = tmp_path / "m.onnx"
    killed = """
import os, signal, sys
from pathlib import Path
from mnv4.deploy.writers import write_atomically
def write(target):
    target.write_bytes(b"half an artefact")
    os.kill(os.getpid(), signal.SIGKILL)
write_atomically(Path(sys.argv[1]), write)
"""
    assert subprocess.run([sys.executable, "-c", killed, str(path)]).returncode == -9
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".m.onnx.")]
    assert left.is_dir() and left.name.endswith(".tmp") and (left / "m.onnx").exists() and not path.exists()
    other = tmp_path / ".other.onnx.999999999.abc.tmp"  # another artefact's: not this export's to remove
    other.mkdir()
    live = tmp_path / f".m.onnx.{os.getpid()}.abc.tmp"  # a running export's
    live.mkdir()
    write_atomically(path, lambda target: target.write_bytes(b"whole"))
    assert path.read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted([other.name, live.name])
