"""Deployment as a table: one :class:`Format` record per export format.

Everything that differs between runtimes lives in its record: the artefact's suffix, the extra
that installs it, its writer and its loader, which precisions it offers and how, whether its
batch is dynamic, whether INT8 can keep the network's ends in float, the name ``mnv4 bench`` gives
its runtime, and how that runtime is told to flush denormals. :func:`~mnv4.deploy.export.export`,
:func:`load_runner`, ``mnv4 bench`` and the docs read only this table, so
adding a runtime means adding one record (plus its writer and loader).

Nothing here imports torch or a runtime: the CLI may read the table at start-up.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidValue, MNv4Error, check_int, missing_extra
from . import runners, writers

__all__ = [
    "Format",
    "FORMATS",
    "PRECISIONS",
    "get_format",
    "format_of",
    "format_for_runtime",
    "format_table",
    "load_runner",
]

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass(frozen=True)
class Format:
    name: str  # export format name: mnv4 export --format NAME
    title: str  # what it is, for tables
    suffix: str  # the artefact's suffix
    runtime: str  # the runtime's name in mnv4 bench
    extra: str | None  # pip extra installing it (None: needs only torch)
    packages: tuple[str, ...]  # modules the fp32/fp16 route imports (writer and runner)
    writer: Callable  # writers.write_*: (model, example, target, WriteJob) -> None
    loader: Callable  # runners.load_*: (path, RunOptions) -> Runner
    fp16: str | None  # how fp16 is made, None where there is no fp16 route
    int8: str | None  # the INT8 route, None where there is none
    dynamic_batch: bool  # exported with a dynamic batch dimension
    float_ends: bool  # INT8 can keep the stem conv and the post-pool head in float
    denormals: str  # how its runtime is made to flush denormals to zero
    half_model: bool = False  # fp16: the torch model is cast to half before writing (else the converter does it)
    int8_packages: tuple[str, ...] = ()  # further modules the INT8 route imports
    other_suffixes: tuple[str, ...] = ()  # also recognised when loading
    predicts_on: tuple[str, ...] = ()  # sys.platform values where its runtime can run; () = anywhere
    inspect: Callable[[Path], dict] | None = None  # structure check where the runtime cannot run
    bench_default: bool = False  # in mnv4 bench's default runtime list
    uint8_input: bool = True  # can take uint8 pixels with the normalisation in the graph (mnv4.deploy.layout)
    fixed_batch: bool = True  # can be exported for a fixed batch N
    bf16: str | None = None  # how bf16 runs, None where there is no bf16 route (needs a CPU with it: cpu.bf16_support)
    # INT8 cuts a concat joining the outputs (a detector's class logits and box deltas) into separate outputs,
    # each with its own scale (mnv4.deploy.quantize.split_output_joins); its loader joins them again
    int8_split_outputs: bool = False

    @property
    def precisions(self) -> tuple[str, ...]:
        half = (("fp16",) if self.fp16 else ()) + (("bf16",) if self.bf16 else ())
        return ("fp32",) + half + (("int8",) if self.int8 else ())

    def missing(self, precision: str = "fp32") -> list[str]:
        """The modules this route needs that are not installed."""
        needed = self.packages + (self.int8_packages if precision == "int8" else ())
        return [p for p in needed if not _importable(p)]

    def installed(self, precision: str = "fp32") -> bool:
        return not self.missing(precision)

    def can_run(self) -> bool:
        """Whether its runtime can execute artefacts on this platform."""
        return not self.predicts_on or sys.platform in self.predicts_on

    def require(self, precision: str = "fp32") -> None:
        """Raise one clear error if ``precision`` has no route here or a needed package is missing."""
        if precision not in PRECISIONS:
            raise InvalidValue("precision", precision, f"choose one of {', '.join(PRECISIONS)}")
        if precision not in self.precisions:
            others = [f.name for f in FORMATS.values() if precision in f.precisions]
            raise MNv4Error(
                f"{self.name} has no {precision} route in mnv4; it offers {', '.join(self.precisions)} "
                f"({precision}: {', '.join(others)})"
            )
        missing = self.missing(precision)
        if missing:
            raise missing_extra(", ".join(missing), self.extra or "deploy")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


_XNNPACK_DENORMALS = (
    "XNNPACK runs every operator with pthreadpool's PTHREADPOOL_FLAG_DISABLE_DENORMALS (FTZ/DAZ on each "
    "worker for the call, no option needed); mnv4 also sets FTZ/DAZ on the calling thread for ops left to "
    "the {rest} kernels"
)

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            name="onnx",
            title="ONNX (ONNX Runtime, CPU execution provider)",
            suffix=".onnx",
            runtime="onnxruntime",
            extra="onnx",
            packages=("onnx", "onnxscript", "onnxruntime"),
            writer=writers.write_onnx,
            loader=runners.load_onnx,
            fp16="model cast to half, fp16 graph",
            int8="onnxruntime quantize_static (QDQ, U8 activations / S8 per-channel weights)",
            dynamic_batch=True,
            float_ends=True,
            denormals=(
                "session config `session.set_denormal_as_zero=1` (FTZ/DAZ on the session's intra-op threads; ORT "
                "sets the calling thread only for the first session of a process, so mnv4 sets it too)"
            ),
            half_model=True,
            bench_default=True,
        ),
        Format(
            name="openvino",
            title="OpenVINO IR (OpenVINO CPU plugin)",
            suffix=".xml",
            runtime="openvino",
            extra="openvino",
            packages=("openvino",),
            int8_packages=("nncf",),
            writer=writers.write_openvino,
            loader=runners.load_openvino,
            fp16="fp16-compressed weights, `INFERENCE_PRECISION_HINT=f16`",
            int8="NNCF post-training quantization",
            dynamic_batch=True,
            float_ends=True,
            denormals="compile property `CPU_DENORMALS_OPTIMIZATION=True`",
            bench_default=True,
            bf16="fp32 IR, `INFERENCE_PRECISION_HINT=bf16`",
        ),
        Format(
            name="litert",
            title="LiteRT / TFLite flatbuffer (ai-edge-litert interpreter, XNNPACK delegate)",
            suffix=".tflite",
            runtime="litert",
            extra="litert",
            packages=("litert_torch", "ai_edge_litert"),
            int8_packages=("torchao",),
            writer=writers.write_litert,
            loader=runners.load_litert,
            fp16=None,
            int8="pt2e + litert-torch PT2EQuantizer, every layer INT8, int8 IO",
            int8_split_outputs=True,
            dynamic_batch=False,
            float_ends=False,
            denormals=_XNNPACK_DENORMALS.format(rest="TFLite builtin"),
            bench_default=True,
        ),
        Format(
            name="executorch",
            title="ExecuTorch program (XNNPACK delegate)",
            suffix=".pte",
            runtime="executorch",
            extra="executorch",
            packages=("executorch",),
            int8_packages=("torchao",),
            writer=writers.write_executorch,
            loader=runners.load_executorch,
            fp16=None,
            int8="pt2e + XNNPACKQuantizer, every layer INT8, lowered to XNNPACK",
            int8_split_outputs=True,
            dynamic_batch=False,
            float_ends=False,
            denormals=_XNNPACK_DENORMALS.format(rest="portable"),
            bench_default=True,
        ),
        Format(
            name="coreml",
            title="Core ML ML Program (macOS/iOS only)",
            suffix=".mlpackage",
            runtime="coreml",
            extra="coreml",
            packages=("coremltools",),
            writer=writers.write_coreml,
            loader=runners.load_coreml,
            fp16="`compute_precision=FLOAT16`",
            int8=None,
            dynamic_batch=False,
            float_ends=False,
            denormals="not configurable from Python; Apple's runtime decides",
            other_suffixes=(".mlmodel",),
            predicts_on=("darwin",),
            inspect=runners.inspect_coreml,
            uint8_input=False,  # an ML Program takes fp16/fp32/int32 arrays; pixels would go through an ImageType
        ),
        Format(
            name="torchscript",
            title="TorchScript (traced and frozen)",
            suffix=".pt",
            runtime="torchscript",
            extra=None,
            packages=(),
            writer=writers.write_torchscript,
            loader=runners.load_torchscript,
            fp16="model cast to half",
            int8=None,
            dynamic_batch=True,
            float_ends=False,
            denormals="`torch.set_flush_denormal(True)` (mnv4.perf.latency.flush_denormals)",
            half_model=True,
            bf16="model cast to bfloat16",
            other_suffixes=(".ts",),
            fixed_batch=False,  # a trace keeps the batch symbolic
        ),
        Format(
            name="pt2",
            title="torch.export program (torch.export.save)",
            suffix=".pt2",
            runtime="pt2",
            extra=None,
            packages=(),
            writer=writers.write_pt2,
            loader=runners.load_pt2,
            fp16="model cast to half",
            int8=None,
            dynamic_batch=True,
            float_ends=False,
            denormals="`torch.set_flush_denormal(True)` (mnv4.perf.latency.flush_denormals)",
            half_model=True,
            bf16="model cast to bfloat16",
        ),
    )
}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise InvalidValue("format", name, f"choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def format_of(path: str | os.PathLike) -> Format:
    """The format an artefact's suffix names."""
    suffix = Path(path).suffix.lower()
    for f in FORMATS.values():
        if suffix in (f.suffix, *f.other_suffixes):
            return f
    known = ", ".join(s for f in FORMATS.values() for s in (f.suffix, *f.other_suffixes))
    raise MNv4Error(f"cannot tell the format of {path}; known suffixes: {known}")


def format_for_runtime(runtime: str) -> Format | None:
    """The format whose runtime ``mnv4 bench`` calls ``runtime`` (None for in-process torch runtimes)."""
    return next((f for f in FORMATS.values() if f.runtime == runtime), None)


def format_table() -> str:
    """The per-format Markdown table of docs/deploy.md, generated from the records."""
    head = (
        "| format | suffix | install | bench runtime | batch (`--batch`) | uint8 input | fp16 | bf16 | INT8 route "
        "| INT8 float ends |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for f in FORMATS.values():
        install = f"`mnv4[{f.extra}]`" if f.extra else "(torch)"
        if f.dynamic_batch:
            batch = "dynamic (default) or fixed N" if f.fixed_batch else "dynamic only"
        else:
            batch = "fixed N (default 1)"
        lines.append(
            f"| `{f.name}` | `{f.suffix}` | {install} | `{f.runtime}` | {batch} | {'yes' if f.uint8_input else 'no'} "
            f"| {f.fp16 or 'no'} | {f.bf16 or 'no'} | {f.int8 or 'none'} | {'yes' if f.float_ends else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def load_runner(
    path: str | os.PathLike,
    fmt: str | None = None,
    threads: int | None = None,
    precision: str = "fp32",
    flush_denormals: bool = True,
) -> runners.Runner:
    """A callable running the artefact at ``path`` in its runtime (format from the suffix unless
    ``fmt`` is given); the loader is the format record's (:mod:`mnv4.deploy.runners`)."""
    path = Path(path)
    if not path.exists():
        raise MNv4Error(f"no such artefact: {path}")
    if threads is not None:
        check_int("threads", threads, 1)
    info = get_format(fmt) if fmt else format_of(path)
    info.require(precision)
    return info.loader(path, runners.RunOptions(threads, precision, flush_denormals))
