"""Load an exported artefact in its own runtime and run it: ``np.ndarray`` NCHW in, logits out.

One loader per format, each importing its runtime lazily, all with the signature
``load(path, options) -> Runner``; :data:`mnv4.deploy.formats.FORMATS` records which loader serves
which format, and :func:`mnv4.deploy.formats.load_runner` picks the loader of an artefact. Parity
checks and ``mnv4 bench`` both go through those records, so what is benchmarked is exactly what
was verified.

Every loader makes its runtime flush denormal floats to zero (``RunOptions.flush_denormals``), as
mobile runtimes do; how each one is told is in its format record (``Format.denormals``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MNv4Error, missing_extra

__all__ = [
    "Runner",
    "RunOptions",
    "load_onnx",
    "load_openvino",
    "load_litert",
    "load_executorch",
    "load_coreml",
    "load_torchscript",
    "load_pt2",
    "inspect_coreml",
    "join_outputs",
]

Runner = Callable[[np.ndarray], np.ndarray]


def _as_input(x: np.ndarray, float_dtype) -> np.ndarray:
    """Float inputs in the artefact's float type; uint8 pixels (mnv4.deploy.layout) as they are."""
    return x if x.dtype == np.uint8 else x.astype(float_dtype, copy=False)


@dataclass(frozen=True)
class RunOptions:
    threads: int | None = None  # intra-op threads (None: the runtime's default)
    precision: str = "fp32"  # what the artefact was exported as; OpenVINO pins its inference precision to it
    flush_denormals: bool = True
    # ONNX Runtime's intra-op threads busy-wait after each run (fastest for one session alone); turn it
    # off when several sessions alternate in one process, or their idle pools steal each other's cores.
    spin: bool = True


def _flush_calling_thread(options: RunOptions) -> None:
    # FTZ/DAZ for the thread that calls the runtime: torch kernels, and runtime kernels that run on
    # the caller (ExecuTorch/LiteRT ops left to their portable/builtin kernels).
    if options.flush_denormals:
        from ..perf.latency import flush_denormals

        flush_denormals()


def load_onnx(path: Path, options: RunOptions) -> Runner:
    try:
        import onnxruntime as ort
    except ImportError:
        raise missing_extra("onnxruntime", "onnx") from None
    opts = ort.SessionOptions()
    if options.threads:
        opts.intra_op_num_threads = options.threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not options.spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if options.flush_denormals:
        # Applies to the session's intra-op threads, and to the calling thread only if this is the
        # process's first session (ORT sets the main thread once); so set the caller ourselves too.
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
        _flush_calling_thread(options)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dtype = np.float16 if "float16" in inp.type else np.float32

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {inp.name: _as_input(x, dtype)})[0].astype(np.float32)

    return run


def load_openvino(path: Path, options: RunOptions) -> Runner:
    try:
        import openvino as ov
    except ImportError:
        raise missing_extra("openvino", "openvino") from None
    # OpenVINO's CPU plugin defaults to bf16 on CPUs that have it (1.9e-3 diff): pin the precision.
    config = {
        "INFERENCE_PRECISION_HINT": {"fp16": "f16", "bf16": "bf16"}.get(options.precision, "f32"),
        "CPU_DENORMALS_OPTIMIZATION": options.flush_denormals,
    }
    if options.threads:
        config["INFERENCE_NUM_THREADS"] = options.threads
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


def _quantize_io(x: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail["quantization"]
    if detail["dtype"] in (np.int8, np.uint8) and scale:  # static-int8 models take int8 inputs
        info = np.iinfo(detail["dtype"])
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(detail["dtype"])
    return x.astype(detail["dtype"], copy=False)


def _dequantize_io(y: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail["quantization"]
    if detail["dtype"] in (np.int8, np.uint8) and scale:
        return (y.astype(np.float32) - zero) * scale
    return y.astype(np.float32)


def load_litert(path: Path, options: RunOptions) -> Runner:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise missing_extra("ai-edge-litert", "litert") from None
    _flush_calling_thread(options)
    interp = Interpreter(model_path=str(path), num_threads=options.threads or None)
    inp, outs = interp.get_input_details()[0], _litert_outputs(interp)
    state = {"batch": int(inp["shape"][0])}
    interp.allocate_tensors()

    def run(x: np.ndarray) -> np.ndarray:
        if len(x) != state["batch"]:
            # TFLite tensors are static; resize the input when the batch changes.
            interp.resize_tensor_input(inp["index"], [len(x), *list(inp["shape"][1:])])
            interp.allocate_tensors()
            state["batch"] = len(x)
        interp.set_tensor(inp["index"], _quantize_io(x, inp))
        interp.invoke()
        return join_outputs([_dequantize_io(interp.get_tensor(out["index"]), out) for out in outs])

    return run


def _litert_outputs(interp) -> list[dict]:
    """The output tensors' details in the order of the model's signature (the graph's output order)."""
    signatures = interp.get_signature_list()
    if len(signatures) != 1:
        return interp.get_output_details()
    key, signature = next(iter(signatures.items()))
    details = interp.get_signature_runner(key).get_output_details()
    by_index = {d["index"]: d for d in interp.get_output_details()}
    return [by_index[details[name]["index"]] for name in signature["outputs"]]


def join_outputs(outputs: list[np.ndarray]) -> np.ndarray:
    """An artefact's outputs as one array: several are joined along the last axis, undoing the split of an
    output join by INT8 (mnv4.deploy.quantize.split_output_joins: a detector's class logits and box deltas)."""
    return outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=-1)


def _executorch_threads(threads: int) -> None:
    """Size ExecuTorch's own thread pool (XNNPACK's kernels run on it, not on torch's intra-op threads):
    it starts with one thread per core whatever ``torch.set_num_threads`` says, so without this a
    ``--threads 1`` timing of a .pte ran on every core while the other routes ran on one."""
    from executorch.extension.pybindings import portable_lib

    reset = getattr(portable_lib, "_unsafe_reset_threadpool", None)
    if reset is None:  # an ExecuTorch without the call: say so rather than time on a different thread count
        raise MNv4Error("this ExecuTorch cannot set its thread count; upgrade the executorch extra to time .pte files")
    if portable_lib._threadpool_get_thread_count() != threads:
        reset(threads)  # "unsafe" only while a method runs on the pool; nothing runs at load time


def load_executorch(path: Path, options: RunOptions) -> Runner:
    try:
        import torch
        from executorch.runtime import Runtime
    except ImportError:
        raise missing_extra("executorch", "executorch") from None
    if options.threads:
        torch.set_num_threads(options.threads)
        _executorch_threads(options.threads)
    _flush_calling_thread(options)
    program = Runtime.get().load_program(str(path))
    method = program.load_method("forward")

    def run(x: np.ndarray) -> np.ndarray:
        outputs = method.execute([torch.from_numpy(np.ascontiguousarray(x))])
        return join_outputs([y.float().numpy() for y in outputs])

    return run


def _torch_module_runner(module, options: RunOptions, dtype=None) -> Runner:
    import torch

    dtype = dtype or next((p.dtype for p in module.parameters()), torch.float32)

    def run(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x)
        with torch.inference_mode():  # uint8 pixels (mnv4.deploy.layout) go in as they are
            return module(t.to(dtype) if t.is_floating_point() else t).float().numpy()

    return run


def load_torchscript(path: Path, options: RunOptions) -> Runner:
    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    _flush_calling_thread(options)
    from .writers import TORCHSCRIPT_META

    extra = {TORCHSCRIPT_META: ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra).eval()
    recorded = str(extra[TORCHSCRIPT_META])
    dtype = torch.bfloat16 if "bfloat16" in recorded else torch.float16 if "float16" in recorded else torch.float32
    return _torch_module_runner(module, options, dtype)


def load_pt2(path: Path, options: RunOptions) -> Runner:
    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    _flush_calling_thread(options)
    return _torch_module_runner(torch.export.load(str(path)).module(), options)


def load_coreml(path: Path, options: RunOptions) -> Runner:
    try:
        import coremltools as ct
    except ImportError:
        raise missing_extra("coremltools", "coreml") from None
    if sys.platform != "darwin":
        raise MNv4Error("Core ML models can only be run on macOS (coremltools cannot predict on this platform)")
    model = ct.models.MLModel(str(path))
    name = model.get_spec().description.input[0].name

    def run(x: np.ndarray) -> np.ndarray:
        out = model.predict({name: x})
        return np.asarray(next(iter(out.values())), dtype=np.float32)

    return run


def inspect_coreml(path: Path) -> dict:
    """What can be verified of a Core ML package without macOS: its IO shapes and its op mix."""
    try:
        import coremltools as ct
    except ImportError:
        raise missing_extra("coremltools", "coreml") from None
    spec = ct.utils.load_spec(str(path))
    ops: dict[str, int] = {}
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                ops[op.type] = ops.get(op.type, 0) + 1
    ins = [list(i.type.multiArrayType.shape) for i in spec.description.input]
    outs = [list(o.type.multiArrayType.shape) for o in spec.description.output]
    return {"inputs": ins, "outputs": outs, "ops": dict(sorted(ops.items()))}
