"""The exception types mnv4 raises for user-facing problems, and the checks that raise them.

Every message is one line naming the problem and what to do. Messages name library parameters and
config fields in backticks (`batch_size`); the command line rewrites those to its own flags
(``--batch-size``), so the library never talks about flags and the CLI never about parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = [
    "MNv4Error",
    "InvalidValue",
    "missing_extra",
    "check_int",
    "check_float",
    "check_choice",
    "check_input_size",
    "MIN_INPUT_SIZE",
    "MAX_INPUT_SIZE",
]

# The input resolutions every command and library entry accepts. Sanity bounds, not what a network
# needs (any size runs; MNv4's stages see a 1x1 map below 32 px): small digit-style models run at
# 16 px, and above 2048 px one image's activations alone take gigabytes (a typo like 30000 would
# end in an out-of-memory kill instead of this message).
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 16, 2048


class MNv4Error(Exception):
    """A problem the user can fix; its message is one line naming the problem and what to do."""


class InvalidValue(MNv4Error, ValueError):
    """An option or config field outside its allowed range or set of choices."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"`{field}` {value!r} is invalid: {allowed}")


def missing_extra(package: str, extra: str) -> MNv4Error:
    return MNv4Error(f"{package} is not installed; install it with: pip install 'mnv4[{extra}]'")


def _describe(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    return "must be " + " and ".join(parts) if parts else "must be a number"


def check_int(field: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in [lo, hi]; bools and non-integral numbers are refused."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok and isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok:
        raise InvalidValue(field, value, "must be a whole number")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidValue(field, value, _describe(lo, hi, False, False))
    return value


def check_input_size(value: Any, field: str = "input_size") -> int:
    """An input resolution in [MIN_INPUT_SIZE, MAX_INPUT_SIZE]: the one range every entry point uses."""
    return check_int(field, value, MIN_INPUT_SIZE, MAX_INPUT_SIZE)


def check_float(
    field: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """``value`` as a finite float within the bounds (``*_open``: the bound itself is excluded)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidValue(field, value, "must be a number")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidValue(field, value, "must be finite")
    if lo is not None and (number < lo or (lo_open and number == lo)):
        raise InvalidValue(field, value, _describe(lo, hi, lo_open, hi_open))
    if hi is not None and (number > hi or (hi_open and number == hi)):
        raise InvalidValue(field, value, _describe(lo, hi, lo_open, hi_open))
    return number


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = list(choices)
    if value not in choices:
        raise InvalidValue(field, value, f"choose one of {', '.join(map(str, choices))}")
    return value
