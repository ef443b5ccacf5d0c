"""Fit a roofline hardware profile to latencies measured on this machine (``mnv4 roofline calibrate``).

Each model is timed with the paper's protocol in its own process (see :mod:`mnv4.deploy.bench`;
random weights with BatchNorm statistics estimated, denormals flushed), then peak MAC/s and
bandwidth are fitted (:func:`mnv4.perf.roofline.fit_hardware`). As in the paper's Tab. 16, the
quality measure is the Spearman rank correlation between predicted and measured latency, shown
next to the correlation of plain MAC counts.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import InvalidValue, MNv4Error
from ..perf.latency import LatencyProtocol
from .requests import DEFAULT_BENCH_THREADS

if TYPE_CHECKING:
    from ..perf.hardware import HardwareProfile

__all__ = ["CalibrationResult", "calibrate", "CALIBRATION_PROTOCOL", "DEFAULT_CALIBRATION_MODELS", "FIT_RUNTIMES"]

# Runtimes a roofline can be fitted to: in-process torch and ONNX Runtime (fp32 everywhere).
FIT_RUNTIMES = ("auto", "torch", "torch-fused", "onnxruntime")
# A fit times a dozen models: fewer runs than the paper's protocol, still a median over repeats.
CALIBRATION_PROTOCOL = LatencyProtocol(runs=100, repeats=3, warmup=10, budget_s=2.0)

DEFAULT_CALIBRATION_MODELS = (
    "mnv4_conv_small_035",
    "mnv4_conv_small_050",
    "mnv4_conv_small",
    "mnv4_conv_medium",
    "mnv4_hybrid_medium_075",
    "mnv4_hybrid_medium",
    "mnv4_conv_large",
    "mnv4_hybrid_large",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "efficientnet_b0",
)


@dataclass
class CalibrationResult:
    hardware: HardwareProfile
    runtime: str
    models: list[str]
    resolutions: list[int]
    macs: list[int]
    measured_s: list[float]
    predicted_s: list[float]
    spearman_roofline: float
    spearman_macs: float
    rms_log_error: float
    failures: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'model':24s} {'res':>4s} {'GMACs':>7s} {'measured ms':>12s} {'roofline ms':>12s}"]
        for m, r, mac, meas, pred in zip(self.models, self.resolutions, self.macs, self.measured_s, self.predicted_s):
            lines.append(f"{m:24s} {r:4d} {mac / 1e9:7.3f} {meas * 1e3:12.2f} {pred * 1e3:12.2f}")
        return "\n".join(lines)

    def summary(self) -> str:
        hw = self.hardware
        return (
            f"fitted {hw.name} ({self.runtime}, {hw.dtype}): peak {hw.peak_macs / 1e9:.1f} GMAC/s, "
            f"bandwidth {hw.bandwidth / 1e9:.2f} GB/s, ridge point {hw.ridge_point:.1f} MACs/byte; "
            f"Spearman(roofline, measured) = {self.spearman_roofline:.3f}, "
            f"Spearman(MACs, measured) = {self.spearman_macs:.3f} over {len(self.models)} models "
            f"(paper, phones: 0.962-0.973 vs 0.758-0.962); rms log error {self.rms_log_error:.2f}"
        )


def _pick_runtime(runtime: str) -> str:
    if runtime != "auto":
        return runtime
    return "onnxruntime" if importlib.util.find_spec("onnxruntime") else "torch-fused"


def calibrate(
    models: Sequence[str] | None = None,
    runtime: str = "auto",
    threads: int = DEFAULT_BENCH_THREADS,
    protocol: LatencyProtocol = CALIBRATION_PROTOCOL,
    dtype: str = "float32",
    name: str = "this_machine",
    progress: bool | None = None,
    timeout: float = 900.0,
) -> CalibrationResult:
    """Time ``models`` (default :data:`DEFAULT_CALIBRATION_MODELS`) on ``runtime`` and fit a profile.

    ``protocol`` times each model (default: fewer runs than the paper's, a fit needs a dozen models);
    ``dtype`` is the byte width the fitted profile counts traffic in; ``progress`` shows a bar
    over the models (None: on terminals only).
    """
    from tqdm import tqdm

    from ..perf.counting import DTYPE_BYTES, profile
    from ..perf.roofline import fit_hardware, predict_latency, spearman
    from .bench import Measurement, check_bench_request, measure_in_subprocess
    from .requests import BenchRequest
    from .zoo import build

    if runtime not in FIT_RUNTIMES:
        raise InvalidValue("runtime", runtime, f"choose one of {', '.join(FIT_RUNTIMES)}")
    if dtype not in DTYPE_BYTES:
        raise InvalidValue("dtype", dtype, f"choose one of {', '.join(DTYPE_BYTES)}")
    runtime = _pick_runtime(runtime)
    models = list(models or DEFAULT_CALIBRATION_MODELS)
    if len(models) < 3:
        raise MNv4Error(f"a roofline fit needs at least 3 models, got {len(models)} (`models`)")
    request = BenchRequest(tuple(models), (runtime,), ("fp32",), threads=threads, protocol=protocol, timeout=timeout)
    check_bench_request(request)
    ok_models, res_list, profiles, measured, failures = [], [], [], [], []
    bar = tqdm(models, desc="roofline calibrate", unit="model", disable=None if progress is None else not progress)
    for m in bar:
        bar.set_postfix_str(m)
        row = measure_in_subprocess(Measurement(m, runtime, "fp32", request))
        if row.error:
            failures.append(f"{m}: {row.error}")
            tqdm.write(f"  {m}: failed ({row.error})")
            continue
        if not bar.disable:
            tqdm.write(f"  {m:24s} {row.median_ms:8.2f} ms")
        model, _ = build(m, realistic=False)  # counting needs the structure only
        prof = profile(model, row.resolution, dtype=dtype)
        ok_models.append(m)
        res_list.append(row.resolution)
        profiles.append(prof)
        measured.append(row.median_ms / 1e3)
    if len(profiles) < 3:
        raise MNv4Error(f"calibration needs at least 3 measured models; failures: {'; '.join(failures)}")
    hw, err = fit_hardware(profiles, measured, name=name)
    predicted = [predict_latency(p, hw).latency_s for p in profiles]
    return CalibrationResult(
        hw,
        runtime,
        ok_models,
        res_list,
        [p.macs for p in profiles],
        measured,
        predicted,
        spearman(predicted, measured),
        spearman([p.macs for p in profiles], measured),
        err,
        failures,
    )
