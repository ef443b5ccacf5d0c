"""Load an exported artefact in its own runtime and run it: ``np.ndarray`` NCHW in, logits out.

One small loader per format, each importing its runtime lazily. Parity checks and ``mnv4 bench``
both go through these, so what is benchmarked is exactly what was verified.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import MNv4Error, missing_extra

__all__ = ["Runner", "load_runner", "FORMAT_OF_SUFFIX", "format_of"]

Runner = Callable[[np.ndarray], np.ndarray]

FORMAT_OF_SUFFIX = {
    ".onnx": "onnx",
    ".xml": "openvino",
    ".tflite": "litert",
    ".pte": "executorch",
    ".mlpackage": "coreml",
    ".mlmodel": "coreml",
    ".pt": "torchscript",
    ".ts": "torchscript",
    ".pt2": "pt2",
}


def format_of(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMAT_OF_SUFFIX:
        raise MNv4Error(f"cannot tell the format of {path}; known suffixes: {', '.join(FORMAT_OF_SUFFIX)}")
    return FORMAT_OF_SUFFIX[suffix]


def _onnx(path: Path, threads: int | None) -> Runner:
    try:
        import onnxruntime as ort
    except ImportError:
        raise missing_extra("onnxruntime", "onnx") from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")  # see perf.latency.flush_denormals
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dtype = np.float16 if "float16" in inp.type else np.float32

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {inp.name: x.astype(dtype, copy=False)})[0].astype(np.float32)

    return run


def _openvino(path: Path, threads: int | None, precision: str = "fp32") -> Runner:
    try:
        import openvino as ov
    except ImportError:
        raise missing_extra("openvino", "openvino") from None
    # OpenVINO's CPU plugin defaults to bf16 on CPUs that have it (1.9e-3 diff): pin the precision.
    config = {"INFERENCE_PRECISION_HINT": "f16" if precision == "fp16" else "f32", "CPU_DENORMALS_OPTIMIZATION": True}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    core = ov.Core()
    source = core.read_model(str(path))
    compiled: dict[tuple[int, ...], tuple] = {}

    # One compiled model per input shape: with NNCF INT8 models, OpenVINO 2026.4 returns wrong
    # results for a smaller batch once a larger one ran through the same dynamic-shape compiled
    # model (a new infer request does not help), so shapes never share one.
    def run(x: np.ndarray) -> np.ndarray:
        key = tuple(x.shape)
        if key not in compiled:
            model = source.clone()
            model.reshape({model.input(0): ov.PartialShape(list(key))})
            c = core.compile_model(model, "CPU", config)
            compiled[key] = (c, c.create_infer_request())
        c, request = compiled[key]
        return np.array(request.infer([x])[c.output(0)], dtype=np.float32)

    return run


def _litert(path: Path, threads: int | None) -> Runner:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise missing_extra("ai-edge-litert", "litert") from None
    interp = Interpreter(model_path=str(path), num_threads=threads or None)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    batch = int(inp["shape"][0])

    def quantize(x: np.ndarray, detail: dict) -> np.ndarray:
        if detail["dtype"] in (np.int8, np.uint8):  # static-int8 models take int8 inputs
            scale, zero = detail["quantization"]
            info = np.iinfo(detail["dtype"])
            return np.clip(np.round(x / scale + zero), info.min, info.max).astype(detail["dtype"])
        return x.astype(detail["dtype"], copy=False)

    def dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
        if detail["dtype"] in (np.int8, np.uint8):
            scale, zero = detail["quantization"]
            return (y.astype(np.float32) - zero) * scale
        return y.astype(np.float32)

    def run_one(x: np.ndarray) -> np.ndarray:
        interp.set_tensor(inp["index"], quantize(x, inp))
        interp.invoke()
        return dequantize(interp.get_tensor(out["index"]), out)

    resized = {"batch": batch}
    interp.allocate_tensors()

    def run(x: np.ndarray) -> np.ndarray:
        if len(x) != resized["batch"]:
            # TFLite tensors are static; resize the input when the batch changes.
            interp.resize_tensor_input(inp["index"], [len(x), *list(inp["shape"][1:])])
            interp.allocate_tensors()
            resized["batch"] = len(x)
        return run_one(x)

    return run


def _executorch(path: Path, threads: int | None) -> Runner:
    try:
        import torch
        from executorch.runtime import Runtime
    except ImportError:
        raise missing_extra("executorch", "executorch") from None
    if threads:
        torch.set_num_threads(threads)
    program = Runtime.get().load_program(str(path))
    method = program.load_method("forward")

    def run(x: np.ndarray) -> np.ndarray:
        return method.execute([torch.from_numpy(np.ascontiguousarray(x))])[0].float().numpy()

    return run


def _torchscript(path: Path, threads: int | None) -> Runner:
    import torch

    if threads:
        torch.set_num_threads(threads)
    module = torch.jit.load(str(path), map_location="cpu").eval()
    dtype = next((p.dtype for p in module.parameters()), torch.float32)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x).to(dtype)).float().numpy()

    return run


def _pt2(path: Path, threads: int | None) -> Runner:
    import torch

    if threads:
        torch.set_num_threads(threads)
    module = torch.export.load(str(path)).module()
    dtype = next((p.dtype for p in module.parameters()), torch.float32)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x).to(dtype)).float().numpy()

    return run


def _coreml(path: Path, threads: int | None) -> Runner:
    try:
        import coremltools as ct
    except ImportError:
        raise missing_extra("coremltools", "coreml") from None
    import platform

    if platform.system() != "Darwin":
        raise MNv4Error("Core ML models can only be run on macOS (coremltools cannot predict on this platform)")
    model = ct.models.MLModel(str(path))
    name = model.get_spec().description.input[0].name

    def run(x: np.ndarray) -> np.ndarray:
        out = model.predict({name: x})
        return np.asarray(next(iter(out.values())), dtype=np.float32)

    return run


def load_runner(path: str | os.PathLike, fmt: str | None = None, threads: int | None = None, **kwargs) -> Runner:
    """A callable running the artefact at ``path`` (format from the suffix unless ``fmt`` is given)."""
    path = Path(path)
    if not path.exists():
        raise MNv4Error(f"no such artefact: {path}")
    fmt = fmt or format_of(path)
    loaders = {
        "onnx": _onnx,
        "openvino": _openvino,
        "litert": _litert,
        "executorch": _executorch,
        "torchscript": _torchscript,
        "pt2": _pt2,
        "coreml": _coreml,
    }
    if fmt not in loaders:
        raise MNv4Error(f"unknown format {fmt!r}; choose one of {', '.join(loaders)}")
    if fmt == "openvino":
        return _openvino(path, threads, **kwargs)
    return loaders[fmt](path, threads)
