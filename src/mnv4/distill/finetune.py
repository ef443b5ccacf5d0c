"""Fine-tuning a non-MobileNetV4 teacher (EfficientNet-Lite, timm, torchvision) on labelled images.

The paper's teacher is far stronger than its students; on a small dataset the strongest teacher one can
build is usually an ImageNet-pretrained network fine-tuned on the labelled images, at a resolution of
its own (docs/distillation.md, "Teachers"). This runs the ordinary :class:`~mnv4.train.trainer.Trainer`
(recipe ``finetune`` unless told otherwise) on the teacher's network with the teacher's preprocessing,
and saves ``best.safetensors`` / ``last.safetensors`` in the self-describing teacher format that
``load_teacher(path)`` and ``mnv4 distill label --teacher PATH`` read. MobileNetV4 teachers are
fine-tuned with ``mnv4 train --recipe finetune`` instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from ..data.datasets import load_data
from ..errors import MNv4Error
from ..train.trainer import Trainer, TrainResult
from .teachers import load_teacher, save_teacher

__all__ = ["finetune_teacher", "TeacherTrainer"]


def _replace_classifier(model: nn.Module, family: str, num_classes: int) -> None:
    if family == "efficientnet-lite":
        model._fc = nn.Linear(model._fc.in_features, num_classes)
    elif family == "timm":
        model.reset_classifier(num_classes)
    elif family == "torchvision":
        name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], nn.Linear(last.in_features, num_classes))
    else:
        raise MNv4Error(f"cannot replace the classifier of a {family} teacher")


class TeacherTrainer(Trainer):
    """The Trainer for a teacher network: saves weights in the teacher format (family, arch, preprocessing)."""

    def __init__(self, cfg, family: str, arch: str, **kw: Any) -> None:
        super().__init__(cfg, **kw)
        self.family, self.arch = family, arch

    def save_weights(self, model: nn.Module, path: Path, extra: dict[str, Any]) -> None:
        save_teacher(model, path, self.family, self.arch, model.preprocess, list(self.data.class_names), extra)


def finetune_teacher(
    teacher: str,
    data: str,
    output: str | None,
    input_size: int | None = None,
    crop_pct: float | None = None,
    teacher_checkpoint: str | None = None,
    recipe: str = "finetune",
    progress: bool | None = None,
    log=None,
    exist_ok: bool = False,
    resume: str | Path | None = None,
    max_steps: int | None = None,
    **overrides: Any,
) -> TrainResult:
    """Fine-tune ``teacher`` (see :func:`~mnv4.distill.teachers.load_teacher`) on ``data``'s labelled
    images at ``input_size`` (default: the teacher's own); ``crop_pct`` sets the evaluation crop saved with the
    teacher (1.0 for small images whose border matters); ``overrides`` are training config fields.
    ``resume``: a stopped fine-tuning's folder (or ``last.pt``) to continue, with its saved settings (the
    ``overrides`` a resume may change, as ``mnv4 train --resume``; others that differ are refused);
    ``max_steps``: stop after that many steps, resumable."""
    from ..train.config import resolve_config

    saved = None
    if resume is not None:
        from ..train.runs import check_resume_output, checkpoint_file, resumed_train_config

        resume = checkpoint_file(resume)
        check_resume_output(output, resume)
        requested = {"data": data, "input_size": input_size, **overrides}
        saved = resumed_train_config(resume, requested)
        output, input_size = saved.output, saved.input_size
    else:
        resolve_config(recipe, data=data, output=output, **overrides)  # bad options fail before the teacher loads
    t = load_teacher(teacher, teacher_checkpoint, input_size, device="cpu")
    family = t.identity["family"]
    if family == "mnv4":
        raise MNv4Error(
            f"{teacher} is a MobileNetV4: fine-tune it with the trainer's finetune recipe (mnv4 train) instead"
        )
    cfg = saved or resolve_config(recipe, data=data, output=output, input_size=input_size or t.input_size, **overrides)
    bundle = load_data(cfg.data, cfg.data_root, cfg.val_split, cfg.seed)
    net = t.model
    for p in net.parameters():
        p.requires_grad_(True)
    if t.num_classes != len(bundle.class_names) or t.class_names != list(bundle.class_names):
        _replace_classifier(net, family, len(bundle.class_names))
    for m in net.modules():  # PyTorch's faster momentum (or the config's): statistics adapt to the new images
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = cfg.bn_momentum if cfg.bn_momentum is not None else 0.1
    net.preprocess = dataclasses.replace(
        t.preprocess, input_size=cfg.input_size, crop_pct=crop_pct or t.preprocess.crop_pct
    )
    trainer = TeacherTrainer(
        cfg,
        t.identity["family"],
        t.identity["arch"],
        data=bundle,
        model=net,
        progress=progress,
        log=log,
        exist_ok=exist_ok,
    )
    # the command that continues this run, named in the stop line (Trainer.resume_command)
    trainer.command = f"mnv4 distill finetune --teacher {teacher} --data {data}" + (
        f" --teacher-checkpoint {teacher_checkpoint}" if teacher_checkpoint else ""
    )
    return trainer.run(resume, max_steps)
