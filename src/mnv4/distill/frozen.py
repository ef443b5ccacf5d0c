"""Frozen-backbone teachers: cached pooled features plus a head fitted in seconds (docs/distillation.md).

A pretrained teacher (EfficientNet-Lite, timm, torchvision) is run once over the labelled images at its
native resolution, un-augmented and in ``views`` augmented views; its pooled features (what its classifier
sees) are cached on disk in safetensors files keyed by (teacher, data, view), so a rerun, or a second
head on the same features, costs no forward pass. A multinomial logistic regression (full-batch L-BFGS on
standardised features, the standardisation folded back into the weights) then replaces the teacher's
classifier, and the network is saved as an ordinary teacher file that ``distill label``, ``eval`` and
``predict`` read.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.images import BadImage
from ..data.sampling import sample_seed
from ..errors import MNv4Error
from ..files import atomic_write_json
from ..threads import sample_threads
from .augment import augment
from .engines import accelerate, parity_sample
from .finetune import _replace_classifier
from .requests import FrozenConfig
from .sources import ImageSource, open_source, to_uint8
from .teachers import Teacher, load_teacher, save_teacher

__all__ = [
    "FrozenConfig",
    "FrozenResult",
    "frozen_teacher",
    "cached_features",
    "pooled_features",
    "feature_extractor",
    "fit_linear_head",
]

_VIEW_SALT = 0xF0E5  # keeps the views' seeds apart from the labelling records'


@dataclass
class FrozenResult:
    teacher_file: Path
    summary: dict[str, Any] = field(default_factory=dict)


def _classifier(model: nn.Module) -> nn.Linear:
    """The teacher's classifier: its last ``nn.Linear`` (Lite's ``_fc``, timm's head, torchvision's fc)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise MNv4Error(f"teacher {type(model).__name__} has no linear classifier to fit a head in place of")
    return linears[-1]


@torch.inference_mode()
def pooled_features(teacher: Teacher, images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, 3, S, S] at the teacher's resolution -> float32 [B, D]: the classifier's input."""
    if getattr(teacher, "pooled", False):  # a feature extractor (see feature_extractor): its output
        return teacher.logits(images).flatten(1).cpu()
    seen: list[torch.Tensor] = []
    hook = _classifier(teacher.model).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        teacher.model(teacher.model_input(images))
    finally:
        hook.remove()
    return seen[-1].float().flatten(1).cpu()


def feature_extractor(teacher: Teacher, engine: str, sample: torch.Tensor, say=print) -> Teacher:
    """The teacher's network up to its classifier (the classifier made an identity), on the fastest
    ``engine`` whose features match eager PyTorch's (mnv4.distill.engines); same identity, so the same
    feature cache."""
    import copy

    net = copy.deepcopy(teacher.model)
    name = next(n for n, m in reversed(list(net.named_modules())) if m is _classifier(net))
    parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    width = _classifier(teacher.model).in_features
    plain = Teacher(net, teacher.preprocess, None, dict(teacher.identity, num_classes=width))
    fast = accelerate(plain, engine, sample, say, outputs="features")[0]
    fast.pooled = True
    return fast


class _Views(Dataset):
    """Image ``i`` -> (i, uint8 view at the teacher's resolution) or (i, BadImage); ``view`` None is the
    teacher's own evaluation view, ``view`` r >= 0 the r-th augmented view (seeded by seed, r, i)."""

    def __init__(self, source: ImageSource, teacher: Teacher, view: int | None, cfg: FrozenConfig) -> None:
        self.source, self.teacher, self.view, self.seed = source, teacher, view, cfg.seed
        self.policy = cfg.policy() if view is not None else None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple:
        with sample_threads():
            image = self.source.load(i)
            if isinstance(image, BadImage):
                return i, image
            x = to_uint8(image)
            if self.view is None:
                return i, self.teacher.view(x)
            seed = sample_seed(self.seed, self.view, i, _VIEW_SALT)
            return i, augment(self.policy, x, self.teacher.input_size, seed)[0]


def _view_key(teacher: Teacher, source: ImageSource, view: int | None, cfg: FrozenConfig) -> dict[str, Any]:
    ident = teacher.identity
    ids = hashlib.sha256("\n".join(source.ids).encode()).hexdigest()
    aug = None if view is None else {"policy": cfg.policy().to_dict(), "view": view}
    return {
        "teacher": {k: ident.get(k) for k in ("spec", "arch", "weights_sha256", "preprocess")},
        "source": {"location": source.location, "images": len(source), "ids_sha256": ids},
        "view": "eval" if view is None else aug,
        "seed": None if view is None else cfg.seed,
    }


def _cache_entry(
    teacher: Teacher, source: ImageSource, view: int | None, cfg: FrozenConfig, cache: Path
) -> tuple[dict[str, Any], Path]:
    key = json.loads(json.dumps(_view_key(teacher, source, view, cfg)))  # as it reads back (tuples -> lists)
    return key, cache / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}.safetensors"


def cached_features(
    teacher: Teacher,
    source: ImageSource,
    view: int | None,
    cfg: FrozenConfig,
    cache: Path,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [n, D], image indices [n]) of ``source``'s readable images in ``view``, from ``cache`` when
    an earlier run computed them with the same teacher, data and view, else computed and stored there."""
    from ..weights.io import read_checkpoint, write_safetensors

    key, path = _cache_entry(teacher, source, view, cfg, cache)
    if path.is_file():
        tensors, meta = read_checkpoint(path)
        if meta == key:
            return tensors["features"], tensors["index"]
    loader = DataLoader(
        _Views(source, teacher, view, cfg), batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=list
    )
    feats, index = [], []
    what = "eval view" if view is None else f"view {view}"
    for batch in tqdm(loader, desc=f"features {source.name} {what}", unit="batch", disable=progress is False):
        good = [(i, x) for i, x in batch if not isinstance(x, BadImage)]
        if good:
            feats.append(pooled_features(teacher, torch.stack([x for _, x in good])))
            index += [i for i, _ in good]
    if not feats:
        raise MNv4Error(f"{source.location}: no readable images to compute teacher features on")
    out = torch.cat(feats), torch.tensor(index, dtype=torch.int64)
    cache.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, {"features": out[0], "index": out[1]}, key)
    return out


def fit_linear_head(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float = 1e-3, max_iter: int = 300
) -> nn.Linear:
    """Multinomial logistic regression on features ``x`` [n, D] and labels ``y`` [n], by full-batch L-BFGS.

    The features are standardised for the fit (L-BFGS converges in tens of steps instead of thousands),
    with an L2 penalty ``weight_decay / 2 * |W|^2``; the returned layer takes the raw features (the
    standardisation is folded into its weight and bias), so it drops in as the teacher's classifier.
    """
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    head = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        scaled = w.detach() / std
        head.weight.copy_(scaled.float())
        head.bias.copy_((b.detach() - scaled @ mean).float())
    return head


def _quiet(msg: str) -> None:
    pass


def _val_source(cfg: FrozenConfig) -> ImageSource | None:
    val = Path(cfg.data) / "val"
    return open_source(val) if val.is_dir() else None


def _scores(head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        p = F.softmax(head(x), dim=-1)
    return {
        "top1": round(100.0 * float(p.argmax(1).eq(y).float().mean()), 4),
        "mean_max_prob": round(float(p.max(1).values.mean()), 4),
    }


def frozen_teacher(cfg: FrozenConfig, progress: bool | None = None) -> FrozenResult:
    """Fit a head on ``cfg.teacher``'s cached features of ``cfg.data`` and write ``OUT/best.safetensors``."""
    cfg.validate()
    t0 = time.perf_counter()
    teacher = load_teacher(cfg.teacher, cfg.teacher_checkpoint, cfg.input_size, device="cpu")
    family = teacher.identity["family"]
    if family == "mnv4":
        raise MNv4Error(f"{cfg.teacher} is a MobileNetV4: fine-tune it with `mnv4 train --recipe finetune` instead")
    train = open_source(cfg.data, cfg.data_root)
    if not train.labelled:
        raise MNv4Error(f"`data` {cfg.data} has no class folders: a frozen-head teacher needs labelled images")
    out = Path(cfg.out)
    cache = Path(cfg.cache) if cfg.cache else out / "features"
    labels = torch.tensor(train.labels, dtype=torch.int64)
    say = print if progress is not False else _quiet
    val = _val_source(cfg)
    wanted = [(train, v) for v in [None, *range(cfg.views)]] + ([(val, None)] if val is not None else [])
    cached = all(_cache_entry(teacher, s, v, cfg, cache)[1].is_file() for s, v in wanted)
    engine = "eager" if cached else cfg.engine  # every feature is cached: no export needed
    features = feature_extractor(teacher, engine, parity_sample(train, teacher), say)
    xs, ys = [], []
    for view in [None, *range(cfg.views)]:
        x, idx = cached_features(features, train, view, cfg, cache, progress)
        xs.append(x)
        ys.append(labels[idx])
    t_features = time.perf_counter() - t0
    x, y = torch.cat(xs), torch.cat(ys)
    head = fit_linear_head(x, y, len(train.class_names), cfg.weight_decay, cfg.max_iter)
    t_fit = time.perf_counter() - t0 - t_features
    summary: dict[str, Any] = {
        "teacher": cfg.teacher,
        "input_size": teacher.input_size,
        "train_images": len(xs[0]),
        "views": cfg.views,
        "feature_dim": int(x.shape[1]),
        "train": _scores(head, xs[0], ys[0]),
    }
    if val is not None:
        vx, vidx = cached_features(features, val, None, cfg, cache, progress)
        vlabels = torch.tensor([train.class_names.index(val.class_names[c]) for c in val.labels])
        summary["val"] = _scores(head, vx, vlabels[vidx])
    _install_head(teacher.model, family, head)
    path = save_teacher(
        teacher.model,
        out / "best.safetensors",
        family,
        teacher.identity["arch"],
        teacher.preprocess,
        list(train.class_names),
        {"frozen_head": {"views": cfg.views, "aug": cfg.aug, "weight_decay": cfg.weight_decay}},
    )
    wall = time.perf_counter() - t0
    summary.update(features_seconds=round(t_features, 2), fit_seconds=round(t_fit, 2), wall_seconds=round(wall, 2))
    atomic_write_json(out / "summary.json", summary)
    return FrozenResult(path, summary)


def _install_head(model: nn.Module, family: str, head: nn.Linear) -> None:
    """Put ``head`` in place of the model's classifier (same place, new class count)."""
    _replace_classifier(model, family, head.out_features)
    new = _classifier(model)
    with torch.no_grad():
        new.weight.copy_(head.weight)
        new.bias.copy_(head.bias)
