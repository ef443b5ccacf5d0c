"""INT8 post-training quantization with calibration images, one route per runtime.

* ONNX Runtime: ``quantize_static`` in QDQ form, uint8 activations / int8 per-channel weights,
  after ``quant_pre_process`` (shape inference + graph cleanup); the fastest ORT int8 layout here.
  Weights are 7-bit (``reduce_range``) when exported on an x86 CPU without VNNI, where ORT's
  uint8 x int8 kernels add product pairs in int16 with saturation (docs/deploy.md, "INT8 on CPUs
  without VNNI"); ``PTQSettings.reduce_range`` overrides it.
* OpenVINO: NNCF ``quantize`` on the converted model.
* LiteRT and ExecuTorch: PyTorch 2 export (pt2e) quantization through ``torchao`` with the
  runtime's own quantizer (litert-torch's PT2EQuantizer, ExecuTorch's XNNPACKQuantizer).

All routes take the calibration batch as a float tensor [N, 3, R, R] already preprocessed.

``float_ends`` (ONNX Runtime and OpenVINO) keeps the stem conv and everything after the global pool
(head 1x1 conv, classifier) in float: under 2% of an MNv4's MACs, but the stem sees the raw
normalized image and the head produces the logits, so they cost most of the top-1 agreement lost
to INT8 (conv_medium on real photos: 96.8% -> 98.5% agreement, see docs/deploy.md). LiteRT and
ExecuTorch quantize every layer: their mobile accelerators (EdgeTPU, DSP) need every op in INT8. Two
things make that hold for a detector there (docs/detection.md, "AP before and after"): every call of a
layer applied several times (the head, once per pyramid level) is quantized (:func:`unshare_weights`;
litert-torch's quantizer left all but the first float), and a concat joining the outputs
(:func:`output_joins`: class logits, -35..10, and box deltas, about +-1) is cut into separate outputs
with their own int8 scales (:func:`split_output_joins`) that the runners join again; the other concats get
one scale over all their inputs (:func:`annotate_cats`). A classifier's graph has neither: unchanged.
On ONNX Runtime the float ends also take the graph's output assembly (:func:`output_tail_nodes`): a
detector's predictor convs and the reshapes and concat joining class logits and box deltas into one
output, which ORT's QDQ would otherwise give one uint8 scale for both ranges (docs/detection.md).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import MNv4Error, missing_extra
from .ptq import DEFAULT_PTQ, PTQSettings

__all__ = [
    "quantize_onnx",
    "quantize_openvino",
    "pt2e_quantize",
    "litert_quantizer",
    "xnnpack_quantizer",
    "float_end_ops",
    "output_tail_nodes",
    "output_joins",
    "unshare_weights",
    "calib_batches",
    "onnx_layer_nodes",
    "openvino_layer_ops",
]

_POOLS = {"GlobalAveragePool", "ReduceMean", "AveragePool", "AvgPool"}
_COMPUTE = {"Conv", "Gemm", "MatMul", "Convolution", "GroupConvolution"}
_CATS = (torch.ops.aten.cat.default, torch.ops.aten.concat.default)


def calib_batches(calib: torch.Tensor, batch: int) -> list:
    """The calibration set as numpy chunks of exactly ``batch`` rows (a fixed-batch artefact takes no
    other), the last one padded with the set's first rows."""
    n = -(-len(calib) // batch) * batch
    padded = calib[torch.arange(n) % len(calib)]
    return [padded[i : i + batch].numpy() for i in range(0, n, batch)]


def _is_layer(path: str, name: str) -> bool:
    # a model behind mnv4.deploy.layout's input conversion sits under "model."
    return path in (name, f"model.{name}")


def onnx_layer_nodes(model_proto, layers: tuple[str, ...]) -> list[str]:
    """The ONNX nodes computing the given module paths (torch's exporter records each node's module
    path in its ``namespace`` metadata: ``.../stages.1.0.conv: torch.nn.modules.conv.Conv2d/conv2d_3: ...``)."""
    found: dict[str, list[str]] = {name: [] for name in layers}
    for node in model_proto.graph.node:
        if node.op_type not in _COMPUTE:
            continue
        scopes = next((p.value for p in node.metadata_props if p.key == "namespace"), "").split("/")
        module = scopes[-2].split(":")[0] if len(scopes) >= 2 else ""
        for name in layers:
            if _is_layer(module, name):
                found[name].append(node.name)
    _require_found(found)
    return [n for names in found.values() for n in names]


def openvino_layer_ops(program, ov_model, layers: tuple[str, ...]) -> list[str]:
    """The OpenVINO ops computing the given module paths: ``program`` (the ExportedProgram converted)
    maps module paths to its fx nodes, whose names OpenVINO keeps as its ops' name prefix (with
    ``conv2d`` spelled ``convolution``)."""
    fx: dict[str, str] = {}
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" else None
        if stack and any(t in str(node.target) for t in ("conv2d", "convolution", "linear")):
            fx[node.name] = list(stack.values())[-1][0]
    prefixes = {name: {f for f, path in fx.items() if _is_layer(path, name)} for name in layers}
    prefixes = {k: v | {f.replace("conv2d", "convolution") for f in v} for k, v in prefixes.items()}
    found: dict[str, list[str]] = {name: [] for name in layers}
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() in _COMPUTE:
            head = op.get_friendly_name().split("/")[0]
            for name, heads in prefixes.items():
                if head in heads:
                    found[name].append(op.get_friendly_name())
    _require_found(found)
    return [n for names in found.values() for n in names]


def _require_found(found: dict[str, list[str]]) -> None:
    missing = [name for name, nodes in found.items() if not nodes]
    if missing:
        raise MNv4Error(
            f"no conv/linear layer named {', '.join(missing)} in the exported graph (`keep_float_layers`; "
            "`mnv4 quantize analyze` lists the layers)"
        )


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


def output_tail_nodes(graph) -> list[str]:
    """Names of the ONNX nodes with no compute node downstream: the last compute ops and what only
    rearranges their results (a classifier's final Gemm; a detector's predictor convs, reshapes, concat)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    feeds: dict[int, bool] = {}
    for node in reversed(graph.node):  # ONNX lists nodes in topological order: consumers are seen first
        nexts = [c for out in node.output for c in consumers.get(out, [])]
        feeds[id(node)] = any(c.op_type in _COMPUTE or feeds[id(c)] for c in nexts)
    return [node.name for node in graph.node if not feeds[id(node)] and node.name]


def quantize_onnx(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calib: torch.Tensor,
    float_ends: bool = True,
    batch: int = 1,
    keep_float: tuple[str, ...] = (),
    settings: PTQSettings = DEFAULT_PTQ,
) -> None:
    """Static QDQ INT8 of an fp32 ONNX model (``float_ends``: see the module docstring; ``keep_float``:
    module paths left float; ``settings``: calibration method and weight granularity)."""
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
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

    kept = onnx_layer_nodes(onnx.load(str(fp32_path), load_external_data=False), keep_float) if keep_float else []
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        exclude = list(kept)
        if float_ends:
            graph = onnx.load(str(pre), load_external_data=False).graph
            exclude += [n for n in float_end_ops([(n.name, n.op_type) for n in graph.node]) if n]
            exclude += output_tail_nodes(graph)
        quantize_static(
            str(pre),
            str(out_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=settings.per_channel,
            reduce_range=settings.onnx_reduce_range,
            nodes_to_exclude=exclude,
            calibrate_method=_ORT_CALIBRATION[settings.calibration or "minmax"](CalibrationMethod),
            extra_options={"CalibPercentile": PERCENTILE} if settings.calibration == "percentile" else {},
        )


PERCENTILE = 99.999  # ORT's own default for its percentile calibrator
_ORT_CALIBRATION = {
    "minmax": lambda m: m.MinMax,
    "percentile": lambda m: m.Percentile,
    "entropy": lambda m: m.Entropy,
}


def _nncf_options(nncf, settings: PTQSettings) -> dict:
    """nncf.quantize keyword arguments for ``settings`` (only what differs from NNCF's defaults)."""
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        QuantizationParameters,
    )
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    kw: dict = {}
    if settings.nncf_preset:
        kw["preset"] = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}[
            settings.nncf_preset
        ]
    if settings.bias_correction == "full":
        kw["fast_bias_correction"] = False
    advanced: dict = {}
    if settings.bias_correction == "none":
        advanced["disable_bias_correction"] = True
    if settings.weight_granularity == "per-tensor":
        advanced["weights_quantization_params"] = QuantizationParameters(per_channel=False)
    if settings.calibration:
        ranges = {"minmax": "MINMAX", "percentile": "MEAN_QUANTILE"}[settings.calibration]
        advanced["activations_range_estimator_params"] = getattr(RangeEstimatorParametersSet, ranges)
    if advanced:
        kw["advanced_parameters"] = AdvancedQuantizationParameters(**advanced)
    return kw


def quantize_openvino(
    ov_model,
    calib: torch.Tensor,
    float_ends: bool = True,
    batch: int = 1,
    keep_float_ops: list[str] | None = None,
    settings: PTQSettings = DEFAULT_PTQ,
    validation: tuple | None = None,
):
    """NNCF post-training INT8 of an ``openvino.Model`` (``float_ends``: see the module docstring;
    ``keep_float_ops``: further op names left float; ``settings``: mnv4.deploy.ptq). With
    ``settings.max_accuracy_drop`` and ``validation`` (raw inputs, labels), NNCF's accuracy-controlled
    quantization reverts the layers that cost most to float until top-1 drops by at most that much."""
    try:
        import nncf
    except ImportError:
        raise missing_extra("nncf", "openvino") from None
    chunks = calib_batches(calib, batch)
    dataset = nncf.Dataset(chunks)
    kw = {}
    ignored = list(keep_float_ops or [])
    if float_ends:
        ops = [(op.get_friendly_name(), op.get_type_name()) for op in ov_model.get_ordered_ops()]
        ignored += float_end_ops(ops)
    if ignored:
        kw["ignored_scope"] = nncf.IgnoredScope(names=ignored)
    kw.update(_nncf_options(nncf, settings))
    if settings.max_accuracy_drop is None:
        return nncf.quantize(ov_model, dataset, subset_size=len(chunks), **kw)
    x, labels = validation
    items = [(x[i : i + batch].numpy(), labels[i : i + batch]) for i in range(0, len(x) - batch + 1, batch)]

    def top1(compiled, data) -> float:
        hits = [(np.asarray(compiled(inp)[0]).argmax(1) == y) for inp, y in data]
        return float(np.concatenate(hits).mean())

    if "advanced_parameters" in kw:
        kw["advanced_quantization_parameters"] = kw.pop("advanced_parameters")
    return nncf.quantize_with_accuracy_control(
        ov_model, dataset, nncf.Dataset(items, lambda item: item[0]), top1,
        max_drop=settings.max_accuracy_drop, subset_size=len(chunks), **kw,
    )  # fmt: skip


def litert_quantizer(per_channel: bool = True):
    """litert-torch's PT2EQuantizer, symmetric INT8, per-channel weights by default (what LiteRT's converter folds)."""
    try:
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    except ImportError:
        raise missing_extra("litert-torch", "litert") from None
    return PT2EQuantizer().set_global(fine_scales(get_symmetric_quantization_config(is_per_channel=per_channel)))


def xnnpack_quantizer(per_channel: bool = True):
    """ExecuTorch's XNNPACKQuantizer, symmetric INT8, per-channel weights by default."""
    try:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
    except ImportError:
        raise missing_extra("executorch", "executorch") from None
    return XNNPACKQuantizer().set_global(fine_scales(get_symmetric_quantization_config(is_per_channel=per_channel)))


# The smallest int8 scale the pt2e observers may pick: float32's epsilon, the observers' own default.
FINE_EPS = float(torch.finfo(torch.float32).eps)


def fine_scales(config, eps: float = FINE_EPS):
    """``config`` (a pt2e ``QuantizationConfig``) with every observer's smallest scale lowered to ``eps``.

    litert-torch's and ExecuTorch's symmetric configs floor every scale at 2**-12. A projection conv that
    carries a folded layer scale (the hybrids' ``gamma`` starts at 1e-5 and stays near 1e-3) has weights
    and outputs whose int8 step is far below that floor: its weights round to a few levels, and
    hybrid_medium's INT8 artefacts agreed with the float model on 22% of images (docs/deploy.md, "INT8 and
    layer scale"). With the floor at ``eps`` each scale follows the calibrated range, as ONNX Runtime's
    and NNCF's do."""
    import dataclasses

    def fine(spec):
        if spec is None or not hasattr(spec, "observer_or_fake_quant_ctr"):
            return spec
        ctr = spec.observer_or_fake_quant_ctr
        partial = getattr(ctr, "p", None)  # the observer class and its arguments (``Observer.with_args``)
        if partial is None or "eps" not in partial.keywords:
            return spec
        return dataclasses.replace(
            spec, observer_or_fake_quant_ctr=partial.func.with_args(**{**partial.keywords, "eps": eps})
        )

    return dataclasses.replace(
        config,
        input_activation=fine(config.input_activation),
        output_activation=fine(config.output_activation),
        weight=fine(config.weight),
    )


def output_joins(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The concats whose result is a graph output and nothing else: where a network joins its answers (a
    detector's class logits and box deltas), each with its own range."""
    outputs = {n for node in graph.nodes if node.op == "output" for n in node.all_input_nodes}
    return [
        n
        for n in outputs
        if n.op == "call_function" and n.target in _CATS
        and all(user.op == "output" for user in n.users)
    ]  # fmt: skip


def unshare_weights(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """One weight node per use: a layer applied several times (a detector's head, shared by every pyramid
    level) reads its weight through one node, and the pt2e annotators skip every call after the first
    (the weight is already annotated), leaving those calls float."""
    graph = model.graph
    for node in list(graph.nodes):
        if node.op != "get_attr" or len(node.users) < 2:
            continue
        for user in list(node.users)[1:]:
            with graph.inserting_before(user):
                copy = graph.get_attr(node.target)
            copy.meta = dict(node.meta)
            user.replace_input_with(node, copy)
    model.recompile()
    return model


def split_output_joins(model: torch.fx.GraphModule) -> int:
    """Cut each output join along the last axis: its inputs become graph outputs in its place, in order, each
    with its own int8 scale (a runner joins an artefact's outputs again, mnv4.deploy.runners). LiteRT's
    converter needs it: it turns a float concat of int8 tensors into an int8 one at one input's scale.
    Returns the number of outputs."""
    import torch.utils._pytree as pytree

    out = next(n for n in model.graph.nodes if n.op == "output")
    joins = set(output_joins(model.graph))
    leaves = pytree.tree_leaves(out.args[0])
    results: list = []
    for node in leaves:
        rank = node.meta["val"].dim() if node in joins else 0
        dim = node.args[1] if len(node.args) > 1 else 0
        results += list(node.args[0]) if rank and dim % rank == rank - 1 else [node]
    if results == leaves:
        return len(leaves)  # nothing to cut: the graph is left as it is (a classifier)
    out.args = (tuple(results),)
    # torch.export's module rebuilds its output from a tree spec: it now holds a tuple of the parts
    spec = pytree.tree_structure(tuple(results))
    codegen = model.graph._codegen
    codegen.pytree_info = codegen.pytree_info._replace(out_spec=spec)
    model._out_spec = spec
    model.graph.eliminate_dead_code()
    model.recompile()
    return len(results)


def annotate_cats(model: torch.fx.GraphModule, activation_qspec) -> None:
    """Give every concat the quantizer left unannotated one int8 scale for all its inputs and its output.
    litert-torch's quantizer finds concats by their source function, which a non-strict ``torch.export``
    does not record, and LiteRT's converter then quantizes the float concat at its last input's scale,
    clipping the others (a detector's pyramid levels: class logits of level 0 cut at +-2)."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    for node in model.graph.nodes:
        if node.target not in _CATS or "quantization_annotation" in node.meta or not node.all_input_nodes:
            continue
        first, *rest = node.args[0]
        shared = SharedQuantizationSpec((first, node))
        node.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map={first: activation_qspec, **{n: shared for n in rest}}, output_qspec=shared, _annotated=True
        )


def _quantize_every_call(quantizer):
    """``quantizer`` annotating every call of a shared layer (:func:`unshare_weights`) and every concat
    (:func:`annotate_cats`)."""
    from torchao.quantization.pt2e.quantizer import Quantizer

    class EveryCall(Quantizer):
        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            return unshare_weights(quantizer.transform_for_annotation(model))

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = quantizer.annotate(model) or model
            annotate_cats(model, quantizer.global_config.input_activation)
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            quantizer.validate(model)

        def prepare_obs_or_fq_callback(self, model, edge_or_node_to_obs_or_fq) -> None:
            quantizer.prepare_obs_or_fq_callback(model, edge_or_node_to_obs_or_fq)

    return EveryCall()


def pt2e_quantize(model: nn.Module, example: torch.Tensor, calib: torch.Tensor, quantizer, fold_quantize: bool = True):
    """PyTorch 2 export quantization with ``quantizer``, calibrated on ``calib``; the quantized GraphModule.
    Every call of every conv and every concat is quantized, and an output join is cut into separate outputs
    (:func:`split_output_joins`), so each gets its own scale.

    ``fold_quantize=False`` keeps the weights' quantize ops in the graph (litert's converter folds
    them itself).
    """
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        # torch 2.14 no longer ships torch.ao's pt2e entry points; torchao is the home now.
        raise MNv4Error("torchao is not installed; INT8 for LiteRT/ExecuTorch needs it: pip install torchao") from None
    graph = torch.export.export(model.eval(), (example,)).module()
    split_output_joins(graph)
    prepared = prepare_pt2e(graph, _quantize_every_call(quantizer))
    with torch.no_grad():
        for chunk in calib_batches(calib, len(example)):  # the graph's batch is the example's
            prepared(torch.from_numpy(chunk))
    return convert_pt2e(prepared, fold_quantize=fold_quantize)
