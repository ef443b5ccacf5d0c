"""Parity of an exported artefact against eager PyTorch: max abs diff, cosine, top-1 agreement, accuracy.

Every export writes ``<artefact>.parity.json`` with these figures and the thresholds it was held
to; a failed check raises :class:`ParityError` (after the report is saved, so it can be inspected).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MNv4Error
from ..files import atomic_write_json

__all__ = [
    "Criteria",
    "ParityReport",
    "ParityError",
    "CRITERIA",
    "INT8_MIN_TOP1",
    "compare",
    "parity_path",
    "save_report",
    "run_batches",
]


class ParityError(MNv4Error):
    """An exported model disagrees with eager PyTorch beyond the format's tolerance."""


@dataclass(frozen=True)
class Criteria:
    """Pass thresholds. ``max_rel`` bounds max|diff| / max|reference|; None disables a check."""

    max_rel: float | None
    min_cosine: float | None
    min_top1: float | None
    # The cosine of the outputs with each output's mean over the inputs taken out: what varies with the
    # input. Random weights give every input nearly the same logits, and that shared offset alone lifts
    # the plain cosine of an artefact that ignores its input to ~0.6; centred, such an output scores 0.
    min_centred_cosine: float | None = None


# fp32 runtimes reorder float sums (1e-6-ish); fp16 keeps ~3 significant digits; int8 is judged on
# direction (cosine) and on top-1 agreement with fp32: a cosine of 0.95 still allows one prediction in
# five to change, and trained INT8 routes agree on >= 95% of real images (docs/deploy.md, "Pass
# thresholds"), so 90% leaves room for sample noise and still fails a route that changes answers.
INT8_MIN_TOP1 = 0.9
CRITERIA = {
    "fp32": Criteria(max_rel=1e-4, min_cosine=0.99999, min_top1=None),
    "fp16": Criteria(max_rel=3e-2, min_cosine=0.999, min_top1=None),
    # bf16 keeps 8 bits of mantissa (~2-3 digits): judged by cosine; its top-1 agreement is reported
    "bf16": Criteria(max_rel=None, min_cosine=0.99, min_top1=None),
    "int8": Criteria(max_rel=None, min_cosine=0.95, min_top1=INT8_MIN_TOP1),
}


@dataclass
class ParityReport:
    format: str
    precision: str
    artefact: str
    samples: int
    input_shape: list[int]
    input_format: str = "NCHW normalised float32"  # what the artefact takes (mnv4.deploy.layout)
    float_layers: list[str] = field(default_factory=list)  # int8: layers kept float on request (keep_float)
    keep_float_cost: dict = field(default_factory=dict)  # agreement and latency with vs without them
    ptq: dict = field(default_factory=dict)  # int8: the PTQ settings chosen (mnv4.deploy.ptq; empty: defaults)
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    cosine: float | None = None
    centred_cosine: float | None = None  # see Criteria.min_centred_cosine; None with one input
    top1_agreement: float | None = None
    batch_sizes: list[int] = field(default_factory=list)
    dynamic_batch: bool | None = None
    accuracy_reference: float | None = None  # eager fp32 top-1 on the labelled set, when given
    accuracy_exported: float | None = None
    accuracy_delta: float | None = None
    criteria: dict = field(default_factory=dict)
    passed: bool = False
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    structure: dict = field(default_factory=dict)
    inputs: str = ""  # where the compared inputs came from
    weights: str = "as given"  # or what was done to random weights before the check
    random_weights: bool = False  # the check ran on untrained weights: arithmetic, not accuracy
    unreadable_images: int = 0  # image files skipped because they could not be read
    unreadable_files: list[dict] = field(default_factory=list)  # {"path", "reason"}, the first 20
    numerics_checked: bool = True  # False where the runtime cannot run here (Core ML off macOS)

    def summary(self) -> str:
        if self.max_abs_diff is None:
            status = "numerics not checked"
        else:
            status = (
                f"max abs diff {self.max_abs_diff:.3g} (rel {self.max_rel_diff:.3g}), cosine {self.cosine:.6f}, "
                f"top-1 agreement {self.top1_agreement:.2%} on {self.samples} inputs"
            )
        if self.accuracy_exported is not None:
            status += (
                f"; accuracy {self.accuracy_exported:.2%} vs {self.accuracy_reference:.2%} eager "
                f"({self.accuracy_delta * 100:+.2f} pts)"
            )
        if self.random_weights:
            status += " (random weights, BatchNorm re-estimated)"
        if self.unreadable_images:
            status += f"; skipped {self.unreadable_images} unreadable image(s)"
        if not self.passed:
            verdict = "FAIL: " + "; ".join(self.failures)
        elif not self.numerics_checked:  # structure only: nothing was compared with eager
            verdict = "SKIPPED (numerics; IO shapes and ops verified)"
        else:
            verdict = "PASS"
        return f"parity {self.format}/{self.precision}: {status} -> {verdict}"

    def to_dict(self) -> dict:
        return asdict(self)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom else (1.0 if np.array_equal(a, b) else 0.0)


def compare(
    reference: np.ndarray,
    output: np.ndarray,
    report: ParityReport,
    criteria: Criteria,
    labels: np.ndarray | None = None,
) -> ParityReport:
    """Fill ``report`` with the diff figures of ``output`` vs ``reference`` (both [N, classes]) and judge it."""
    reference = np.asarray(reference, dtype=np.float32)
    output = np.asarray(output, dtype=np.float32)
    if reference.shape != output.shape:
        report.failures.append(f"output shape {list(output.shape)} != eager {list(reference.shape)}")
        report.passed = False
        return report
    diff = np.abs(reference - output)
    scale = float(np.abs(reference).max()) or 1.0
    report.max_abs_diff = float(diff.max())
    report.max_rel_diff = report.max_abs_diff / scale
    report.cosine = _cosine(reference, output)
    if len(reference) > 1:
        report.centred_cosine = _cosine(reference - reference.mean(0), output - output.mean(0))
    flat_ref, flat_out = reference.reshape(len(reference), -1), output.reshape(len(output), -1)
    report.top1_agreement = float((flat_ref.argmax(1) == flat_out.argmax(1)).mean())
    if labels is not None and len(labels) == len(reference):
        report.accuracy_reference = float((flat_ref.argmax(1) == labels).mean())
        report.accuracy_exported = float((flat_out.argmax(1) == labels).mean())
        report.accuracy_delta = report.accuracy_exported - report.accuracy_reference
    report.criteria = asdict(criteria)
    if not np.isfinite(output).all():
        report.failures.append("non-finite outputs")
    if criteria.max_rel is not None and not report.max_rel_diff <= criteria.max_rel:
        report.failures.append(f"relative diff {report.max_rel_diff:.3g} > {criteria.max_rel:g}")
    if criteria.min_cosine is not None and not report.cosine >= criteria.min_cosine:
        report.failures.append(f"cosine {report.cosine:.6f} < {criteria.min_cosine:g}")
    bar = criteria.min_centred_cosine
    if bar is not None and report.centred_cosine is not None and not report.centred_cosine >= bar:
        report.failures.append(
            f"centred cosine {report.centred_cosine:.4f} < {bar:g} (the artefact's outputs do not follow its inputs)"
        )
    if criteria.min_top1 is not None and not report.top1_agreement >= criteria.min_top1:
        report.failures.append(f"top-1 agreement {report.top1_agreement:.2%} < {criteria.min_top1:.0%}")
    report.passed = not report.failures
    return report


def parity_path(artefact: str | os.PathLike) -> Path:
    artefact = Path(artefact)
    return artefact.with_name(artefact.name + ".parity.json")


def save_report(report: ParityReport) -> Path:
    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return atomic_write_json(parity_path(report.artefact), {k: clean(v) for k, v in report.to_dict().items()})


def run_batches(
    run: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    batch: int,
    progress: bool | None = False,
    fixed: bool = False,
) -> np.ndarray:
    """Run ``x`` through ``run`` in chunks of ``batch``; ``fixed``: the artefact takes exactly
    ``batch`` rows, so a short last chunk is padded with its first row and the padding dropped."""
    from tqdm import tqdm

    def one(chunk: np.ndarray) -> np.ndarray:
        n = len(chunk)
        if fixed and n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch - n, 0)], 0)
        return np.asarray(run(np.ascontiguousarray(chunk)))[:n]

    starts = range(0, len(x), batch)
    disable = None if progress is None else not progress
    return np.concatenate([one(x[i : i + batch]) for i in tqdm(starts, "parity", disable=disable)], 0)
