"""Element widths the byte counts can use (torch-free: the CLI offers them as choices at start-up)."""

from __future__ import annotations

__all__ = ["DTYPE_BYTES"]

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
