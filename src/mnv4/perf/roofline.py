"""The paper's roofline latency model (paper §3, Eq. 1; docs/deploy.md, `mnv4 roofline`) and its ridge-point sweep.

    ModelTime = sum_i max(MACs_i / PeakMACs, Bytes_i / PeakMemBW)

Per-layer MACs and bytes come from :func:`mnv4.perf.profile` at the hardware's dtype (int8 = 1
byte per element, fp16 = 2, fp32 = 4). Dividing by PeakMACs gives
``sum_i max(MACs_i, RP * Bytes_i) / PeakMACs`` with RP the ridge point, so rankings depend on RP
alone; :func:`ridge_sweep` is the paper's analysis of RP from 0 (pure MAC count) to 500.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from ..errors import InvalidValue, MNv4Error
from ..models.specs import ModelSpec
from .counting import Profile, profile
from .hardware import (
    BUILTIN_PROFILES,
    DEVICE_NAMES,
    PAPER_LATENCIES_MS,
    PAPER_RIDGE_POINTS,
    HardwareProfile,
    get_profile,
)

__all__ = [
    "RooflinePrediction",
    "predict_latency",
    "roofline_units",
    "ridge_sweep",
    "fit_hardware",
    "spearman",
    "sweep_points",
    "sweep_table",
    "plot_sweep",
    "anchor_peak",
]

ModelLike = nn.Module | ModelSpec | str | Profile


@dataclass
class RooflinePrediction:
    model: str
    hardware: str
    latency_s: float
    compute_s: float  # time of the compute-bound layers
    memory_s: float  # time of the memory-bound layers
    layers: list[tuple[str, float, bool]]  # (layer, seconds, memory-bound?)

    @property
    def latency_ms(self) -> float:
        return self.latency_s * 1e3

    @property
    def memory_bound_fraction(self) -> float:
        return self.memory_s / self.latency_s if self.latency_s else 0.0


def _as_profile(model: ModelLike, resolution: int | tuple[int, int] | None, dtype: str) -> Profile:
    if isinstance(model, Profile):
        return model
    if resolution is None:  # the weights' own resolution (a spec has none: 224)
        from ..models.meta import weights_meta
        from ..models.registry import get_entry

        if isinstance(model, str):
            resolution = get_entry(model).default_preprocess.input_size
        else:
            resolution = weights_meta(model).preprocess.input_size if isinstance(model, nn.Module) else 224
    return profile(model, resolution, dtype=dtype)


def roofline_units(prof: Profile, ridge_point: float) -> float:
    """sum_i max(MACs_i, RP * Bytes_i): the latency in units of 1 / PeakMACs."""
    return float(sum(max(layer.macs, ridge_point * layer.bytes) for layer in prof.layers))


def predict_latency(
    model: ModelLike,
    hardware: str | HardwareProfile,
    resolution: int | tuple[int, int] | None = None,
    dtype: str | None = None,
) -> RooflinePrediction:
    """Roofline latency of ``model`` on ``hardware`` (a built-in name, a profile file or object).

    ``dtype`` defaults to the hardware's (int8 for the paper's devices)."""
    hw = get_profile(hardware)
    prof = _as_profile(model, resolution, dtype or hw.dtype)
    layers, compute, memory = [], 0.0, 0.0
    for layer in prof.layers:
        t_mac = layer.macs / hw.peak_macs
        t_mem = layer.bytes / hw.bandwidth
        if t_mem > t_mac:
            memory += t_mem
        else:
            compute += t_mac
        layers.append((layer.name, max(t_mac, t_mem), t_mem > t_mac))
    return RooflinePrediction(prof.model, hw.name, compute + memory, compute, memory, layers)


def ridge_sweep(
    profiles: Sequence[Profile],
    ridge_points: Iterable[float] | None = None,
    normalize: str = "macs",
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(ridge points, {model: relative latency}) for RP from 0 to 500 MACs/byte.

    ``normalize="macs"``: each model's latency over its own MAC-only latency (1.0 at RP = 0, the
    slowdown memory traffic costs it); otherwise the name of one of the models, whose latency at
    each RP is the unit (the paper's relative-latency view, rankings visible directly).
    """
    rps = np.asarray(list(ridge_points) if ridge_points is not None else np.linspace(0, 500, 251), dtype=float)
    raw = {}
    for p in profiles:
        macs = np.array([layer.macs for layer in p.layers], dtype=float)
        byts = np.array([layer.bytes for layer in p.layers], dtype=float)
        raw[p.model] = np.maximum(macs[None, :], rps[:, None] * byts[None, :]).sum(1)
    if normalize == "macs":
        return rps, {k: v / v[0] if v[0] else v for k, v in raw.items()}
    if normalize not in raw:
        raise MNv4Error(f"`normalize` {normalize!r} is invalid: give 'macs' or one of the models {list(raw)}")
    return rps, {k: v / raw[normalize] for k, v in raw.items()}


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):  # ties share their average rank
        tie = x == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of the ranks, ties averaged)."""
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denom) if denom else 0.0


def fit_hardware(
    profiles: Sequence[Profile],
    latencies_s: Sequence[float],
    name: str = "fitted",
    ridge_points: Iterable[float] | None = None,
) -> tuple[HardwareProfile, float]:
    """Fit peak MAC/s and bandwidth to measured latencies; returns (profile, rms log error).

    For a fixed ridge point the best peak (in log space) is closed-form, so the fit is a 1-D search
    over ridge points (log grid 0.01..2000 MACs/byte by default)."""
    y = np.log(np.asarray(latencies_s, dtype=float))
    rps = np.asarray(list(ridge_points) if ridge_points is not None else np.geomspace(0.01, 2000, 400), dtype=float)
    best = None
    for rp in rps:
        units = np.log([roofline_units(p, rp) for p in profiles])
        log_inv_peak = float(np.mean(y - units))  # latency = units / peak
        err = float(np.sqrt(np.mean((units + log_inv_peak - y) ** 2)))
        if best is None or err < best[0]:
            best = (err, float(rp), float(np.exp(-log_inv_peak)))  # plain floats: the profile is saved as YAML
    err, rp, peak = best
    dtype = profiles[0].dtype if profiles else "float32"
    hw = HardwareProfile.from_ridge(name, rp, peak, dtype=dtype, source="fitted by mnv4 roofline calibrate")
    return hw, err


def sweep_points(max_ridge: float = 500.0, hardware: Sequence[str | HardwareProfile] | None = None) -> list[float]:
    """The ridge points a sweep table reports: 0 (pure MACs), each device's, 100 and ``max_ridge`` -- those
    within the swept range only (beyond it the curve has no values, and interpolation would repeat its end)."""
    devices = [get_profile(h).ridge_point for h in (hardware or list(BUILTIN_PROFILES))]
    return sorted(rp for rp in {0.0, 100.0, float(max_ridge), *devices} if rp <= max_ridge)


def sweep_table(rps: np.ndarray, rel: dict[str, np.ndarray], points: Sequence[float]) -> list[list[str]]:
    """Rows (header first) of each model's relative latency at ``points`` (e.g. :func:`sweep_points`)."""
    table = [["model"] + [f"RP {rp:g}" for rp in points]]
    for name, y in rel.items():
        table.append([name] + [f"{np.interp(rp, rps, y):.2f}" for rp in points])
    return table


def plot_sweep(
    profiles: Sequence[Profile],
    path: str | os.PathLike,
    max_ridge: float = 500.0,
    normalize: str = "macs",
    hardware: Sequence[str | HardwareProfile] | None = None,
    points: int = 251,
) -> tuple[Path, np.ndarray, dict[str, np.ndarray]]:
    """Plot :func:`ridge_sweep` from 0 to ``max_ridge`` MACs/byte, each device's ridge point marked
    (default: the built-in profiles); returns (png path, ridge points, relative latencies).

    The byte width is the profiles' own dtype (all profiles must share it).
    """
    from ..plotting import pyplot, save_figure

    if not profiles:
        raise MNv4Error("a sweep needs at least one model profile")
    if not max_ridge > 0:
        raise InvalidValue("max_ridge", max_ridge, "must be > 0")
    dtypes = sorted({p.dtype for p in profiles})
    if len(dtypes) > 1:
        raise MNv4Error(f"the profiles of one sweep must share a dtype, got {', '.join(dtypes)}")
    rps, rel = ridge_sweep(profiles, np.linspace(0, max_ridge, points), normalize=normalize)
    fig, ax = pyplot().subplots(figsize=(8, 5))
    for name, y in rel.items():
        ax.plot(rps, y, label=name, lw=2 if name.startswith("mnv4") else 1)
    for h in hardware or list(BUILTIN_PROFILES):
        hw = get_profile(h)
        if hw.ridge_point > max_ridge:
            continue
        ax.axvline(hw.ridge_point, color="gray", ls=":", lw=0.8)
        label = DEVICE_NAMES.get(hw.name, hw.name)
        ax.text(hw.ridge_point, ax.get_ylim()[1], label, rotation=90, va="top", ha="right", fontsize=7)
    ax.set_xlabel("ridge point (MACs / byte)")
    unit = "own MAC-only latency" if normalize == "macs" else normalize
    ax.set_ylabel(f"roofline latency relative to {unit}")
    ax.set_title(f"Roofline sweep ({dtypes[0]} bytes)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=130), rps, rel


def anchor_peak(name: str) -> float:
    """Peak MAC/s that best fits (geometric mean of ratios) the paper's MNv4 latencies on ``name``
    at its published ridge point; the basis of the built-in profiles' peaks (mnv4.perf.hardware).
    Each model is counted at its native resolution from the registry (the paper's Tab. 6 resolutions)."""
    from ..models.registry import get_entry

    rp = PAPER_RIDGE_POINTS[name]
    logs = []
    for model, ms in PAPER_LATENCIES_MS[name].items():
        res = get_entry(model).default_preprocess.input_size
        units = roofline_units(profile(model, res, dtype="int8"), rp)  # MAC-equivalents
        logs.append(math.log(units / (ms / 1e3)))
    return math.exp(sum(logs) / len(logs))
