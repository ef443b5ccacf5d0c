"""Ensemble teachers: several teacher files as one, their probabilities averaged (docs/distillation.md).

An ensemble file is an ordinary teacher file (format ``mnv4-teacher``, family ``ensemble``): each member's
weights under ``m{i}.``, each member's own teacher record (family, architecture, preprocessing) in the
metadata. Members keep their own resolution and normalisation: the ensemble's network takes the image as
0-255 floats at the largest member resolution and gives every member its own view of it. Its output is
the log of the averaged probabilities, so the softmax that every consumer applies returns the average.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..errors import MNv4Error
from ..models.registry import Preprocess

__all__ = ["EnsembleNet", "save_ensemble", "build_ensemble"]

# Identity normalisation on the 0-1 scale: (x - 0) / (1/255 * 255) = x, so members see 0-255 floats.
_RAW = Preprocess(224, 1.0, "bilinear", (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))


class EnsembleNet(nn.Module):
    """0-255 float images -> log of the members' mean probabilities."""

    def __init__(self, members: list[nn.Module], preprocess: list[Preprocess], num_classes: int) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.preprocess_of = list(preprocess)
        self.num_classes = int(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = []
        for net, pp in zip(self.members, self.preprocess_of):
            y = x
            if y.shape[-1] != pp.input_size or y.shape[-2] != pp.input_size:
                mode = InterpolationMode(pp.interpolation)
                y = TF.resize(y, [pp.input_size, pp.input_size], interpolation=mode, antialias=True)
            mean = torch.tensor(pp.mean, dtype=y.dtype, device=y.device).view(-1, 1, 1) * 255.0
            std = torch.tensor(pp.std, dtype=y.dtype, device=y.device).view(-1, 1, 1) * 255.0
            probs.append(F.softmax(net((y - mean) / std).float(), dim=-1))
        return torch.stack(probs).mean(0).clamp_min(1e-30).log()


def save_ensemble(files: list[str | os.PathLike], path: str | os.PathLike, teacher_format: str) -> Path:
    """Write the teacher files ``files`` (from ``distill finetune``, either mode; metadata ``format`` =
    ``teacher_format``) as one ensemble teacher file (:func:`mnv4.distill.teachers.save_ensemble_teacher`)."""
    from ..weights.io import read_checkpoint, write_safetensors

    if len(files) < 2:
        raise MNv4Error("`ensemble` needs at least two teacher files")
    tensors: dict[str, torch.Tensor] = {}
    members: list[dict[str, Any]] = []
    for i, f in enumerate(files):
        if not Path(f).is_file():
            raise MNv4Error(f"ensemble member {f}: no such file")
        sd, cfg = read_checkpoint(f)
        if not cfg or cfg.get("format") != teacher_format or cfg.get("family") == "ensemble":
            raise MNv4Error(f"ensemble member {f}: not a teacher file from `mnv4 distill finetune`")
        if members and cfg.get("class_names") != members[0].get("class_names"):
            raise MNv4Error(f"ensemble member {f}: its classes differ from {files[0]}'s; members must share them")
        members.append(dict(cfg, file=str(f)))
        tensors.update({f"m{i}.{k}": v for k, v in sd.items()})
    size = max(int(m["preprocess"]["input_size"]) for m in members)
    first = Preprocess.from_dict(members[0]["preprocess"])
    pp = Preprocess(size, first.crop_pct, "bilinear", _RAW.mean, _RAW.std)
    cfg = {
        "format": teacher_format,
        "version": 1,
        "family": "ensemble",
        "arch": "+".join(str(m["arch"]) for m in members),
        "num_classes": int(members[0]["num_classes"]),
        "preprocess": pp.to_dict(),
        "class_names": members[0].get("class_names"),
        "members": members,
    }
    return write_safetensors(path, tensors, cfg)


def build_ensemble(
    sd: dict[str, torch.Tensor],
    cfg: dict[str, Any],
    weights: str,
    input_size: int | None,
    build_member: Callable[[int, dict[str, Any], dict[str, torch.Tensor]], tuple[nn.Module, Preprocess, int]],
) -> tuple[EnsembleNet, Preprocess]:
    """The network of an ensemble file (see :func:`save_ensemble`) and its preprocessing; ``build_member(i,
    record, weights)`` is the teacher loader's builder of one member (its network, preprocessing, classes)."""
    import dataclasses

    nets, pps, classes = [], [], 0
    for i, m in enumerate(cfg.get("members") or []):
        prefix = f"m{i}."
        part = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        net, pp, n = build_member(i, m, part)
        nets.append(net.eval())
        pps.append(pp)
        classes = classes or n
    if len(nets) < 2:
        raise MNv4Error(f"{weights}: an ensemble teacher file without members; write it with save_ensemble")
    pp = Preprocess.from_dict(cfg["preprocess"])
    pp = dataclasses.replace(pp, input_size=input_size or pp.input_size)
    return EnsembleNet(nets, pps, classes), pp
