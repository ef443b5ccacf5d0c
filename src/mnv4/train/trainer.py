"""The training loop: one function, :func:`train`, for one process or many (torchrun).

Reproducibility is designed in rather than hoped for: data order and augmentation depend only on
(seed, epoch, sample) (see ``mnv4.data.sampling``), and the RNG that dropout, stochastic depth and
Mixup/CutMix draw from is reseeded from (seed, step, rank) at every optimizer step. A run resumed
from any checkpoint therefore replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..data.datasets import BadImageLog, DataBundle, collate_images, load_data
from ..data.sampling import GlobalBatchSampler, SeededDataset, sample_seed
from ..data.transforms import batch_mix, eval_transform, train_transform
from ..errors import MNv4Error
from ..models.registry import Preprocess
from ..models.specs import ModelSpec
from ..weights.checkpoint import save_model
from ..weights.io import atomic_write
from .checkpoint import LAST, load_training_state, rng_state, save_training_state, set_rng_state
from .config import TrainConfig
from .distributed import DistInfo, setup
from .evaluate import EvalResult, evaluate
from .metrics import MetricsLog
from .optim import build_ema, build_optimizer, build_scheduler, l2_penalty

__all__ = ["train", "TrainResult", "BEST", "LAST_WEIGHTS", "SUMMARY"]

BEST = "best.safetensors"
LAST_WEIGHTS = "last.safetensors"
SUMMARY = "summary.json"


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict[str, Any]
    model: nn.Module  # the raw (not EMA) weights at the end, unwrapped from DDP/compile
    ema_model: nn.Module | None
    stopped_early: bool  # True when max_steps ended this invocation before the schedule did


@dataclass
class _Plan:
    """Batch arithmetic, fixed for the whole run."""

    micro_batch: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    ema_start_step: int
    num_epochs: int


def _plan(cfg: TrainConfig, num_train: int, world: int) -> _Plan:
    if cfg.batch_size % world:
        raise MNv4Error(f"batch size {cfg.batch_size} is not divisible by {world} processes; change --batch-size")
    per_rank = cfg.batch_size // world
    micro = min(cfg.micro_batch or per_rank, per_rank)
    if per_rank % micro:
        raise MNv4Error(
            f"per-process batch {per_rank} is not a multiple of --micro-batch {micro}; pick a divisor of {per_rank}"
        )
    if num_train < cfg.batch_size:
        raise MNv4Error(
            f"the training set has {num_train} images, fewer than the batch size {cfg.batch_size}; "
            "lower --batch-size (the LR scales with it)"
        )
    spe = num_train // cfg.batch_size
    total = max(1, round(cfg.epochs * spe))
    return _Plan(
        micro_batch=micro,
        accumulation=per_rank // micro,
        steps_per_epoch=spe,
        total_steps=total,
        warmup_steps=round(cfg.warmup_epochs * spe),
        ema_start_step=round(cfg.ema_start_epochs * spe),
        num_epochs=math.ceil(total / spe),
    )


def _model_name(cfg: TrainConfig) -> str | ModelSpec | None:
    return ModelSpec.from_dict(cfg.model) if isinstance(cfg.model, dict) else cfg.model


def _build_model(cfg: TrainConfig, data: DataBundle) -> nn.Module:
    from ..factory import create_model

    overrides = dict(drop_rate=cfg.dropout, drop_path_rate=cfg.drop_path, drop_path_schedule=cfg.drop_path_schedule)
    if cfg.bn_momentum is not None:
        overrides["bn_momentum"] = cfg.bn_momentum
    if cfg.bn_eps is not None:
        overrides["bn_eps"] = cfg.bn_eps
    if cfg.model is None and cfg.checkpoint is None:
        raise MNv4Error(
            f"recipe {cfg.recipe} starts from pretrained weights: pass --checkpoint PATH (or --model NAME to train "
            "from scratch)"
        )
    model = create_model(_model_name(cfg), num_classes=len(data.class_names), checkpoint=cfg.checkpoint, **overrides)
    pp: Preprocess = model.preprocess or Preprocess()
    size = cfg.input_size or data.input_size or pp.input_size
    if data.input_size is not None:
        # Small-image sets (digits, CIFAR): no centre crop, or the border of a 32 px image is lost.
        pp = dataclasses.replace(pp, input_size=size, crop_pct=1.0)
        if cfg.checkpoint is None:
            pp = dataclasses.replace(pp, interpolation="bilinear")
    else:
        pp = dataclasses.replace(pp, input_size=size)
    model.preprocess = pp
    model.class_names = list(data.class_names)
    return model


def _precision(cfg: TrainConfig, device: torch.device) -> tuple[contextlib.AbstractContextManager, bool]:
    """(autocast context, whether to use a GradScaler)."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext(), False
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16), False
    if cfg.precision == "fp16":
        if device.type != "cuda":
            raise MNv4Error("fp16 training needs CUDA; use --precision bf16 on CPU")
        return torch.autocast("cuda", dtype=torch.float16), True
    raise MNv4Error(f"--precision must be fp32, bf16 or fp16, got {cfg.precision!r}")


def _default_run_dir(model_name: str, data_name: str) -> Path:
    return Path("runs") / f"{model_name}-{data_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _loaders(cfg: TrainConfig, data: DataBundle, model: nn.Module, plan: _Plan, info: DistInfo):
    pp = model.preprocess
    train_tf = train_transform(
        pp,
        scale=tuple(cfg.crop_scale),
        hflip=cfg.hflip,
        randaug_prob=cfg.randaug_prob,
        randaug_layers=cfg.randaug_layers,
        randaug_magnitude=cfg.randaug_magnitude,
    )
    train_ds = SeededDataset(data.train, train_tf, cfg.seed)
    sampler = GlobalBatchSampler(len(train_ds), cfg.batch_size, info.rank, info.world_size, shuffle=True, seed=cfg.seed)
    common = dict(num_workers=cfg.workers, collate_fn=collate_images, pin_memory=info.device.type == "cuda")
    if cfg.workers > 0:
        common["persistent_workers"] = True
    train_loader = DataLoader(train_ds, batch_size=plan.micro_batch, sampler=sampler, **common)
    val_ds: Any = SeededDataset(data.val, eval_transform(pp))
    if info.distributed:  # disjoint shards without padding, so summed counts are exact
        val_ds = Subset(val_ds, range(info.rank, len(val_ds), info.world_size))
    val_loader = DataLoader(val_ds, batch_size=max(plan.micro_batch, 64), shuffle=False, **common)
    return train_loader, sampler, val_loader


def train(
    cfg: TrainConfig,
    resume: str | Path | None = None,
    data: DataBundle | None = None,
    max_steps: int | None = None,
    progress: bool | None = None,
    log=None,
) -> TrainResult:
    """Train according to ``cfg``; under torchrun every process calls this with the same ``cfg``.

    Args:
        resume: a training checkpoint (``last.pt``) to continue from; the run directory is its folder.
        data: datasets to use instead of resolving ``cfg.data`` (tests, notebooks).
        max_steps: stop this invocation after that many optimizer steps, writing nothing extra, as
            a killed process would (used to test resuming); checkpoints written before still count.
        progress: progress bars; None shows them on terminals only.
        log: where per-epoch lines go (default: print on rank 0).
    """
    t_start = time.perf_counter()
    info = setup(cfg.device)
    say = log or (lambda msg: tqdm.write(msg, file=sys.stdout))
    if not info.is_main:
        say = lambda msg: None  # noqa: E731 - only rank 0 talks

    if data is None:
        if cfg.data is None:
            raise MNv4Error(f"recipe {cfg.recipe} has no default dataset; pass --data PATH|cifar10|digits")
        if info.is_main:
            data = load_data(cfg.data, cfg.data_root, cfg.val_split, cfg.seed)
        if info.distributed:
            dist.barrier()  # rank 0 downloads/unpacks first; the others then read the cache
        if data is None:
            data = load_data(cfg.data, cfg.data_root, cfg.val_split, cfg.seed)
    if len(data.val) == 0:
        raise MNv4Error(f"the validation set of {data.name} is empty; add images to val/ or raise --val-split")

    state = load_training_state(resume) if resume else None
    plan = _plan(cfg, len(data.train), info.world_size)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every run
    model = _build_model(cfg, data)
    if resume:
        run_dir = Path(resume).parent
    else:
        run_dir = Path(cfg.output) if cfg.output else _default_run_dir(model.spec.name, data.name)
    train_loader, sampler, val_loader = _loaders(cfg, data, model, plan, info)
    device = info.device
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and device.type != "cuda":
        raise MNv4Error("--sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernels); drop it on CPU")
    if cfg.sync_bn and info.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw = model
    ema = build_ema(raw, cfg.ema_decay)
    optimizer = build_optimizer(raw, cfg.scaled_lr(), cfg.weight_decay, tuple(cfg.betas), cfg.eps)
    scheduler = build_scheduler(optimizer, plan.warmup_steps, plan.total_steps, cfg.min_lr_ratio)
    autocast, use_scaler = _precision(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    step, best_top1, best_epoch, wall_before = 0, -1.0, 0, 0.0
    best_weights = "raw"
    if state is not None:
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        step, best_top1, best_epoch = int(state["step"]), float(state["best_top1"]), int(state["best_epoch"])
        best_weights, wall_before = str(state.get("best_weights", "raw")), float(state["wall_seconds"])
        if step >= plan.total_steps:
            raise MNv4Error(f"the run in {run_dir} already finished ({step} steps); its results are in {SUMMARY}")

    if info.distributed:
        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    mix = batch_mix(len(data.class_names), cfg.mix_prob, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.switch_prob)
    bad = BadImageLog(verbose=info.is_main)
    metrics = None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(_config_yaml(cfg, plan, info)))
        metrics = MetricsLog(run_dir, resume_epoch=step // plan.steps_per_epoch if state else None)
        eff = f"{plan.micro_batch} x {plan.accumulation} accumulation x {info.world_size} process(es)"
        say(
            f"training {raw.spec.name} on {data.name} ({len(data.train)} train / {len(data.val)} val images, "
            f"{len(data.class_names)} classes) at {raw.preprocess.input_size} px, recipe {cfg.recipe}: "
            f"{plan.total_steps} steps, batch {cfg.batch_size} = {eff}, peak LR {cfg.scaled_lr():.3g}, "
            f"device {device}" + (f", resuming at step {step}" if state else "")
        )

    def checkpoint() -> None:
        if not info.is_main:
            return
        save_training_state(
            run_dir / LAST,
            {
                "version": 1,
                "model": raw.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "rng": rng_state(),
                "step": step,
                "best_top1": best_top1,
                "best_epoch": best_epoch,
                "best_weights": best_weights,
                "wall_seconds": wall_before + time.perf_counter() - t_start,
                "config": cfg.to_dict(),
                "class_names": list(data.class_names),
            },
        )

    last_eval: dict[str, EvalResult] = {}
    steps_this_run = 0
    stopped = False
    start_epoch = step // plan.steps_per_epoch
    for epoch in range(start_epoch, plan.num_epochs):
        first = step - epoch * plan.steps_per_epoch
        last = min(plan.steps_per_epoch, plan.total_steps - epoch * plan.steps_per_epoch)
        sampler.set_epoch(epoch, first)
        model.train()
        t_epoch, seen, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0
        batches = iter(train_loader)
        bar = tqdm(
            total=last - first,
            desc=f"epoch {epoch + 1}/{plan.num_epochs}",
            unit="step",
            disable=True if not info.is_main or progress is False else (None if progress is None else False),
            leave=False,
            dynamic_ncols=True,
        )
        for _ in range(first, last):
            _seed_step(sample_seed(cfg.seed, step, info.rank, 0xD7), device)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(plan.accumulation):
                x, y, broken = next(batches)
                bad.add(broken)
                if len(y) == 0:
                    continue
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if mix is not None:
                    x, y = mix(x, y)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                sync = micro == plan.accumulation - 1 or not info.distributed
                with contextlib.nullcontext() if sync else model.no_sync():
                    with autocast:
                        logits = model(x)
                    loss = criterion(logits.float(), y)
                    reg = l2_penalty(raw, cfg.l2)
                    if reg is not None:
                        loss = loss + reg
                    scaler.scale(loss / plan.accumulation).backward()
                step_loss += loss.item() / plan.accumulation
                seen += len(y)
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            steps_this_run += 1
            if ema is not None and step >= plan.ema_start_step:
                ema.update_parameters(raw)
            loss_sum, loss_n = loss_sum + step_loss, loss_n + 1
            elapsed = time.perf_counter() - t_epoch
            bar.set_postfix(
                loss=f"{step_loss:.3f}",
                lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                img_s=f"{seen * info.world_size / max(elapsed, 1e-9):.0f}",
            )
            bar.update()
            if cfg.save_every_steps and step % cfg.save_every_steps == 0 and step % plan.steps_per_epoch:
                checkpoint()
            if max_steps is not None and steps_this_run >= max_steps and step < plan.total_steps:
                stopped = True
                break
        bar.close()
        if stopped:
            break
        epoch_time = time.perf_counter() - t_epoch
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / max(loss_n, 1),
            "images_per_sec": seen * info.world_size / max(epoch_time, 1e-9),
            "epoch_seconds": epoch_time,
        }
        final_epoch = epoch + 1 == plan.num_epochs
        if (epoch + 1) % max(cfg.eval_every, 1) == 0 or final_epoch:
            last_eval = {"raw": evaluate(raw, val_loader, device, autocast, cfg.channels_last, info)}
            if ema is not None and step >= plan.ema_start_step:
                last_eval["ema"] = evaluate(ema.module, val_loader, device, autocast, cfg.channels_last, info)
            for kind, res in last_eval.items():
                prefix = "" if kind == "raw" else "ema_"
                row.update(
                    {f"{prefix}val_top1": res.top1, f"{prefix}val_top5": res.top5, f"{prefix}val_loss": res.loss}
                )
            kind, res = max(last_eval.items(), key=lambda kv: kv[1].top1)
            if res.top1 > best_top1:
                best_top1, best_epoch, best_weights = res.top1, epoch + 1, kind
                if info.is_main:
                    weights = raw if kind == "raw" else ema.module
                    save_model(
                        weights, run_dir / BEST, extra={"epoch": epoch + 1, "val_top1": res.top1, "weights": kind}
                    )
        # Fixed columns: the CSV header comes from the first row, which may precede eval or EMA.
        for key in ("val_top1", "val_top5", "val_loss") + (
            ("ema_val_top1", "ema_val_top5", "ema_val_loss") if ema else ()
        ):
            row.setdefault(key, "")
        if info.is_main:
            metrics.log(row)
            say(_epoch_line(row, plan, epoch, time.perf_counter() - t_start))
        checkpoint()

    wall = wall_before + time.perf_counter() - t_start
    summary: dict[str, Any] = {}
    if not stopped and info.is_main:
        save_model(raw, run_dir / LAST_WEIGHTS, extra={"epoch": plan.num_epochs, "weights": "raw"})
        if ema is not None:
            save_model(ema.module, run_dir / "last_ema.safetensors", extra={"epoch": plan.num_epochs, "weights": "ema"})
        summary = _summary(cfg, data, raw, run_dir, plan, last_eval, best_top1, best_epoch, best_weights, wall, bad)
        atomic_write(run_dir / SUMMARY, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
        if metrics is not None:
            metrics.close()
    if info.distributed:
        dist.barrier()
    return TrainResult(run_dir, summary, raw, ema.module if ema is not None else None, stopped)


def _seed_step(seed: int, device: torch.device) -> None:
    """Reseed what dropout, stochastic depth and Mixup/CutMix draw from (CPU, plus the GPU in use)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def _epoch_line(row: dict[str, Any], plan: _Plan, epoch: int, elapsed: float) -> str:
    parts = [f"epoch {epoch + 1}/{plan.num_epochs}", f"train_loss {row['train_loss']:.4f}"]
    if row["val_top1"] != "":
        parts.append(f"val top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}% loss {row['val_loss']:.4f}")
    if row.get("ema_val_top1", "") != "":
        parts.append(f"EMA top-1 {row['ema_val_top1']:.2f}%")
    remaining = elapsed / (epoch + 1) * (plan.num_epochs - epoch - 1) if epoch >= 0 else 0.0
    parts += [f"lr {row['lr']:.2e}", f"{row['images_per_sec']:.0f} img/s", f"{row['epoch_seconds']:.1f}s"]
    parts.append(f"eta {remaining / 60:.1f} min")
    return "  ".join(parts)


def _summary(cfg, data, raw, run_dir, plan, last_eval, best_top1, best_epoch, best_weights, wall, bad) -> dict:
    final = last_eval.get("raw")
    summary = {
        "model": raw.spec.name,
        "dataset": data.name,
        "recipe": cfg.recipe,
        "epochs": plan.num_epochs,
        "steps": plan.total_steps,
        "num_classes": len(data.class_names),
        "input_size": raw.preprocess.input_size,
        "val_top1": round(best_top1, 4),  # best epoch, raw or EMA weights (see best_weights)
        "val_top1_final": round(final.top1, 4) if final else None,
        "val_top5_final": round(final.top5, 4) if final else None,
        "val_loss_final": round(final.loss, 6) if final else None,
        "best_epoch": best_epoch,
        "best_weights": best_weights,
        "best_checkpoint": str(run_dir / BEST),
        "last_checkpoint": str(run_dir / LAST_WEIGHTS),
        "wall_seconds": round(wall, 2),
        "skipped_images": len(bad),
    }
    if "ema" in last_eval:
        summary["ema_val_top1_final"] = round(last_eval["ema"].top1, 4)
    return summary


def _config_yaml(cfg: TrainConfig, plan: _Plan, info: DistInfo) -> str:
    import yaml

    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.to_dict().items()}
    derived = {
        "world_size": info.world_size,
        "micro_batch": plan.micro_batch,
        "accumulation": plan.accumulation,
        "steps_per_epoch": plan.steps_per_epoch,
        "total_steps": plan.total_steps,
        "warmup_steps": plan.warmup_steps,
        "peak_lr": cfg.scaled_lr(),
    }
    return (
        yaml.safe_dump(d, sort_keys=False)
        + "# derived for this run (not inputs):\n"
        + yaml.safe_dump({"derived": derived}, sort_keys=False)
    )
