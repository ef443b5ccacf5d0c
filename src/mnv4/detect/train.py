"""Detection training on the shared trainer phases: :class:`DetectionTrainer` (docs/detection.md "Training").

The :class:`~mnv4.train.trainer.Trainer` runs the loop (run folders and locks, seeded sampling, gradient
accumulation, torchrun DDP, bit-exact resume, EMA, metrics.csv, progress); this subclass supplies what
differs for detection through the trainer's hooks:

* data: a :class:`~mnv4.detect.data.DetectionData` (a COCO / VOC / YOLO folder or the built-in digits);
  each sample's boxes are packed into one padded tensor (:class:`PackedTargets`), so micro-batches
  concatenate and move to the device like classification labels;
* the model: :func:`mnv4.detect.create_detector`, whose train-mode forward returns its losses
  (``forward_loss``: classification + box regression);
* evaluation: COCO AP / AP50 on the validation split in original-image pixels (raw and EMA weights);
  the best AP is kept as ``best.safetensors``, a detector file (``save_detector``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.datasets import DataBundle
from ..models.registry import Preprocess
from ..train.runs import default_run_dir
from ..train.trainer import LAST, Trainer, TrainResult
from .anchors import AnchorCoverage, anchor_coverage, coverage_advice, fit_anchor_options
from .data import DetectionData, DetectionDataset, collate_detection, load_detection_data
from .evaluate import evaluate_detector
from .metrics import DetectionMetrics, plot_pr_curve
from .model import Detector
from .recipes import DetectConfig
from .transforms import DetectionAugment

__all__ = ["DetectionTrainer", "PackedTargets", "train_detector", "unpack_targets"]

PR_CURVE = "pr_curve.png"


class PackedTargets:
    """Collate for training: images stacked, each sample's boxes as rows ``[label, x1, y1, x2, y2]`` of one
    ``[B, max_boxes, 5]`` tensor padded with label -1 (``max_boxes``: the most any image of the set holds)."""

    def __init__(self, max_boxes: int) -> None:
        self.max_boxes = max(1, max_boxes)

    def __call__(self, batch: list[tuple[Any, dict[str, Any]]]):
        images, targets, bad = collate_detection(batch)
        packed = torch.full((len(targets), self.max_boxes, 5), -1.0)
        for i, t in enumerate(targets):
            n = min(len(t["boxes"]), self.max_boxes)
            packed[i, :n, 0] = t["labels"][:n].float()
            packed[i, :n, 1:] = t["boxes"][:n]
        return images, packed, bad


def unpack_targets(packed: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """:class:`PackedTargets`' rows back to the detector's target dicts."""
    out = []
    for rows in packed:
        rows = rows[rows[:, 0] >= 0]
        out.append({"boxes": rows[:, 1:].contiguous(), "labels": rows[:, 0].long()})
    return out


class DetectionTrainer(Trainer):
    """Trains a detector (module docstring). ``data``: a DetectionData to use instead of ``cfg.data``."""

    command = "mnv4 detect train"

    def __init__(
        self,
        cfg: DetectConfig,
        data: DetectionData | None = None,
        model: nn.Module | None = None,
        progress: bool | None = None,
        log=None,
        exist_ok: bool = False,
    ) -> None:
        super().__init__(cfg, None, model, progress, log, exist_ok)
        self.det_data = data
        self.best_metrics: DetectionMetrics | None = None
        self.anchor_coverage: AnchorCoverage | None = None

    # ------------------------------------------------------------------ data
    def setup(self, resume: str | Path | None = None) -> None:
        from ..train.distributed import setup as dist_setup

        cfg = self.cfg
        try:  # the evaluator of every epoch end: missing, it would end the run after a whole epoch
            import faster_coco_eval  # noqa: F401
        except ImportError:
            from ..errors import missing_extra

            raise missing_extra("faster-coco-eval", "detect") from None
        info = dist_setup(cfg.device)
        if self.det_data is None:
            with _rank_zero_first(info):  # rank 0 makes the digits cache; the others then read it
                self.det_data = load_detection_data(cfg.data, val_fraction=cfg.val_split, seed=cfg.seed, warn=True)
        d = self.det_data
        self.size = cfg.input_size or d.input_size or 320
        eval_aug = DetectionAugment(self.size, mode=cfg.resize)
        self.data = DataBundle(
            d.name,
            DetectionDataset(d.split("train"), eval_aug),
            DetectionDataset(d.split("val"), eval_aug),
            list(d.classes),
            self.size,
        )
        self.collate = PackedTargets(max((len(r.boxes) for r in d.split("train")), default=1))
        if cfg.output is None and resume is None:  # runs/detect-<head>-<backbone>-<data>, as `mnv4 train` names runs
            model = cfg.model if isinstance(cfg.model, str) else (cfg.model or {}).get("name", "spec")
            label = f"detect-{cfg.head}-{model or 'checkpoint'}-{d.name}"
            self.cfg = dataclasses.replace(cfg, output=str(default_run_dir(label)))
        super().setup(resume)

    def build_train_dataset(self) -> Dataset:
        cfg = self.cfg
        aug = DetectionAugment(
            self.size,
            train=True,
            mode=cfg.resize,
            hflip=cfg.hflip,
            scale_jitter=tuple(cfg.scale_jitter),
            randaug_prob=cfg.randaug_prob,
            randaug_layers=cfg.randaug_layers,
            randaug_magnitude=cfg.randaug_magnitude,
        )
        return DetectionDataset(self.det_data.split("train"), aug, cfg.seed)

    def build_val_dataset(self) -> Dataset:
        return self.data.val

    # ------------------------------------------------------------------ model and loss
    def build_model(self) -> nn.Module:
        from .factory import create_detector

        cfg = self.cfg
        if self._given_model is not None:
            model = self._given_model
        else:
            from ..models.specs import ModelSpec

            name = ModelSpec.from_dict(cfg.model) if isinstance(cfg.model, dict) else cfg.model
            pretrained = True if cfg.pretrained == "default" else (cfg.pretrained or None)
            # "auto" anchor options are fitted to the training boxes here; the same data give the same
            # values on resume, and the detector's saved config holds the numbers.
            options, fitted = dict(cfg.head_options or {}), ""
            if cfg.checkpoint is None:  # a saved detector brings its own anchors
                options, fitted = fit_anchor_options(
                    cfg.head, options, self.det_data.split("train"), self.size, cfg.resize
                )
            if fitted:
                self.say(fitted)
            model = create_detector(
                name or "mnv4_conv_small",
                head=cfg.head,
                classes=list(self.det_data.classes),
                image_size=self.size,
                backbone_checkpoint=cfg.backbone_checkpoint,
                pretrained=pretrained,
                checkpoint=cfg.checkpoint,
                drop_path_rate=cfg.drop_path,
                resize=cfg.resize,
                **options,
            )
            if cfg.checkpoint is not None:  # fine-tuned in this run's mode: saved with it (Detector.resize)
                model.resize = model.config["resize"] = cfg.resize
                old = getattr(model, "replaced_classes", None)
                if old is not None:
                    self.say(
                        f"{cfg.checkpoint} detects {', '.join(old)}; for {', '.join(model.classes)} its class-score "
                        "layers start fresh, every other weight is kept"
                    )
        pre = getattr(model, "config", {}).get("preprocess", {})
        mean, std = tuple(pre.get("mean", Preprocess.mean)), tuple(pre.get("std", Preprocess.std))
        # The trainer reads input_size from here; the detector normalises with mean/std itself.
        model.preprocess = Preprocess(input_size=self.size, crop_pct=1.0, mean=mean, std=std)
        model.class_names = list(self.det_data.classes)
        if isinstance(model, Detector):  # not a foreign model handed to the trainer (benchmarks/detection.py)
            d = self.det_data
            cov = anchor_coverage(model.anchors(), d.split("train"), d.classes, self.size, cfg.resize)
            self.anchor_coverage = cov
            self.say(coverage_advice(cov, model.head_kind, model.config["head_options"]))
        return model

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The detector's summed losses, as a per-sample vector whose mean is that batch loss."""
        with self.autocast:
            losses = self.net(list(x), unpack_targets(y))
        total = sum(v.float() for v in losses.values())
        return total.expand(len(x))

    def _idle_backward(self) -> None:
        """A DDP rank without a readable image: a zero-weighted forward on one blank negative image, with
        BatchNorm statistics restored afterwards (this step must not change them)."""
        saved = {k: v.clone() for k, v in self.raw.state_dict().items() if "running" in k or "num_batches" in k}
        x = torch.full((2, 3, self.size, self.size), 0.5, device=self.info.device)
        empty = torch.full((2, 1, 5), -1.0, device=self.info.device)
        loss = self.forward_loss(x, empty).sum() * 0.0
        self.scaler.scale(loss).backward()
        self.raw.load_state_dict(saved, strict=False)

    def save_weights(self, model: nn.Module, path: Path, extra: dict[str, Any]) -> None:
        from .io import save_detector

        save_detector(model, path)

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, model: nn.Module) -> DetectionMetrics:
        cfg = self.cfg
        batch = max(self.plan.micro_batch, 16)
        m, _ = evaluate_detector(
            model,
            self.det_data.split("val"),
            self.det_data.classes,
            self.size,
            mode=cfg.resize,
            device=self.info.device,
            batch_size=batch,
            workers=cfg.workers,
            bad=self.bad,
        )
        return m

    def evaluate_and_select(self, epoch: int, row: dict[str, Any]) -> None:
        cfg, plan = self.cfg, self.plan
        final_epoch = epoch + 1 == plan.num_epochs
        if (epoch + 1) % max(cfg.eval_every, 1) == 0 or final_epoch:
            self._sync_buffers()
            results = {"raw": self._evaluate(self.raw)}
            if self.ema is not None and self.step >= plan.ema_start_step:
                results["ema"] = self._evaluate(self.ema.module)
            for kind, m in results.items():
                prefix = "" if kind == "raw" else "ema_"
                row.update({f"{prefix}val_AP": m.AP, f"{prefix}val_AP50": m.AP50})
            self.last_det = results
            kind, m = max(results.items(), key=lambda kv: kv[1].AP)
            if m.AP > self.best_top1:
                self.best_top1, self.best_epoch, self.best_weights = m.AP, epoch + 1, kind
                self.best_metrics = m
                if self.info.is_main:
                    self.save_weights(
                        self.raw if kind == "raw" else self.ema.module, self.run_dir / "best.safetensors", {}
                    )
                    plot_pr_curve(m, self.det_data.classes, self.run_dir / PR_CURVE)
        for key in ("val_AP", "val_AP50") + (("ema_val_AP", "ema_val_AP50") if self.ema else ()):
            row.setdefault(key, "")

    def epoch_line(self, row: dict[str, Any], epoch: int, elapsed: float) -> str:
        parts = [f"epoch {epoch + 1}/{self.plan.num_epochs}", f"loss {row['train_loss']:.4f}"]
        if row.get("val_AP", "") != "":
            parts.append(f"val AP {row['val_AP']:.3f} AP50 {row['val_AP50']:.3f}")
        if row.get("ema_val_AP", "") != "":
            parts.append(f"EMA AP {row['ema_val_AP']:.3f} AP50 {row['ema_val_AP50']:.3f}")
        remaining = elapsed / (epoch + 1) * (self.plan.num_epochs - epoch - 1)
        parts += [f"lr {row['lr']:.2e}", f"{row['images_per_sec']:.1f} img/s", f"eta {remaining / 60:.1f} min"]
        return "  ".join(parts)

    def summary(self, wall: float) -> dict[str, Any]:
        final = getattr(self, "last_det", {}).get("raw")
        best = self.best_metrics
        out = {
            "task": "detection",
            "model": getattr(self.raw, "config", {}).get("backbone", type(self.raw).__name__),
            "head": self.cfg.head,
            "dataset": self.det_data.name,
            "recipe": self.cfg.recipe,
            "classes": list(self.det_data.classes),
            "epochs": self.plan.num_epochs,
            "steps": self.plan.total_steps,
            "input_size": self.size,
            "val_AP": round(self.best_top1, 4),  # best epoch, raw or EMA weights (best_weights)
            "val_AP50": round(best.AP50, 4) if best else None,
            "val_AP_final": round(final.AP, 4) if final else None,
            "val_AP50_final": round(final.AP50, 4) if final else None,
            "best_metrics": best.as_dict() if best else None,
            "best_epoch": self.best_epoch,
            "best_weights": self.best_weights,
            "best_checkpoint": str(self.run_dir / "best.safetensors"),
            "last_checkpoint": str(self.run_dir / "last.safetensors"),
            "wall_seconds": round(wall, 2),
            "skipped_images": len(self.bad),
            "skipped_steps": self.skipped_steps,
            "data_issues": self.det_data.issues.as_dict(),
        }
        if self.anchor_coverage is not None:
            cov = self.anchor_coverage
            out["anchor_coverage"] = {"boxes": cov.boxes, "covered": round(cov.covered, 4), "per_class": cov.per_class}
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"best_metrics": self.best_metrics.as_dict() if self.best_metrics else None}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("best_metrics")
        if saved:
            fields = {k: v for k, v in saved.items() if k in DetectionMetrics.__dataclass_fields__}
            self.best_metrics = DetectionMetrics(**fields)


@contextlib.contextmanager
def _rank_zero_first(info):
    import torch.distributed as dist

    if info.distributed and not info.is_main:
        dist.barrier()
    yield
    if info.distributed and info.is_main:
        dist.barrier()


def train_detector(
    cfg: DetectConfig,
    resume: str | Path | None = None,
    data: DetectionData | None = None,
    max_steps: int | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    exist_ok: bool = False,
) -> TrainResult:
    """Train a detector according to ``cfg`` (under torchrun every process calls this); see ``mnv4.train.train``."""
    if resume is not None and Path(resume).is_dir():
        resume = Path(resume) / LAST
    trainer = DetectionTrainer(cfg, data=data, progress=progress, log=log, exist_ok=exist_ok)
    return trainer.run(resume, max_steps)
