"""The search on soft labels (``mnv4 search --distill DIR ... [--mix 1:1:2]``; docs/nas.md, "Distillation").

The paper trains its super-network on offline distillation data (§6.1, Tab. 5: the reward is less noisy).
Here the shared weights learn from soft-label datasets made by ``mnv4 distill label``, mixed per global
batch by ratio exactly as a distilled student's are (:class:`~mnv4.distill.dataset.MixingSampler`), with
the soft-label cross-entropy; the controller's reward is still the top-1 on the held-out ``reward_split``
of ``data``'s labelled images (classes matched to the teacher's), and BatchNorm recalibration uses the
rest of ``data``'s labelled images. Everything stays a function of (seed, step), so a resumed search
replays the uninterrupted one.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch.utils.data import Dataset

from ..data.datasets import DataBundle, Relabelled
from ..distill.dataset import MixedSoftLabels, MixingSampler, SoftLabelSet, StudentView, check_compatible, parse_mix
from ..distill.labelling import MANIFEST
from ..distill.loss import soft_cross_entropy
from ..distill.sources import map_classes
from ..errors import MNv4Error
from .search import SearchConfig, SuperNetTrainer

__all__ = ["SoftLabelSuperNetTrainer", "soft_label_bundle"]


def soft_label_bundle(cfg: SearchConfig, split: DataBundle) -> tuple[DataBundle, Dataset, list[SoftLabelSet]]:
    """(the search's data on soft labels, the labelled images for BN calibration, the soft-label sets).

    ``split`` is the labelled data already split into weight images (``train``) and reward images (``val``).
    """
    sets = [SoftLabelSet(d) for d in cfg.distill]
    num_classes, names = check_compatible(sets)
    try:
        mapping, _ = map_classes(list(split.class_names), names, num_classes)
    except MNv4Error as e:
        raise MNv4Error(
            f"the reward images ({split.name}) do not match the soft labels' {num_classes} classes: {e}"
        ) from None
    val = split.val if mapping == list(range(len(mapping))) else Relabelled(split.val, mapping)
    class_names = list(names) if names else [str(i) for i in range(num_classes)]
    size = max(s.image_size for s in sets)
    train = MixedSoftLabels(sets, StudentView(size, (0.5,) * 3, (0.5,) * 3), cfg.seed)  # sized for the plan
    name = "+".join(s.name for s in sets)
    return DataBundle(name, train, val, class_names, split.input_size), split.train, sets


class SoftLabelSuperNetTrainer(SuperNetTrainer):
    """:class:`~mnv4.nas.search.SuperNetTrainer` whose shared weights learn from mixed soft-label datasets."""

    def __init__(self, scfg: SearchConfig, split: DataBundle, cost_model, progress=None, log=None) -> None:
        data, self.calib_source, self.sets = soft_label_bundle(scfg, split)
        self.ratios = parse_mix(scfg.mix, len(self.sets))
        super().__init__(scfg, data, cost_model, progress, log)

    def calib_images(self) -> Dataset:
        return self.calib_source

    def build_train_dataset(self) -> Dataset:
        pp = self.model.preprocess
        view = StudentView(pp.input_size, tuple(pp.mean), tuple(pp.std), pp.interpolation, self.cfg.hflip)
        return MixedSoftLabels(self.sets, view, self.cfg.seed)

    def build_train_sampler(self, dataset: Dataset) -> MixingSampler:
        info = self.info
        sizes = [len(s) for s in self.sets]
        cfg = self.cfg
        return MixingSampler(sizes, self.ratios, cfg.batch_size, info.rank, info.world_size, cfg.seed, len(dataset))

    def make_targets(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y  # the stored probabilities; no Mixup of soft labels

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy(logits, target)

    def _manifests(self) -> list[str]:
        return [hashlib.sha256((s.folder / MANIFEST).read_bytes()).hexdigest() for s in self.sets]

    def extra_state(self) -> dict[str, Any]:
        return dict(super().extra_state(), soft_label_manifests=self._manifests())

    def load_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("soft_label_manifests")
        if saved is not None and list(saved) != self._manifests():
            raise MNv4Error(
                "the soft-label datasets changed since this search was started; resuming would not continue "
                "the same search - start a new one"
            )
        super().load_extra_state(state)
