"""Hardware profiles for the roofline model: peak MAC/s, memory bandwidth, and their ratio, the ridge point.

The paper (Tab. 16; docs/deploy.md) publishes only ridge points (MACs per byte), not absolute peaks. For
the built-in profiles the ridge point is the paper's, and the absolute scale (peak MAC/s) is
anchored so that the roofline reproduces the paper's measured MNv4 latencies on that device
(Tab. 6, copied in ``PAPER_LATENCIES_MS``) in the least-squares-in-log sense; see
:func:`mnv4.perf.roofline.anchor_peak`. Relative latencies and rankings depend only on the ridge point, so they are
exactly the paper's model.

User profiles are small YAML or JSON files::

    name: my_board
    peak_macs: 2.0e11      # MAC/s
    bandwidth: 8.0e9       # bytes/s
    dtype: int8            # bytes per element used when counting traffic
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import MNv4Error
from ..files import preset_or_file, read_record
from .dtypes import DTYPE_BYTES

__all__ = [
    "HardwareProfile",
    "BUILTIN_PROFILES",
    "DEVICE_NAMES",
    "PAPER_LATENCIES_MS",
    "PAPER_RIDGE_POINTS",
    "get_profile",
    "load_profile",
]


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    peak_macs: float  # MAC/s
    bandwidth: float  # bytes/s
    dtype: str = "int8"
    source: str = ""

    def __post_init__(self) -> None:
        if not (self.peak_macs > 0 and self.bandwidth > 0):
            raise MNv4Error(f"hardware profile {self.name!r}: peak_macs and bandwidth must be positive")

    @property
    def ridge_point(self) -> float:
        """MACs per byte needed to be compute-bound (PeakMACs / PeakMemBW)."""
        return self.peak_macs / self.bandwidth

    @classmethod
    def from_ridge(cls, name: str, ridge_point: float, peak_macs: float, **kw) -> HardwareProfile:
        return cls(name, peak_macs, peak_macs / ridge_point, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ridge_point"] = self.ridge_point
        return d

    def save(self, path: str | os.PathLike) -> Path:
        from ..files import atomic_write_text

        path = Path(path)
        data = self.to_dict()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(data, sort_keys=False)
        else:
            text = json.dumps(data, indent=2) + "\n"
        return atomic_write_text(path, text)

    @classmethod
    def from_dict(cls, d: dict) -> HardwareProfile:
        try:
            peak = float(d["peak_macs"])
            bw = float(d["bandwidth"]) if "bandwidth" in d else peak / float(d["ridge_point"])
        except (KeyError, TypeError, ValueError):
            raise MNv4Error("a hardware profile needs peak_macs and bandwidth (or ridge_point)") from None
        except ZeroDivisionError:
            raise MNv4Error("hardware profile ridge_point must be positive") from None
        dtype = str(d.get("dtype", "int8"))
        if dtype not in DTYPE_BYTES:
            raise MNv4Error(f"hardware profile dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
        return cls(str(d.get("name", "custom")), peak, bw, dtype, str(d.get("source", "")))


# The paper's Tab. 6 latencies (ms) of the MNv4 models, at each model's native resolution, used to
# anchor the absolute scale of the built-in profiles. None = not reported / failed on that device.
PAPER_LATENCIES_MS: dict[str, dict[str, float]] = {
    "pixel6_cpu": {
        "mnv4_conv_small": 2.4,
        "mnv4_conv_medium": 11.4,
        "mnv4_hybrid_medium": 14.3,
        "mnv4_conv_large": 59.9,
        "mnv4_hybrid_large": 87.6,
    },
    "s23_cpu": {
        "mnv4_conv_small": 1.8,
        "mnv4_conv_medium": 8.6,
        "mnv4_hybrid_medium": 10.8,
        "mnv4_conv_large": 43.0,
        "mnv4_hybrid_large": 61.8,
    },
    "pixel4_dsp": {"mnv4_conv_small": 2.4, "mnv4_conv_medium": 7.3, "mnv4_conv_large": 20.8},
    "pixel8_edgetpu": {
        "mnv4_conv_small": 0.7,
        "mnv4_conv_medium": 1.1,
        "mnv4_hybrid_medium": 1.5,
        "mnv4_conv_large": 2.4,
        "mnv4_hybrid_large": 3.8,
    },
}
PAPER_RIDGE_POINTS = {"pixel6_cpu": 31.2, "s23_cpu": 39.7, "pixel4_dsp": 347.3, "pixel8_edgetpu": 433.8}

# Peak MAC/s from mnv4.perf.roofline.anchor_peak(name) (int8 byte counts); regenerate with it if the
# profiler's byte accounting changes (tests check they still agree).
_ANCHORED_PEAKS = {
    "pixel6_cpu": 1.116e11,
    "s23_cpu": 1.621e11,
    "pixel4_dsp": 1.249e12,
    "pixel8_edgetpu": 9.548e12,
}

DEVICE_NAMES = {
    "pixel6_cpu": "Pixel 6 CPU",
    "s23_cpu": "Samsung S23 CPU",
    "pixel4_dsp": "Pixel 4 Hexagon DSP",
    "pixel8_edgetpu": "Pixel 8 EdgeTPU",
}

BUILTIN_PROFILES: dict[str, HardwareProfile] = {
    key: HardwareProfile.from_ridge(
        key,
        PAPER_RIDGE_POINTS[key],
        _ANCHORED_PEAKS[key],
        dtype="int8",
        source=f"{DEVICE_NAMES[key]} (int8): ridge point from paper Tab. 16; peak anchored to Tab. 6 MNv4 latencies",
    )
    for key in PAPER_RIDGE_POINTS
}


_HOLDS = "peak_macs, bandwidth, ..."


def load_profile(path: str | os.PathLike) -> HardwareProfile:
    return read_record(path, HardwareProfile, "hardware profile", _HOLDS)


def get_profile(name_or_path: str | os.PathLike | HardwareProfile) -> HardwareProfile:
    """A built-in profile by name, or a user profile from a .yaml/.json file."""
    return preset_or_file(name_or_path, HardwareProfile, BUILTIN_PROFILES, "hardware profile", _HOLDS)
