"""Knowledge distillation the paper's way (docs/distillation.md): offline teacher soft-label datasets
(augment, JPEG round trip, teacher probabilities, in tar shards), dynamic mixing of several such datasets
by ratio, and the flip-only student trained with soft-label cross-entropy; online distillation as the
comparison anchor.

Nothing heavy is imported here: the commands' requests and the policy table
(:mod:`mnv4.distill.requests`, :mod:`mnv4.distill.policies`) must be readable without torch (the CLI
builds its flags from them at start-up); the names below load their module on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

if TYPE_CHECKING:
    from .dataset import MixedSoftLabels, MixingSampler, SoftLabelSet, StudentView, check_compatible, parse_mix
    from .labelling import LabelResult, label
    from .loss import sharpen, soft_cross_entropy
    from .policies import POLICIES, AugPolicy, get_policy
    from .requests import LabelConfig
    from .student import DistillTrainer, train_student
    from .teachers import Teacher, load_teacher, save_teacher

# name -> the module (in this package) that holds it
_HOMES = {
    **dict.fromkeys(("POLICIES", "AugPolicy", "get_policy"), ".policies"),
    "LabelConfig": ".requests",
    **dict.fromkeys(("LabelResult", "label"), ".labelling"),
    **dict.fromkeys(
        ("SoftLabelSet", "MixingSampler", "MixedSoftLabels", "StudentView", "check_compatible", "parse_mix"), ".dataset"
    ),
    **dict.fromkeys(("sharpen", "soft_cross_entropy"), ".loss"),
    **dict.fromkeys(("DistillTrainer", "train_student"), ".student"),
    **dict.fromkeys(("Teacher", "load_teacher", "save_teacher"), ".teachers"),
}
__all__ = [
    "POLICIES",
    "AugPolicy",
    "get_policy",
    "LabelConfig",
    "LabelResult",
    "label",
    "SoftLabelSet",
    "MixingSampler",
    "MixedSoftLabels",
    "StudentView",
    "check_compatible",
    "parse_mix",
    "sharpen",
    "soft_cross_entropy",
    "DistillTrainer",
    "train_student",
    "Teacher",
    "load_teacher",
    "save_teacher",
]

__getattr__, __dir__ = lazy_names(__name__, _HOMES)
