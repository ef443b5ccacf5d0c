"""Post-training quantization settings: what each INT8 route lets one choose, and the one record of
the choices made (:class:`PTQSettings`, built from :class:`mnv4.deploy.requests.ExportRequest`).

``None`` everywhere means the route's own default, which is what mnv4 shipped before these settings
existed; defaults change only when a measurement says so (docs/deploy.md, "Choosing PTQ settings").
Nothing here imports torch or a runtime.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..host import ort_u8s8_saturates

__all__ = [
    "PTQSettings",
    "DEFAULT_PTQ",
    "CALIBRATIONS",
    "GRANULARITIES",
    "NNCF_PRESETS",
    "BIAS_CORRECTIONS",
    "REDUCE_RANGES",
    "ROUTE_SETTINGS",
]

CALIBRATIONS = ("minmax", "percentile", "entropy")
GRANULARITIES = ("per-channel", "per-tensor")
NNCF_PRESETS = ("performance", "mixed")
BIAS_CORRECTIONS = ("fast", "full", "none")
REDUCE_RANGES = ("on", "off")

# format -> setting -> the values its INT8 route honours (a setting absent: the route has no such choice)
ROUTE_SETTINGS: dict[str, dict[str, tuple]] = {
    "onnx": {"calibration": CALIBRATIONS, "weight_granularity": GRANULARITIES, "reduce_range": REDUCE_RANGES},
    "openvino": {
        "calibration": ("minmax", "percentile"),  # NNCF range estimators: MINMAX, MEAN_QUANTILE
        "weight_granularity": GRANULARITIES,
        "nncf_preset": NNCF_PRESETS,
        "bias_correction": BIAS_CORRECTIONS,
        "max_accuracy_drop": (),  # any number; needs labelled evaluation images
    },
    "litert": {"weight_granularity": GRANULARITIES},
    "executorch": {"weight_granularity": GRANULARITIES},
}


@dataclass(frozen=True)
class PTQSettings:
    calibration: str | None = None  # activation ranges: minmax | percentile | entropy
    weight_granularity: str | None = None  # per-channel | per-tensor
    nncf_preset: str | None = None  # performance (symmetric activations) | mixed (asymmetric)
    bias_correction: str | None = None  # NNCF: fast | full | none
    max_accuracy_drop: float | None = None  # NNCF quantize_with_accuracy_control's max_drop
    # ONNX Runtime: 7-bit weights (on) or 8-bit (off); None: 7 bits where this CPU lacks VNNI, whose
    # uint8 x int8 kernels saturate in int16 (mnv4.host.ort_u8s8_saturates; docs/deploy.md).
    reduce_range: str | None = None

    @property
    def per_channel(self) -> bool:
        return self.weight_granularity != "per-tensor"

    @property
    def onnx_reduce_range(self) -> bool:
        """Whether ONNX Runtime's quantizer stores 7-bit weights (the setting, else by this CPU)."""
        if self.reduce_range is not None:
            return self.reduce_range == "on"
        return ort_u8s8_saturates()

    def chosen(self) -> dict:
        """The settings that differ from the route's default."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def unsupported(self, fmt: str) -> list[str]:
        """``setting=value`` pairs the format's INT8 route cannot honour."""
        offered = ROUTE_SETTINGS.get(fmt, {})
        bad = []
        for key, value in self.chosen().items():
            values = offered.get(key)
            if values is None or (values and value not in values):
                bad.append(f"{key}={value}")
        return bad


DEFAULT_PTQ = PTQSettings()  # every route's own defaults
