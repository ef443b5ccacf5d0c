"""The one exception type mnv4 raises for user-facing problems (bad input, missing extras)."""

from __future__ import annotations


class MNv4Error(Exception):
    """A problem the user can fix; its message is one line naming the problem and what to do."""


def missing_extra(package: str, extra: str) -> MNv4Error:
    return MNv4Error(f"{package} is not installed; install it with: pip install 'mnv4[{extra}]'")
