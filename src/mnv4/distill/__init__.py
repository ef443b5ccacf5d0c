"""Knowledge distillation the paper's way (docs/distillation.md): offline teacher soft-label datasets
(augment, JPEG round trip, teacher probabilities, in tar shards), dynamic mixing of several such datasets
by ratio, and the flip-only student trained with soft-label cross-entropy; online distillation as the
comparison anchor."""

from .augment import POLICIES, AugPolicy, get_policy
from .dataset import MixedSoftLabels, MixingSampler, SoftLabelSet, StudentView, check_compatible, parse_mix
from .label import LabelConfig, LabelResult, label
from .loss import sharpen, soft_cross_entropy
from .student import DistillTrainer, train_student
from .teachers import Teacher, load_teacher, save_teacher

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
