"""Performance modelling: counting (params, MACs, bytes per layer), roofline, latency.

Only :mod:`mnv4.perf.counting` needs torch, and it loads on first use of ``profile`` /
``Profile`` / ``LayerStats``: the latency protocol and the dtype table are read by the CLI at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names
from .dtypes import DTYPE_BYTES

if TYPE_CHECKING:
    from .counting import LayerStats, Profile, profile

__all__ = ["DTYPE_BYTES", "LayerStats", "Profile", "profile"]

__getattr__, __dir__ = lazy_names(__name__, dict.fromkeys(("LayerStats", "Profile", "profile"), ".counting"))
