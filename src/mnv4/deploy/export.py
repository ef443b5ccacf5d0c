"""Export a model to a deployment format, then prove it: run the artefact, compare with eager PyTorch.

``export(model, "onnx", "m.onnx")`` fuses the model, writes the artefact atomically, loads it back
in its own runtime, compares its outputs with the *unfused* eager model on sample inputs (real
images when given, seeded noise otherwise) and saves ``m.onnx.parity.json``. A failed comparison
raises :class:`~mnv4.deploy.parity.ParityError`; the artefact and its report are left for inspection (as
``NAME.failed.EXT`` when an earlier artefact stood at the path: that one is kept).

What differs between formats is read from their records in :data:`mnv4.deploy.formats.FORMATS`.
The artefact holds the weights it was given: a checkpoint is exported as it is, whatever its
BatchNorm statistics. Only a model that was never given weights (random initialisation, for timing
and parity checks) gets realistic BatchNorm statistics first
(:func:`mnv4.models.recalibrate_batchnorm`), or any model when ``recalibrate_bn=True`` asks for it;
its report says so.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.images import BadImage, BadImageLog
from ..errors import MNv4Error, check_input_size
from ..files import check_output_path
from ..host import int8_support
from ..models.meta import weights_meta
from .formats import Format
from .fusion import fuse
from .inputs import load_images, random_inputs
from .layout import InputFormat
from .parity import (
    CRITERIA,
    INT8_MIN_TOP1,
    Criteria,
    ParityError,
    ParityReport,
    compare,
    parity_path,
    run_batches,
    save_report,
)
from .ptq import PTQSettings
from .requests import MAX_INPUT_SIZE, MIN_INPUT_SIZE, ExportRequest
from .runners import RunOptions
from .writers import WriteJob, export_program, previous_artefact_kept, write_atomically

__all__ = [
    "ExportRequest",
    "ExportResult",
    "export",
    "export_program",
    "MIN_INPUT_SIZE",
    "MAX_INPUT_SIZE",
    "RANDOM_INT8_MIN_COSINE",
    "RANDOM_INT8_MIN_CENTRED_COSINE",
    "never_given_weights",
    "artefact_path",
]

_RECALIBRATION_BATCHES, _RECALIBRATION_BATCH = 4, 8
RANDOM_INT8_MIN_COSINE = 0.5  # INT8 parity bar for random weights (see _criteria)
# ... and on what varies with the input (parity.Criteria.min_centred_cosine): real random-weight INT8
# exports give 0.44-0.93, an artefact that ignores its input 0 (benchmarks/int8_random_bar.py; the pass
# thresholds in docs/deploy.md).
RANDOM_INT8_MIN_CENTRED_COSINE = 0.3


@dataclass
class ExportResult:
    path: Path
    report: ParityReport


@dataclass
class _Inputs:
    x: torch.Tensor  # parity inputs
    labels: np.ndarray | None
    source: str
    calib: torch.Tensor | None
    unreadable: list[BadImage]


def _in_chans(model: nn.Module) -> int:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


def _inputs(model, input_size, samples, calib_samples, calib_dir, eval_dir, need_calib, progress) -> _Inputs:
    """Calibration takes the first images of ``calib_dir``; parity uses ``eval_dir`` when given, else
    the calibration folder's next (held-out) images, else seeded noise."""
    meta = weights_meta(model)
    pp, classes = meta.preprocess, list(meta.class_names) if meta.class_names else None
    log = BadImageLog(verbose=bool(progress) or progress is None)
    calib = held_out = None
    unreadable: list[BadImage] = []
    if calib_dir and (need_calib or not eval_dir):
        n_calib = calib_samples if need_calib else 0
        s = load_images(calib_dir, pp, input_size, n_calib + samples, 0, classes, log, progress, "calibration")
        unreadable += s.unreadable
        calib = s.images[:n_calib] if need_calib else None
        if len(s.images) > n_calib:
            labels = s.labels[n_calib:] if s.labels is not None else None
            held_out = (s.images[n_calib:], labels, f"held-out images from {calib_dir}")
    if eval_dir:
        s = load_images(eval_dir, pp, input_size, samples, 0, classes, log, progress, "evaluation")
        return _Inputs(s.images, s.labels, f"images from {eval_dir}", calib, unreadable + s.unreadable)
    if held_out is not None:
        return _Inputs(*held_out, calib, unreadable)
    x = random_inputs(samples, input_size, _in_chans(model))
    return _Inputs(x, None, "seeded N(0,1) noise", calib, unreadable)


def artefact_path(output: str | os.PathLike | None, default_name: str, info: Format) -> Path:
    """``output`` as given; a folder (an existing one, or any path ending in a separator) gets the
    default file name inside it. A Core ML package is itself a folder: one ending in its suffix is
    the artefact, not a place for it."""
    if not output:
        return Path(default_name)
    path = Path(output)
    text = os.fspath(output)
    if text.endswith(("/", os.sep)) or (path.is_dir() and path.suffix.lower() != info.suffix):
        return path / default_name
    return path


def default_artefact_name(name: str, input_size: int, request: ExportRequest, info: Format) -> str:
    """``<model>_<res>_<precision>[_<layout>][_<dtype>][_b<N>].<ext>``: an input contract other than the
    default (NCHW float32, the format's own batch) is in the name, so a camera-ready export does not
    replace the float one in the same folder."""
    parts = [name, str(input_size), request.precision]
    if request.input_layout != "nchw":
        parts.append(request.input_layout)
    if request.input_dtype != "float32":
        parts.append(request.input_dtype)
    if request.batch is not None and request.batch_for(info) != (None if info.dynamic_batch else 1):
        parts.append(f"b{request.batch_for(info)}")
    return "_".join(parts) + info.suffix


def never_given_weights(model: nn.Module) -> bool:
    """True for a model known to hold a random initialisation (its weights record says so: built by
    ``create_model`` without weights, or by :func:`mnv4.deploy.zoo.build`). A model without a record
    is taken as given."""
    return weights_meta(model).random


def _realistic_copy(model: nn.Module, input_size: int, calib: torch.Tensor | None) -> nn.Module:
    """A copy of ``model`` with BatchNorm statistics estimated (see mnv4.models.batchnorm); its weights
    record says on what."""
    from ..models.batchnorm import noise_batches, recalibrate_batchnorm

    model = copy.deepcopy(model)
    if calib is not None and len(calib) >= 2:
        steps, size = _RECALIBRATION_BATCHES, _RECALIBRATION_BATCH
        recalibrate_batchnorm(model, calib, steps=steps, batch_size=size, inputs_kind="calibration images")
    else:
        batches = noise_batches(input_size, _RECALIBRATION_BATCHES, _RECALIBRATION_BATCH, _in_chans(model), seed=1)
        recalibrate_batchnorm(model, batches, inputs_kind="seeded N(0,1) noise")
    return model


def _eager(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([model(x[i : i + 8]) for i in range(0, len(x), 8)]).float().numpy()


def export(
    model: nn.Module,
    fmt: str | ExportRequest,
    output: str | os.PathLike | None = None,
    *,
    calib_data: torch.Tensor | None = None,
    check_data: torch.Tensor | None = None,
    verbose: bool = True,
    progress: bool | None = False,
    **settings,
) -> ExportResult:
    """Export ``model`` to a format (see :data:`~mnv4.deploy.formats.FORMATS`) and check the artefact
    against eager PyTorch.

    ``fmt`` is a format name, with ``output`` and the other fields of :class:`ExportRequest` as keyword
    arguments (``precision``, ``input_size``, ``calib_dir``, ``eval_dir``, ``samples``, ...), or a whole
    request. The request's fields document themselves; the others:

    Args:
        calib_data: a preprocessed calibration batch [N, C, R, R], instead of ``calib_dir``.
        check_data: preprocessed parity inputs [N, C, R, R], instead of ``eval_dir`` / held-out images / noise
            (a detector's are letterboxed, which the classifier folders' preprocessing is not).
        progress: progress bars (image loading, parity batches); None shows them on terminals only.

    ``recalibrate_bn`` (a request field): None (default): a model that was never given weights (see
    :func:`never_given_weights`) and whose BatchNorm statistics are still the defaults gets them
    estimated on a copy first (its eval-mode activations would otherwise be ~1e-6..1e-23, which checks
    nothing and runs on the CPU's denormal slow path); a model loaded from a checkpoint or the hub is
    exported exactly as given. True: estimate them for any model (the artefact then differs from the
    input; the report says so). False: never.
    """
    if isinstance(fmt, ExportRequest):
        request = replace(fmt, **settings, **({"output": output} if output is not None else {}))
    else:
        request = ExportRequest(fmt, output, **settings)
    info = request.validated(has_calib_data=calib_data is not None)
    model = model.eval().float()
    input_size = request.input_size or weights_meta(model).preprocess.input_size
    check_input_size(input_size)
    name = getattr(getattr(model, "spec", None), "name", type(model).__name__)
    path = artefact_path(request.output, default_artefact_name(name, input_size, request, info), info)
    if path.suffix.lower() != info.suffix:
        raise MNv4Error(f"a {info.name} artefact must end in {info.suffix}, got {path.name} (`output`)")
    check_output_path(path, "output", folder=info.suffix == ".mlpackage")
    for field, data in (("calib_data", calib_data), ("check_data", check_data)):
        if data is None:
            continue
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        if not isinstance(data, torch.Tensor) or data.ndim != 4 or not len(data) or shape[2:] != (input_size,) * 2:
            raise MNv4Error(
                f"`{field}` must be preprocessed images [N, C, {input_size}, {input_size}] at the export's "
                f"input size; got {shape}"
            )

    with previous_artefact_kept(path):  # a failed export never replaces a good one (docs/deploy.md)
        int8 = request.precision == "int8"
        ins = _inputs(
            model, input_size, request.samples, request.calib_samples, request.calib_dir, request.eval_dir,
            int8 and calib_data is None, progress,
        )  # fmt: skip
        if check_data is not None:
            ins = replace(ins, x=check_data.float(), labels=None, source=f"{len(check_data)} given images")
        calib = calib_data.float() if calib_data is not None and int8 else ins.calib
        model, weights, random_weights = _weights_to_export(model, request, input_size, calib)
        # The artefact is fed raw inputs (layout, dtype); eager gets them converted by the graph's own
        # arithmetic, so the check covers the conversion too.
        fmt_in = input_format(request, model)
        raw = fmt_in.to_raw(ins.x)
        batch = request.batch_for(info)
        kept = _float_layers(model, request, calib, progress)
        raw_calib = None if calib is None else fmt_in.to_raw(calib)
        # An earlier export's report must not outlive its artefact: if this run dies between writing the
        # new artefact and checking it, no PASS of another file is left beside it.
        parity_path(path).unlink(missing_ok=True)
        with _converter_output(progress):
            float_ends = _write(model, info, path, request, raw, raw_calib, batch, kept, ins.labels)

        report = _new_report(info, request, path, ins, weights, random_weights, float_ends)
        report.input_shape, report.input_format = list(raw.shape[1:]), fmt_in.describe()
        report.float_layers = list(kept)
        report.ptq = request.ptq().chosen() if int8 else {}
        reference = _eager(model, fmt_in.to_model(raw))
        if not info.can_run():
            _check_structure(info, path, _rows(raw, batch or 1), reference, report)
        else:
            criteria = _criteria(request, random_weights)
            _check_numerics(info, path, request, (raw, ins.labels), batch, reference, report, criteria, progress)
            if kept:
                with _converter_output(progress):
                    _keep_float_cost(model, info, path, request, (raw, raw_calib, batch), reference, report)
        save_report(report)
        if verbose:
            print(report.summary())
        if not report.passed:
            raise ParityError(f"{path} failed its parity check: {'; '.join(report.failures)} (see {path}.parity.json)")
        return ExportResult(path, report)


def _weights_to_export(
    model: nn.Module, request: ExportRequest, input_size: int, calib: torch.Tensor | None
) -> tuple[nn.Module, str, bool]:
    """The model the artefact is made of (the input, or a copy with BatchNorm re-estimated; see
    ``recalibrate_bn``), what its weights are, and whether they are random."""
    from ..models.batchnorm import has_default_bn_stats

    recal = request.recalibrate_bn
    if recal or (recal is None and never_given_weights(model) and has_default_bn_stats(model)):
        model = _realistic_copy(model, input_size, calib)
    meta = weights_meta(model)
    # random weights whose statistics were estimated (here or by mnv4.deploy.zoo.build): arithmetic only
    return model, meta.describe(), meta.random and meta.bn_images is not None


@contextlib.contextmanager
def _converter_output(progress: bool | None) -> Iterator[None]:
    """Converters draw their own progress bars and notes (NNCF's statistics bars, ...) on stdout and
    stderr; like mnv4's own bars they show only when ``progress`` asks (None: on a terminal)."""
    if progress or (progress is None and sys.stdout.isatty()):
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def input_format(request: ExportRequest, model: nn.Module) -> InputFormat:
    """What the artefact's input is, with the normalisation of the model's weights record."""
    pp = weights_meta(model).preprocess
    return InputFormat(request.input_layout, request.input_dtype, tuple(pp.mean), tuple(pp.std))


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows of ``x``, repeating them when ``x`` has fewer."""
    return x[torch.arange(n) % len(x)]


def _write(
    model: nn.Module,
    info: Format,
    path: Path,
    request: ExportRequest,
    x: torch.Tensor,
    calib: torch.Tensor | None,
    batch: int | None,
    keep_float: tuple[str, ...] = (),
    labels: np.ndarray | None = None,
) -> bool:
    """Fuse and write the artefact atomically (``x``, ``calib``: raw inputs; ``batch``: N, or None for
    dynamic); returns whether INT8 kept the stem and head in float."""
    fmt_in = input_format(request, model)
    deploy_model = fmt_in.wrap(fuse(model), _in_chans(model))
    if request.precision == "fp16" and info.half_model:
        deploy_model = deploy_model.half()
    elif request.precision == "bf16" and info.bf16 and info.half_model:
        deploy_model = deploy_model.to(torch.bfloat16)
    example = _rows(x, batch or 2)
    if example.is_floating_point():
        example = example.to(next(deploy_model.parameters()).dtype)
    float_ends = request.precision == "int8" and info.float_ends and not request.int8_all_layers
    job = WriteJob(
        request.precision, calib, float_ends, batch is None, keep_float, request.ptq(), _validation(request, x, labels)
    )
    write_atomically(path, lambda target: info.writer(deploy_model, example, target, job))
    return float_ends


def _validation(request: ExportRequest, x: torch.Tensor, labels: np.ndarray | None) -> tuple | None:
    """Accuracy-controlled INT8's validation set: the labelled evaluation images, raw."""
    if request.max_accuracy_drop is None:
        return None
    if labels is None:
        raise MNv4Error("`max_accuracy_drop` needs evaluation images whose classes are the model's (`eval_dir`)")
    return x, labels


def _float_layers(
    model: nn.Module, request: ExportRequest, calib: torch.Tensor | None, progress: bool | None
) -> tuple[str, ...]:
    """The layers INT8 leaves float on request: those named, then the ``keep_float`` most sensitive
    others (mnv4.deploy.sensitivity on the calibration images)."""
    kept = list(dict.fromkeys(request.keep_float_layers))
    if request.keep_float and calib is not None:
        from .sensitivity import analyze

        ranked = [n for n in analyze(model, calib, progress=progress).worst(10**6) if n not in kept]
        kept += ranked[: request.keep_float]
    return tuple(kept)


def _keep_float_cost(
    model: nn.Module,
    info: Format,
    path: Path,
    request: ExportRequest,
    data: tuple[torch.Tensor, torch.Tensor | None, int | None],
    reference: np.ndarray,
    report: ParityReport,
) -> None:
    """What keeping layers float bought and cost: the same export without them, its top-1 agreement,
    and both artefacts' batch-1 latency timed in alternating rounds on this CPU."""
    import tempfile

    from ..perf.latency import alternating_medians

    raw, raw_calib, batch = data
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / path.name
        _write(model, info, plain, request, raw, raw_calib, batch)
        runs = {k: info.loader(p, RunOptions(request.threads, "int8")) for k, p in (("with", path), ("without", plain))}
        out = run_batches(runs["without"], raw.numpy(), batch or len(raw), fixed=batch is not None)
        one = np.ascontiguousarray(_rows(raw, batch or 1).numpy())
        ms = alternating_medians(runs, one, rounds=5, iters=10)
    agreement = float((out.argmax(1) == reference.argmax(1)).mean())
    report.keep_float_cost = {
        "top1_agreement_without": agreement,
        "latency_ms_with": ms["with"],
        "latency_ms_without": ms["without"],
        "latency_cost": ms["with"] / ms["without"] - 1.0,
        "threads": request.threads,
    }
    report.notes.append(
        f"kept float: {len(report.float_layers)} layer(s); top-1 agreement {report.top1_agreement:.2%} vs "
        f"{agreement:.2%} without; batch-1 latency {ms['with']:.3g} ms vs {ms['without']:.3g} ms "
        f"({ms['with'] / ms['without'] - 1:+.1%}) on this CPU"
    )


def _criteria(request: ExportRequest, random_weights: bool) -> Criteria:
    criteria = CRITERIA[request.precision]
    if random_weights and request.precision == "int8":
        # A random network has no margin between its logits: INT8 rounding alone moves them by a
        # good part of their spread (cosine 0.8-0.9 on Conv-S 0.35 / MobileNetV3-S), while a broken
        # conversion lands near 0. The bar tells the two apart; accuracy needs trained weights.
        criteria = replace(
            criteria,
            min_cosine=RANDOM_INT8_MIN_COSINE,
            min_top1=None,
            min_centred_cosine=RANDOM_INT8_MIN_CENTRED_COSINE,
        )
    if request.min_top1 is not None:
        criteria = replace(criteria, min_top1=request.min_top1)
    return criteria


def _new_report(
    info: Format,
    request: ExportRequest,
    path: Path,
    ins: _Inputs,
    weights: str,
    random_weights: bool,
    float_ends: bool,
) -> ParityReport:
    """The report before any comparison: what was compared, on what, and the notes that explain it."""
    x, precision = ins.x, request.precision
    report = ParityReport(info.name, precision, str(path), len(x), list(x.shape[1:]))
    report.inputs, report.weights, report.random_weights = ins.source, weights, random_weights
    report.unreadable_images = len(ins.unreadable)
    report.unreadable_files = [{"path": b.path, "reason": b.reason} for b in ins.unreadable[:20]]
    report.notes.append(f"reference: eager PyTorch fp32, unfused; inputs: {ins.source}")
    if random_weights:
        report.notes.append(f"weights: {weights}; the check covers the runtime's arithmetic, not accuracy")
        if precision == "int8":
            report.notes.append(
                f"int8 on random weights: cosine bar {RANDOM_INT8_MIN_COSINE} and centred-cosine bar "
                f"{RANDOM_INT8_MIN_CENTRED_COSINE} (outputs must follow the inputs), no top-1 bar "
                f"(trained: 0.95 and {INT8_MIN_TOP1:.0%})"
            )
    if request.recalibrate_bn and not random_weights:
        report.notes.append("recalibrate_bn: the artefact's BatchNorm statistics were re-estimated, not the input's")
    if float_ends:
        report.notes.append("int8: stem conv and head (after the global pool) kept in float")
    if precision == "int8":
        report.notes.append(int8_support()[1])
        if info.name == "onnx":
            report.notes.append(_onnx_weight_bits(request.ptq()))
    if precision == "bf16":
        from .cpu import bf16_support

        report.notes.append(bf16_support()[1])
    return report


def _onnx_weight_bits(settings: PTQSettings) -> str:
    if settings.reduce_range is not None:
        return f"int8: {7 if settings.onnx_reduce_range else 8}-bit weights (reduce_range {settings.reduce_range})"
    if settings.onnx_reduce_range:
        return "int8: 7-bit weights (reduce_range): ONNX Runtime's int8 kernels saturate with 8-bit ones on this CPU"
    return "int8: 8-bit weights"


def _check_numerics(
    info: Format,
    path: Path,
    request: ExportRequest,
    inputs: tuple[torch.Tensor, np.ndarray | None],
    fixed: int | None,
    reference: np.ndarray,
    report: ParityReport,
    criteria: Criteria,
    progress: bool | None,
) -> None:
    """Run the artefact in its runtime on the (raw) check inputs and compare with eager; ``fixed``:
    the artefact's fixed batch, None for dynamic."""
    precision, (x, labels) = request.precision, inputs
    run = info.loader(path, RunOptions(request.threads, precision))
    batch = fixed or len(x)
    out = run_batches(run, x.numpy(), batch, progress, fixed=fixed is not None)
    report.batch_sizes = [fixed] if fixed else sorted({1, max(batch, 2)})
    if fixed is None:
        # Dynamic batch must really be dynamic: batch 1 must give the same rows as the big batch. With a
        # single check input, that input twice is the big batch.
        if len(x) == 1:
            single, out = out, run_batches(run, np.repeat(x.numpy(), 2, 0), 2)[:1]
        else:
            single = run_batches(run, x[:1].numpy(), 1)
        # int8 kernels may pick other blockings per batch size, so allow the format's own noise.
        tol = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2, "int8": 5e-2}[precision] * float(np.abs(out).max())
        report.dynamic_batch = bool(np.abs(single - out[:1]).max() <= tol)
        if not report.dynamic_batch:
            report.failures.append("batch-1 and batched outputs differ")
    compare(reference, out, report, criteria, labels)


def _check_structure(info: Format, path: Path, x: torch.Tensor, reference: np.ndarray, report: ParityReport) -> None:
    """Where the runtime cannot run here (Core ML off macOS): check what its record can inspect."""
    if info.inspect is None:
        raise MNv4Error(f"{info.name} artefacts cannot be run on this platform and have no structure check")
    st = report.structure = info.inspect(path)
    report.numerics_checked = False
    report.notes.append(f"numerics not checked: {info.title} cannot run here; IO shapes and ops verified")
    report.criteria = {"inputs": "match example", "outputs": "[batch, num_classes]"}
    if st["inputs"] != [list(x.shape)] or st["outputs"] != [[len(x), reference.shape[1]]]:
        report.failures.append(f"unexpected IO shapes {st['inputs']} -> {st['outputs']}")
    report.passed = not report.failures
