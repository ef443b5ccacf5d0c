"""INT8 post-training quantization with calibration images, one route per runtime.

* ONNX Runtime: ``quantize_static`` in QDQ form, uint8 activations / int8 per-channel weights,
  after ``quant_pre_process`` (shape inference + graph cleanup); the fastest ORT int8 layout here.
* OpenVINO: NNCF ``quantize`` on the converted model.
* LiteRT and ExecuTorch: PyTorch 2 export (pt2e) quantization through ``torchao`` with the
  runtime's own quantizer (litert-torch's PT2EQuantizer, ExecuTorch's XNNPACKQuantizer).

All routes take the calibration batch as a float tensor [N, 3, R, R] already preprocessed.

``float_ends`` (ONNX Runtime and OpenVINO) keeps the stem conv and everything after the global pool
(head 1x1 conv, classifier) in float: under 2% of an MNv4's MACs, but the stem sees the raw
normalized image and the head produces the logits, so they cost most of the top-1 agreement lost
to INT8 (conv_medium on real photos: 96.8% -> 98.5% agreement, see docs/deploy.md). LiteRT and
ExecuTorch stay fully INT8: their mobile accelerators (EdgeTPU, DSP) need every op quantized.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import MNv4Error, missing_extra

__all__ = [
    "quantize_onnx",
    "quantize_openvino",
    "pt2e_quantize",
    "litert_quantizer",
    "xnnpack_quantizer",
    "float_end_ops",
    "calib_batches",
]

_POOLS = {"GlobalAveragePool", "ReduceMean", "AveragePool", "AvgPool"}
_COMPUTE = {"Conv", "Gemm", "MatMul", "Convolution", "GroupConvolution"}


def calib_batches(calib: torch.Tensor, batch: int) -> list:
    """The calibration set as numpy chunks of exactly ``batch`` rows (a fixed-batch artefact takes no
    other), the last one padded with the set's first rows."""
    n = -(-len(calib) // batch) * batch
    padded = calib[torch.arange(n) % len(calib)]
    return [padded[i : i + batch].numpy() for i in range(0, n, batch)]


def float_end_ops(ops: list[tuple[str, str]]) -> list[str]:
    """Names of the first compute op and of the compute ops after the last pooling op.

    ``ops`` is the graph's (name, op type) list in topological order (ONNX or OpenVINO op types).
    """
    compute = [i for i, (_, t) in enumerate(ops) if t in _COMPUTE]
    if not compute:
        return []
    pools = [i for i, (_, t) in enumerate(ops) if t in _POOLS]
    tail = [i for i in compute if pools and i > pools[-1]]
    return [ops[i][0] for i in sorted({compute[0], *tail})]


def quantize_onnx(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calib: torch.Tensor,
    float_ends: bool = True,
    batch: int = 1,
) -> None:
    """Static QDQ INT8 of an fp32 ONNX model (``float_ends``: see the module docstring)."""
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise missing_extra("onnxruntime", "onnx") from None
    import onnx

    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calib_batches(calib, batch))

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {input_name: x}

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        exclude = []
        if float_ends:
            nodes = onnx.load(str(pre), load_external_data=False).graph.node
            exclude = [n for n in float_end_ops([(n.name, n.op_type) for n in nodes]) if n]
        quantize_static(
            str(pre),
            str(out_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=exclude,
        )


def quantize_openvino(ov_model, calib: torch.Tensor, float_ends: bool = True, batch: int = 1):
    """NNCF post-training INT8 of an ``openvino.Model`` (``float_ends``: see the module docstring)."""
    try:
        import nncf
    except ImportError:
        raise missing_extra("nncf", "openvino") from None
    chunks = calib_batches(calib, batch)
    dataset = nncf.Dataset(chunks)
    kw = {}
    if float_ends:
        ops = [(op.get_friendly_name(), op.get_type_name()) for op in ov_model.get_ordered_ops()]
        kw["ignored_scope"] = nncf.IgnoredScope(names=float_end_ops(ops))
    return nncf.quantize(ov_model, dataset, subset_size=len(chunks), **kw)


def litert_quantizer():
    """litert-torch's PT2EQuantizer, symmetric per-channel INT8 (what LiteRT's converter folds)."""
    try:
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    except ImportError:
        raise missing_extra("litert-torch", "litert") from None
    return PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))


def xnnpack_quantizer():
    """ExecuTorch's XNNPACKQuantizer, symmetric per-channel INT8."""
    try:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
    except ImportError:
        raise missing_extra("executorch", "executorch") from None
    return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))


def pt2e_quantize(model: nn.Module, example: torch.Tensor, calib: torch.Tensor, quantizer, fold_quantize: bool = True):
    """PyTorch 2 export quantization with ``quantizer``, calibrated on ``calib``; the quantized GraphModule.

    ``fold_quantize=False`` keeps the weights' quantize ops in the graph (litert's converter folds
    them itself).
    """
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        # torch 2.14 no longer ships torch.ao's pt2e entry points; torchao is the home now.
        raise MNv4Error("torchao is not installed; INT8 for LiteRT/ExecuTorch needs it: pip install torchao") from None
    graph = torch.export.export(model.eval(), (example,)).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for chunk in calib_batches(calib, len(example)):  # the graph's batch is the example's
            prepared(torch.from_numpy(chunk))
    return convert_pt2e(prepared, fold_quantize=fold_quantize)
