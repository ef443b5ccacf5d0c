"""Neural architecture search over the MNv4 UIB space: the paper's two-stage TuNAS (docs/nas.md)."""

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
