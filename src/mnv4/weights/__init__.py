"""Checkpoint reading and writing, timm conversion (both ways), hub download."""

from .timm import save_timm, to_timm

__all__ = ["to_timm", "save_timm"]
