"""Deployment: inference fusion, export to mobile/edge runtimes with parity checks, INT8, benchmarks.

Nothing heavy is imported here: the format table (:mod:`mnv4.deploy.formats`) must be readable
without torch (the CLI lists the formats at start-up), and each export, quantization and benchmark
route imports its runtime inside the function that needs it. :func:`fuse` and :func:`is_fused`
(from :mod:`mnv4.deploy.fusion`) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

if TYPE_CHECKING:
    from .fusion import fuse, is_fused

__all__ = ["fuse", "is_fused"]

__getattr__, __dir__ = lazy_names(__name__, dict.fromkeys(__all__, ".fusion"))
