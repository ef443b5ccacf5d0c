"""Export a model to a deployment format, then prove it: run the artefact, compare with eager PyTorch.

``export(model, "onnx", "m.onnx")`` fuses the model, writes the artefact atomically, loads it back
in its own runtime, compares its outputs with the *unfused* eager model on sample inputs (real
images when given, seeded noise otherwise) and saves ``m.onnx.parity.json``. A failed comparison
raises :class:`~mnv4.deploy.parity.ParityError`; the artefact and its report are left for inspection.

Every runtime is an optional extra imported only by the route that needs it.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import MNv4Error, missing_extra
from .calib import load_images, random_inputs
from .fuse import fuse
from .parity import CRITERIA, ParityError, ParityReport, compare, run_batches, save_report
from .runners import load_runner

__all__ = ["FORMATS", "FormatInfo", "ExportResult", "export", "export_program"]


@dataclass(frozen=True)
class FormatInfo:
    suffix: str
    extra: str
    dynamic_batch: bool
    fp16: bool
    int8: str | None  # the INT8 route, None where there is none


FORMATS: dict[str, FormatInfo] = {
    "onnx": FormatInfo(".onnx", "onnx", True, True, "onnxruntime quantize_static (QDQ, U8/S8 per-channel)"),
    "openvino": FormatInfo(".xml", "openvino", True, True, "NNCF post-training quantization"),
    "litert": FormatInfo(".tflite", "litert", False, False, "pt2e + litert-torch PT2EQuantizer (int8 IO)"),
    "executorch": FormatInfo(".pte", "executorch", False, False, "pt2e + XNNPACKQuantizer, XNNPACK delegate"),
    "coreml": FormatInfo(".mlpackage", "coreml", False, True, None),
    "torchscript": FormatInfo(".pt", "", True, True, None),
    "pt2": FormatInfo(".pt2", "", True, True, None),
}


@dataclass
class ExportResult:
    path: Path
    report: ParityReport


def export_program(model: nn.Module, example: torch.Tensor, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension.

    A batch-1 example would let export specialise the batch to the constant 1, so the example is
    repeated to batch 2 and the batch dim marked ``Dim.AUTO``.
    """
    if not dynamic_batch:
        return torch.export.export(model, (example[:1],))
    x = example[:1].expand(2, *example.shape[1:]).contiguous()
    return torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))


def _write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir / path.name)`` then move everything it produced next to ``path``, the main
    artefact last, so a crash never leaves a half-written artefact (OpenVINO writes .xml + .bin,
    Core ML a directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        target = Path(tmp) / path.name
        write(target)
        if not target.exists():
            raise MNv4Error(f"the exporter wrote no {path.name}")
        produced = sorted(Path(tmp).iterdir(), key=lambda p: p == target)
        for item in produced:
            dest = path.parent / item.name
            if dest.is_dir() and item.is_dir():
                shutil.rmtree(dest)
            os.replace(item, dest)
    return path


# --- one writer per format ------------------------------------------------------------------------


def _onnx_export(model: nn.Module, example: torch.Tensor, target: Path) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise missing_extra("onnx and onnxscript", "onnx") from None
    ep = export_program(model, example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(ep, (example,), dynamo=True, external_data=False, optimize=True, verbose=False)
    program.save(str(target))


def _write_onnx(model, example, target, precision, calib, float_ends: bool = True) -> None:
    if precision != "int8":
        _onnx_export(model, example, target)
        return
    from .quantize import quantize_onnx

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        _onnx_export(model, example, fp32)
        quantize_onnx(fp32, target, calib, float_ends=float_ends)


def _write_openvino(model, example, target, precision, calib, float_ends: bool = True) -> None:
    try:
        import openvino as ov
    except ImportError:
        raise missing_extra("openvino", "openvino") from None
    ov_model = ov.convert_model(export_program(model, example))
    if precision == "int8":
        from .quantize import quantize_openvino

        ov_model = quantize_openvino(ov_model, calib, float_ends=float_ends)
    # save_model compresses weights to fp16 by default; keep fp32 weights unless fp16 was asked for.
    ov.save_model(ov_model, str(target), compress_to_fp16=precision == "fp16")


def _write_litert(model, example, target, precision, calib) -> None:
    try:
        import litert_torch
    except ImportError:
        raise missing_extra("litert-torch", "litert") from None
    x = example[:1]
    if precision == "int8":
        from litert_torch.quantize.quant_config import QuantConfig

        from .quantize import pt2e_quantize

        qmodel, quantizer = pt2e_quantize(model, x, calib, "litert")
        edge = litert_torch.convert(qmodel, (x,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
    else:
        edge = litert_torch.convert(model, (x,))
    edge.export(str(target))


def _write_executorch(model, example, target, precision, calib) -> None:
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError:
        raise missing_extra("executorch", "executorch") from None
    x = example[:1]
    if precision == "int8":
        from .quantize import pt2e_quantize

        model, _ = pt2e_quantize(model, x, calib, "executorch")
    ep = torch.export.export(model, (x,))
    # Always lower to XNNPACK: a portable-kernel-only .pte is correct but ~300x slower.
    program = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    target.write_bytes(program.buffer)


def _write_coreml(model, example, target, precision, calib) -> None:
    try:
        import coremltools as ct
    except ImportError:
        raise missing_extra("coremltools", "coreml") from None
    x = example[:1]
    # Only the torch.export frontend works with numpy 2 (the TorchScript one crashes).
    ep = torch.export.export(model, (x,)).run_decompositions({})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlmodel = ct.convert(
            ep,
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
            minimum_deployment_target=ct.target.iOS16,
        )
    mlmodel.save(str(target))


def _write_torchscript(model, example, target, precision, calib) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.trace is deprecated in favour of torch.export, still works
        traced = torch.jit.trace(model, example[:1], check_trace=False)
        traced = torch.jit.freeze(traced.eval())
    traced.save(str(target))


def _write_pt2(model, example, target, precision, calib) -> None:
    torch.export.save(export_program(model, example), str(target))


_WRITERS = {
    "onnx": _write_onnx,
    "openvino": _write_openvino,
    "litert": _write_litert,
    "executorch": _write_executorch,
    "coreml": _write_coreml,
    "torchscript": _write_torchscript,
    "pt2": _write_pt2,
}


# --- checks -----------------------------------------------------------------------------------------


def _coreml_structure(path: Path, example: torch.Tensor, num_classes: int) -> dict:
    """What can be verified of a Core ML package without macOS: its IO shapes and its op mix."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    ops: dict[str, int] = {}
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                ops[op.type] = ops.get(op.type, 0) + 1
    ins = [list(i.type.multiArrayType.shape) for i in spec.description.input]
    outs = [list(o.type.multiArrayType.shape) for o in spec.description.output]
    return {"inputs": ins, "outputs": outs, "ops": dict(sorted(ops.items())), "expected_input": list(example[:1].shape)}


def _eager(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([model(x[i : i + 8]) for i in range(0, len(x), 8)]).float().numpy()


def _inputs(model, resolution, samples, calib_samples, calib_dir, eval_dir, need_calib):
    """(parity inputs, their labels or None, where they came from, calibration batch or None).

    Calibration takes the first images of ``calib_dir``; parity uses ``eval_dir`` when given, else
    the calibration folder's next (held-out) images, else seeded noise."""
    pp = _preprocess(model)
    classes = getattr(model, "class_names", None)
    calib = held_out = None
    if calib_dir and (need_calib or not eval_dir):
        n_calib = calib_samples if need_calib else 0
        s = load_images(calib_dir, pp, resolution, limit=n_calib + samples, model_classes=classes)
        calib = s.images[:n_calib] if need_calib else None
        if len(s.images) > n_calib:
            labels = s.labels[n_calib:] if s.labels is not None else None
            held_out = (s.images[n_calib:], labels, f"held-out images from {calib_dir}")
    if eval_dir:
        s = load_images(eval_dir, pp, resolution, limit=samples, model_classes=classes)
        return s.images, s.labels, f"images from {eval_dir}", calib
    if held_out is not None:
        return (*held_out, calib)
    in_chans = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    return random_inputs(samples, resolution, in_chans), None, "seeded N(0,1) noise", calib


def _preprocess(model):
    from ..models.registry import Preprocess

    return getattr(model, "preprocess", None) or Preprocess()


def export(
    model: nn.Module,
    fmt: str,
    output: str | os.PathLike | None = None,
    resolution: int | None = None,
    precision: str = "fp32",
    calib_dir: str | os.PathLike | None = None,
    eval_dir: str | os.PathLike | None = None,
    calib_data: torch.Tensor | None = None,
    samples: int = 16,
    calib_samples: int = 128,
    min_top1: float | None = None,
    threads: int | None = None,
    verbose: bool = True,
    int8_all_layers: bool = False,
) -> ExportResult:
    """Export ``model`` to ``fmt`` (see :data:`FORMATS`) and check the artefact against eager PyTorch.

    Args:
        precision: ``fp32``, ``fp16`` or ``int8`` (int8 needs ``calib_dir``: an image folder, flat or
            one sub-folder per class).
        eval_dir: a labelled image folder (ImageFolder layout) to compare on and to report the
            accuracy delta with; otherwise held-out calibration images or seeded noise are used.
        calib_data: a preprocessed calibration batch [N, C, R, R], instead of ``calib_dir``.
        min_top1: also require this top-1 agreement with eager fp32 (0..1).
        int8_all_layers: ONNX/OpenVINO INT8 keep the stem conv and the head (after the global
            pool) in float unless this is set (see :mod:`mnv4.deploy.quantize`); LiteRT and
            ExecuTorch always quantize every layer.
    """
    if fmt not in FORMATS:
        raise MNv4Error(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    info = FORMATS[fmt]
    if precision not in CRITERIA:
        raise MNv4Error(f"precision must be fp32, fp16 or int8, got {precision!r}")
    if precision == "int8" and info.int8 is None:
        have = ", ".join(f for f, i in FORMATS.items() if i.int8)
        raise MNv4Error(f"{fmt} has no INT8 route in mnv4; use one of: {have}")
    if precision == "fp16" and not info.fp16:
        raise MNv4Error(f"{fmt} export has no fp16 mode here; use fp32 or int8")
    if precision == "int8" and calib_dir is None and calib_data is None:
        raise MNv4Error("INT8 export needs calibration images: pass --calib DIR")
    model = model.eval().float()
    resolution = resolution or _preprocess(model).input_size
    name = getattr(getattr(model, "spec", None), "name", type(model).__name__)
    path = Path(output) if output else Path(f"{name}_{resolution}_{precision}{info.suffix}")
    if path.suffix.lower() != info.suffix:
        raise MNv4Error(f"a {fmt} artefact must end in {info.suffix}, got {path.name}")

    need_calib = precision == "int8" and calib_data is None
    x, labels, source, calib = _inputs(model, resolution, samples, calib_samples, calib_dir, eval_dir, need_calib)
    if calib_data is not None and precision == "int8":
        calib = calib_data.float()
    deploy_model = fuse(model)
    if precision == "fp16" and fmt in ("torchscript", "pt2", "onnx"):
        deploy_model = deploy_model.half()
    example = x[:2].to(next(deploy_model.parameters()).dtype)
    float_ends = precision == "int8" and fmt in ("onnx", "openvino") and not int8_all_layers
    kw = {"float_ends": float_ends} if fmt in ("onnx", "openvino") else {}
    _write_atomically(path, lambda target: _WRITERS[fmt](deploy_model, example, target, precision, calib, **kw))

    criteria = CRITERIA[precision]
    if min_top1 is not None:
        criteria = replace(criteria, min_top1=min_top1)
    report = ParityReport(fmt, precision, str(path), len(x), list(x.shape[1:]))
    report.notes.append(f"reference: eager PyTorch fp32, unfused; inputs: {source}")
    if float_ends:
        report.notes.append("int8: stem conv and head (after the global pool) kept in float")
    reference = _eager(model, x)
    if fmt == "coreml" and platform.system() != "Darwin":
        st = report.structure = _coreml_structure(path, x, reference.shape[1])
        report.notes.append("numerics not checked: Core ML prediction needs macOS; IO shapes and ops verified")
        report.criteria = {"inputs": "match example", "outputs": "[1, num_classes]"}
        if st["inputs"] != [list(x[:1].shape)] or st["outputs"] != [[1, reference.shape[1]]]:
            report.failures.append(f"unexpected IO shapes {st['inputs']} -> {st['outputs']}")
        report.passed = not report.failures
    else:
        run = load_runner(path, fmt, threads=threads, **({"precision": precision} if fmt == "openvino" else {}))
        batch = len(x) if info.dynamic_batch else 1
        out = run_batches(run, x.numpy(), batch)
        report.batch_sizes = sorted({1, batch} if info.dynamic_batch else {1})
        if info.dynamic_batch and len(x) > 1:
            # Dynamic batch must really be dynamic: batch 1 must give the same rows as the big batch.
            single = run_batches(run, x[:1].numpy(), 1)
            # int8 kernels may pick other blockings per batch size, so allow the format's own noise.
            tol = {"fp32": 1e-4, "fp16": 1e-2, "int8": 5e-2}[precision] * float(np.abs(out).max())
            report.dynamic_batch = bool(np.abs(single - out[:1]).max() <= tol)
            if not report.dynamic_batch:
                report.failures.append("batch-1 and batched outputs differ")
        compare(reference, out, report, criteria, labels)
    save_report(report)
    if verbose:
        print(report.summary())
    if not report.passed:
        raise ParityError(f"{path} failed its parity check: {'; '.join(report.failures)} (see {path}.parity.json)")
    return ExportResult(path, report)
