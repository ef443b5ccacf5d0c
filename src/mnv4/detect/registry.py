"""Detector names: ``<head>_<backbone>`` for every head and every registered MobileNetV4.

Same conventions as the classifiers (docs/architecture.md §1): a name is the head, an underscore, and a
registered backbone name or timm alias (``retinanet_mnv4_conv_medium``, ``ssdlite_mobilenetv4_conv_small``),
optionally with a weight tag for the backbone (``retinanet_mnv4_conv_medium.e500_r256_in1k``).
"""

from __future__ import annotations

import fnmatch

from ..errors import MNv4Error, check_choice
from ..models.registry import MODELS

__all__ = ["HEADS", "list_detectors", "split_detector_name"]

HEADS = ("retinanet", "ssdlite")


def list_detectors(pattern: str = "*") -> list[str]:
    """Every registered detector name matching the glob ``pattern``."""
    names = [f"{h}_{m}" for h in HEADS for m in MODELS]
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def split_detector_name(name: str, head: str | None) -> tuple[str, str]:
    """(head, backbone name) from ``retinanet_mnv4_conv_small`` or from a bare backbone name plus ``head``."""
    for h in HEADS:
        if name.startswith(h + "_"):
            if head is not None and head != h:
                raise MNv4Error(f"{name!r} names the {h} head but `head` is {head!r}; pass one of them")
            return h, name[len(h) + 1 :]
    head = "retinanet" if head is None else head
    check_choice("head", head, HEADS)
    return head, name
