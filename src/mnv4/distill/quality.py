"""How good a teacher is on labelled images: top-1 and mean top probability (docs/distillation.md,
"Teachers").

One place for the figures every teacher report gives (`mnv4 distill finetune --ensemble ... --data`,
`benchmarks/distill_gain.py`): the teacher runs on its own eval view of each image (its resolution and
normalisation), and classes are matched to the teacher's by name, so a folder whose classes are listed
in another order still scores correctly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MNv4Error

__all__ = ["TeacherQuality", "teacher_predictions", "teacher_quality"]


@dataclass(frozen=True)
class TeacherQuality:
    top1: float  # percent
    mean_max_prob: float
    images: int


def _labelled_folder(data: str | os.PathLike) -> Path:
    """``data``'s ``val/`` split when it has one, else ``data`` itself (a class-folder tree)."""
    path = Path(data)
    return path / "val" if (path / "val").is_dir() else path


def teacher_predictions(teacher, data: str | os.PathLike, batch_size: int = 64):
    """The teacher's probabilities on ``data``'s labelled images and the labels in the teacher's class
    order. ``teacher`` is a :class:`mnv4.distill.teachers.Teacher` or anything ``load_teacher`` takes."""
    from .sources import open_source, to_uint8
    from .teachers import load_teacher

    t = load_teacher(str(teacher)) if isinstance(teacher, (str, os.PathLike)) else teacher
    src = open_source(_labelled_folder(data))
    if src.labels is None:
        raise MNv4Error(f"{data}: no labels; a folder of class folders (or one with val/) scores a teacher")
    missing = sorted(set(src.class_names) - set(t.class_names))
    if missing:
        raise MNv4Error(f"{data}: classes {missing[:5]} are not among the teacher's; score it on its own classes")
    probs = []
    with torch.inference_mode():
        for i in range(0, len(src), batch_size):
            views = [t.view(to_uint8(src.load(j))) for j in range(i, min(i + batch_size, len(src)))]
            probs.append(t.probs(torch.stack(views)))
    target = torch.tensor([t.class_names.index(src.class_names[c]) for c in src.labels])
    return torch.cat(probs), target, list(t.class_names)


def teacher_quality(teacher, data: str | os.PathLike) -> TeacherQuality:
    """Top-1 (percent) and mean top probability of ``teacher`` on ``data``'s labelled images."""
    probs, target, _ = teacher_predictions(teacher, data)
    top1 = 100.0 * float(probs.argmax(1).eq(target).float().mean())
    return TeacherQuality(top1, float(probs.max(1).values.mean()), len(target))
