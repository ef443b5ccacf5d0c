"""Neural architecture search over the MNv4 UIB space: the paper's two-stage TuNAS (docs/nas.md).

Nothing heavy is imported here: the search's request (:mod:`mnv4.nas.requests`) must be readable
without torch (the CLI builds ``mnv4 search``'s flags from it at start-up); the names below load
their module on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

if TYPE_CHECKING:
    from .compact import spec_from_string, spec_to_string
    from .space import SPACES, Arch, Decision, SearchSpace, StageSpace, get_space

__all__ = [
    "Arch",
    "Decision",
    "SearchSpace",
    "StageSpace",
    "SPACES",
    "get_space",
    "spec_from_string",
    "spec_to_string",
]
_COMPACT = ("spec_from_string", "spec_to_string")
__getattr__, __dir__ = lazy_names(__name__, {n: ".compact" if n in _COMPACT else ".space" for n in __all__})
