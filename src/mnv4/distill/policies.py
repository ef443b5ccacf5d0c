"""The augmentation policies of the paper's teacher datasets, as data (docs/distillation.md, "Datasets").

* ``inception-randaug-l2m9`` (D1): Inception crop, then RandAugment with 2 ops at level 9;
* ``inception-extreme-mixup`` (D2): two Inception crops (the image and a seeded partner) mixed with a
  weight drawn from Beta(1, 1), on every record (the mixing partner and the weight are recorded);
* ``inception-randaug-l2m5`` (D3): Inception crop, then RandAugment with 2 ops at level 5 (weak);
* ``inception``: the Inception crop alone, no RandAugment: the light view for small photos, where
  RandAugment's views cost a teacher much of its accuracy (docs/distillation.md, "When distillation pays");
* ``none``: the whole image, resized (shorter side to the record size, centre crop).

This table is the one list of policy names: the CLI reads its choices from here at start-up, so
nothing here imports torch. :mod:`mnv4.distill.augment` applies a policy to an image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import check_choice

__all__ = ["AugPolicy", "POLICIES", "VIEW_POLICIES", "RANDAUG_FILL", "get_policy"]

# TF's RandAugment fills the area uncovered by rotate / shear / translate with grey 128.
RANDAUG_FILL = 128


@dataclass(frozen=True)
class AugPolicy:
    name: str
    crop: bool = True  # Inception crop; False: resize the whole image
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    randaug_layers: int = 0
    randaug_magnitude: float = 0.0  # TF's 0-10 level scale
    mixup_alpha: float = 0.0  # > 0: mix every record with a partner, weight ~ Beta(alpha, alpha)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "crop": "inception" if self.crop else "resize",
            "crop_scale": list(self.crop_scale),
            "crop_ratio": [round(r, 6) for r in self.crop_ratio],
            "randaug_layers": self.randaug_layers,
            "randaug_magnitude": self.randaug_magnitude,
            "randaug_fill": RANDAUG_FILL,
            "mixup_alpha": self.mixup_alpha,
            "flip": False,
        }


POLICIES: dict[str, AugPolicy] = {
    p.name: p
    for p in (
        AugPolicy("inception-randaug-l2m9", randaug_layers=2, randaug_magnitude=9, note="D1"),
        AugPolicy("inception-extreme-mixup", mixup_alpha=1.0, note="D2 (Patient Teacher's function matching)"),
        AugPolicy("inception-randaug-l2m5", randaug_layers=2, randaug_magnitude=5, note="D3 (weak)"),
        AugPolicy("inception", note="crop only (small photos)"),
        AugPolicy("none", crop=False, note="un-augmented"),
    )
}
# Policies that keep one image per view (no mixing partner): what a frozen teacher's extra views may use,
# since each view's features are fitted to the image's own label.
VIEW_POLICIES = tuple(name for name, p in POLICIES.items() if not p.mixup_alpha)


def get_policy(name: str, crop_min: float | None = None) -> AugPolicy:
    """The policy ``name``; ``crop_min`` raises its smallest Inception-crop area (small images)."""
    policy = POLICIES[check_choice("aug", name, POLICIES)]
    if crop_min is not None and policy.crop:
        policy = dataclasses.replace(policy, crop_scale=(crop_min, policy.crop_scale[1]))
    return policy
