"""Performance modelling: counting (params, MACs, bytes per layer), roofline, latency."""

from .counting import DTYPE_BYTES, LayerStats, Profile, profile

__all__ = ["DTYPE_BYTES", "LayerStats", "Profile", "profile"]
