"""ImageNet-1k class names, taken offline from torchvision's bundled weight metadata."""

from __future__ import annotations

from functools import lru_cache

__all__ = ["imagenet_class_names"]


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    from torchvision.models import MobileNet_V3_Small_Weights

    return tuple(MobileNet_V3_Small_Weights.IMAGENET1K_V1.meta["categories"])
