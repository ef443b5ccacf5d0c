"""The student side of distillation: a :class:`~mnv4.train.trainer.Trainer` whose targets are teacher
probabilities (docs/distillation.md, "Student training").

* Offline (the paper's recipe): ``distill`` names soft-label folders made by :func:`mnv4.distill.label`;
  :class:`~mnv4.distill.dataset.MixingSampler` mixes them per global batch by ``mix`` (``1:1:2``), and the
  student sees each stored record decoded, resized to its resolution and flipped at random - nothing
  else, since the records are augmented already.
* Online (the field's usual anchor, as in timm and big_vision): a live ``teacher`` labels each batch
  of ``data``'s training images, augmented on the fly with ``teacher_aug`` (the same policies the
  labeller uses, with the config's ``crop_scale`` as the Inception crop range, without the JPEG round
  trip); the teacher sees them at its resolution, the student at its own.

Either way the loss is cross-entropy against the teacher's probabilities, the number of classes and
their names come from the teacher, and ``data`` supplies labelled validation images whose classes are
matched to the teacher's by name or ImageNet WordNet id. All randomness is seeded by (seed, step or
sample), so resume stays bit-exact and torchrun ranks split global batches as in normal training.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data.datasets import DataBundle, Relabelled, load_data
from ..data.images import BadImage
from ..data.sampling import GlobalBatchSampler, sample_seed
from ..errors import MNv4Error, check_choice
from ..threads import sample_threads
from ..train.config import TrainConfig
from ..train.trainer import Trainer, TrainResult, train
from .augment import POLICIES, augment, get_policy, mixing_partner
from .dataset import MixedSoftLabels, MixingSampler, SoftLabelSet, StudentView, check_compatible, parse_mix
from .labelling import MANIFEST
from .loss import sharpen, soft_cross_entropy
from .sources import map_classes, to_uint8
from .teachers import Teacher, load_teacher

__all__ = ["DistillTrainer", "OnlineImages", "train_student"]


class OnlineImages(Dataset):
    """``(epoch, i)`` -> (uint8 image [3, S, S] augmented by ``policy`` and flipped, 0): what a live teacher
    and the student both see of training image ``i`` in that epoch (the label is replaced by the teacher's)."""

    def __init__(
        self,
        images: Dataset,
        policy_name: str,
        size: int,
        seed: int,
        hflip: float,
        crop_scale: tuple[float, float] | None = None,
    ) -> None:
        policy = get_policy(policy_name)
        if crop_scale is not None and policy.crop:
            policy = dataclasses.replace(policy, crop_scale=tuple(crop_scale))
        self.images, self.policy, self.size, self.seed, self.hflip = images, policy, size, seed, hflip

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def _load(self, i: int) -> torch.Tensor | BadImage:
        im = self.images[i][0]
        return im if isinstance(im, BadImage) else to_uint8(im.convert("RGB"))

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[Any, int]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        with sample_threads():
            return self._make(epoch, i)

    def _make(self, epoch: int, i: int) -> tuple[Any, int]:
        seed = sample_seed(self.seed, epoch, i, 0x0A11E)
        image = self._load(i)
        if isinstance(image, BadImage):
            return image, 0
        partner = None
        if self.policy.mixup_alpha > 0:
            partner = self._load(mixing_partner(i, len(self), seed))
            if isinstance(partner, BadImage):
                return partner, 0
        out, _ = augment(self.policy, image, self.size, seed, partner)
        if self.hflip > 0 and np.random.default_rng([seed, 0xF11]).random() < self.hflip:
            out = out.flip(-1)
        return out.contiguous(), 0


def _manifest_sha(folder: Path) -> str:
    return hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()


class DistillTrainer(Trainer):
    """:class:`~mnv4.train.trainer.Trainer` with teacher probabilities as targets (module docstring).

    ``data`` may be given like for the Trainer: its ``val`` is the validation set (classes matched to the
    teacher's), and in online mode its ``train`` holds the images the live teacher labels.
    """

    distills = True
    _online_view: StudentView | None = None  # the student's view of the live teacher's images, built once

    # ------------------------------------------------------------------ data
    def setup(self, resume: str | Path | None = None) -> None:
        from ..train.distributed import setup as dist_setup

        check_choice("teacher_aug", self.cfg.teacher_aug, POLICIES)

        self.data = self._distill_data(dist_setup(self.cfg.device), self.data)
        super().setup(resume)

    def _validation_bundle(self, info, given: DataBundle | None) -> DataBundle:
        cfg = self.cfg
        if given is not None:
            return given
        if cfg.data is None:
            raise MNv4Error(
                "distillation needs labelled validation images whose classes the teacher knows: pass `data` "
                "(a folder with val/, or a built-in dataset)"
            )
        bundle = load_data(cfg.data, cfg.data_root, cfg.val_split, cfg.seed) if info.is_main else None
        if info.distributed:
            dist.barrier()  # rank 0 downloads/unpacks first
        return bundle or load_data(cfg.data, cfg.data_root, cfg.val_split, cfg.seed)

    def _distill_data(self, info, given: DataBundle | None) -> DataBundle:
        cfg = self.cfg
        self.sets: list[SoftLabelSet] = []
        self.teacher: Teacher | None = None
        if cfg.distill:
            self.sets = [SoftLabelSet(d) for d in cfg.distill]
            self.ratios = parse_mix(cfg.mix, len(self.sets))
            num_classes, names = check_compatible(self.sets)
            teacher_name = self.sets[0].teacher.get("spec", "the teacher")
        else:
            self.teacher = load_teacher(cfg.teacher, cfg.teacher_checkpoint, None, info.device)
            num_classes, names = self.teacher.num_classes, self.teacher.class_names
            teacher_name = cfg.teacher
        bundle = self._validation_bundle(info, given)
        try:
            mapping, how = map_classes(list(bundle.class_names), names, num_classes)
        except MNv4Error as e:
            raise MNv4Error(
                f"the validation data ({bundle.name}) does not match the classes of {teacher_name} "
                f"({num_classes} classes): {e}; validate on images of the teacher's classes"
            ) from None
        self.class_match = how
        val = bundle.val if mapping == list(range(len(mapping))) else Relabelled(bundle.val, mapping)
        class_names = list(names) if names else [str(i) for i in range(num_classes)]
        if self.sets:
            size = max(s.image_size for s in self.sets)
            train: Dataset = MixedSoftLabels(self.sets, StudentView(size, (0.5,) * 3, (0.5,) * 3), cfg.seed)
            name = "+".join(s.name for s in self.sets)
            return DataBundle(name, train, val, class_names, size)
        return DataBundle(f"{bundle.name}-online", bundle.train, val, class_names, bundle.input_size)

    def _student_view(self) -> StudentView:
        pp = self.model.preprocess
        return StudentView(pp.input_size, tuple(pp.mean), tuple(pp.std), pp.interpolation, self.cfg.hflip)

    def build_train_dataset(self) -> Dataset:
        if self.sets:
            return MixedSoftLabels(self.sets, self._student_view(), self.cfg.seed)
        size = max(self.teacher.input_size, self.model.preprocess.input_size)
        cfg = self.cfg
        return OnlineImages(self.data.train, cfg.teacher_aug, size, cfg.seed, cfg.hflip, tuple(cfg.crop_scale))

    def build_train_sampler(self, dataset: Dataset):
        info = self.info
        if self.sets:
            sizes = [len(s) for s in self.sets]
            return MixingSampler(
                sizes, self.ratios, self.cfg.batch_size, info.rank, info.world_size, self.cfg.seed, len(dataset)
            )
        return GlobalBatchSampler(
            len(dataset), self.cfg.batch_size, info.rank, info.world_size, shuffle=True, seed=self.cfg.seed
        )

    # ------------------------------------------------------------------ targets and loss
    def make_targets(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.teacher is None:
            return x, y  # offline: the stored probabilities, the student's input made by the dataset
        probs = F.softmax(self.teacher.logits(x), dim=-1).to(x.device)  # stays on the device
        if self._online_view is None:
            self._online_view = self._student_view()
        return self._online_view(x, flip=False), probs  # flipped already, identically for teacher and student

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy(logits, sharpen(target, self.cfg.teacher_temperature))

    # ------------------------------------------------------------------ state and summary
    def _sources(self) -> dict[str, Any]:
        if self.sets:
            folders = [s.folder for s in self.sets]
            return {"distill": [str(f) for f in folders], "manifests": [_manifest_sha(f) for f in folders]}
        return {"teacher": self.teacher.identity.get("weights_sha256") or self.cfg.teacher}

    def extra_state(self) -> dict[str, Any]:
        return {"distill_sources": self._sources()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("distill_sources")
        now = self._sources()
        if saved is not None and saved.get("manifests", saved.get("teacher")) != now.get(
            "manifests", now.get("teacher")
        ):
            raise MNv4Error(
                "the soft-label datasets (or the teacher) changed since this run was started; resuming would not "
                "continue the same run - start a new one"
            )

    def summary(self, wall: float) -> dict[str, Any]:
        s = super().summary(wall)
        if self.sets:
            s["distill"] = {
                "datasets": [str(x.folder) for x in self.sets],
                "records": [len(x) for x in self.sets],
                "mix": ":".join(map(str, self.ratios)),
                "teacher": self.sets[0].teacher.get("spec"),
            }
        else:
            s["distill"] = {"online_teacher": self.cfg.teacher, "teacher_aug": self.cfg.teacher_aug}
        s["distill"]["teacher_temperature"] = self.cfg.teacher_temperature
        s["distill"]["val_classes_matched"] = self.class_match
        return s


def train_student(cfg: TrainConfig, resume: str | Path | None = None, **kwargs: Any) -> TrainResult:
    """:func:`mnv4.train.train` for a distillation config (``cfg.distill`` soft-label folders mixed by
    ``cfg.mix``, or a live ``cfg.teacher``): the same arguments, guarantees and result."""
    if not (cfg.distill or cfg.teacher):
        raise MNv4Error("train_student needs soft-label folders (`distill`) or a live `teacher` in the config")
    return train(cfg, resume, trainer=DistillTrainer, **kwargs)
