"""Sharing models on the Hugging Face Hub: ``push_to_hub`` (``mnv4 hub push``). Loading is
``mnv4.create_model("hf-hub:OWNER/REPO")``."""

from __future__ import annotations

from .push import push_to_hub

__all__ = ["push_to_hub"]
