"""Deployment: inference fusion, export to mobile/edge runtimes with parity checks, INT8, benchmarks.

Only :func:`fuse` is imported eagerly; the export, quantization and benchmark routes import their
(optional, heavy) runtimes inside the functions that need them.
"""

from .fuse import fuse, is_fused

__all__ = ["fuse", "is_fused"]
