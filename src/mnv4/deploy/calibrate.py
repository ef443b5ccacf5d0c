"""``mnv4 roofline calibrate``: measure this machine, fit its roofline, report how well it ranks models.

Each model is timed with the paper's protocol in its own process (see :mod:`mnv4.deploy.bench`),
then peak MAC/s and bandwidth are fitted (:func:`mnv4.perf.roofline.fit_hardware`). As in the
paper's Tab. 16, the quality measure is the Spearman rank correlation between predicted and
measured latency, shown next to the correlation of plain MAC counts.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import MNv4Error
from ..perf.hardware import HardwareProfile

__all__ = ["CalibrationResult", "calibrate", "DEFAULT_CALIBRATION_MODELS"]

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
    threads: int = 2,
    runs: int = 100,
    repeats: int = 3,
    dtype: str = "float32",
    name: str = "this_machine",
    progress: bool = False,
) -> CalibrationResult:
    from ..perf.counting import profile
    from ..perf.roofline import fit_hardware, spearman
    from .bench import _subprocess_row
    from .zoo import build

    runtime = _pick_runtime(runtime)
    models = list(models or DEFAULT_CALIBRATION_MODELS)
    ok_models, res_list, profiles, measured, failures = [], [], [], [], []
    for m in models:
        row = _subprocess_row(
            dict(
                model_name=m,
                runtime=runtime,
                precision="fp32",
                resolution=None,
                threads=threads,
                runs=runs,
                repeats=repeats,
                warmup=10,
                budget_s=2.0,
                artefact_dir=None,
                calib_dir=None,
            ),
            timeout=900,
        )
        if row.error:
            failures.append(f"{m}: {row.error}")
            if progress:
                print(f"  {m}: failed ({row.error})", file=sys.stderr)
            continue
        if progress:
            print(f"  {m:24s} {row.median_ms:8.2f} ms", file=sys.stderr, flush=True)
        model, _ = build(m)
        prof = profile(model, row.resolution, dtype=dtype)
        ok_models.append(m)
        res_list.append(row.resolution)
        profiles.append(prof)
        measured.append(row.median_ms / 1e3)
    if len(profiles) < 3:
        raise MNv4Error(f"calibration needs at least 3 measured models; failures: {'; '.join(failures)}")
    hw, err = fit_hardware(profiles, measured, name=name)
    from ..perf.roofline import predict_latency

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
