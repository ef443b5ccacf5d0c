"""The training loop: :class:`Trainer`, one run in named phases, for one process or many (torchrun).

Phases, in the order :meth:`Trainer.run` calls them: :meth:`~Trainer.setup` (processes, data, model,
optimizer, run directory), :meth:`~Trainer.resume` (from ``last.pt``), then per epoch
:meth:`~Trainer.train_epoch` (steps of :meth:`~Trainer.train_step`) and
:meth:`~Trainer.evaluate_and_select`, and :meth:`~Trainer.finish`. Distillation and the NAS
super-network subclass it and override the hooks (``build_train_dataset``, ``make_targets``,
``loss``, ``before_step``, ``after_step``, ``extra_state``) rather than copying the loop.

Reproducibility is designed in rather than hoped for: data order and augmentation depend only on
(seed, epoch, sample) (see ``mnv4.data.sampling``), and the RNG that dropout, stochastic depth and
Mixup/CutMix draw from is reseeded from (seed, step, rank) at every optimizer step. A run resumed
from any checkpoint therefore ends bit-identical to the uninterrupted run.

Robustness (docs/training.md "What the trainer guarantees"): one process owns a run directory (a
lock); a stop request (``max_steps``, Ctrl-C, SIGTERM) saves ``last.pt`` at the next step boundary;
non-finite losses skip the update and stop the run after ``max_nonfinite_steps`` in a row; unreadable
images never desynchronise DDP ranks or leave BatchNorm a batch of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..data.datasets import DataBundle, collate_images, load_data
from ..data.images import BadImageLog, require_readable
from ..data.sampling import GlobalBatchSampler, SeededDataset, sample_seed
from ..data.transforms import batch_mix, eval_transform, train_transform
from ..errors import MNv4Error
from ..files import DirLock, atomic_write_json, atomic_write_text, remove_orphan_temps
from ..models.batchnorm import debias_running_stats
from ..models.registry import Preprocess
from ..models.specs import ModelSpec
from ..weights.checkpoint import save_model
from .checkpoint import LAST, load_training_state, rng_state, save_training_state, set_rng_state
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_sum, setup
from .evaluate import EvalResult, evaluate
from .metrics import METRICS_FILE, MetricsLog
from .optim import build_ema, build_optimizer, build_scheduler, l2_penalty, load_optimizer_state
from .runs import checkpoint_file, default_run_dir, stop_line
from .trackers import TRACKERS_FILE

__all__ = ["Trainer", "train", "TrainResult", "Plan", "plan_run", "BEST", "LAST_WEIGHTS", "SUMMARY", "RUN_FILES"]

BEST = "best.safetensors"
LAST_WEIGHTS = "last.safetensors"
LAST_EMA = "last_ema.safetensors"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
# What a run writes; a folder holding any of these holds a run.
RUN_FILES = (CONFIG, METRICS_FILE, SUMMARY, LAST, BEST, LAST_WEIGHTS, LAST_EMA, "curves.png", "tensorboard")
RUN_FILES += ("wandb", TRACKERS_FILE)  # experiment trackers (mnv4.train.trackers)
_TRAINED_FILES = (METRICS_FILE, SUMMARY, LAST, BEST, LAST_WEIGHTS, LAST_EMA)  # a run that took steps


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict[str, Any]
    model: nn.Module  # the raw (not EMA) weights at the end, unwrapped from DDP/compile
    ema_model: nn.Module | None
    stopped_early: bool  # True when this invocation stopped before the schedule ended (see stop_reason)
    stop_reason: str | None = None  # "max_steps", "SIGINT" or "SIGTERM"
    step: int = 0

    @property
    def resume_command(self) -> str:
        return f"mnv4 train --resume {self.run_dir}"


@dataclass
class Plan:
    """Batch arithmetic, fixed for the whole run (re-planned only when a finished run is extended)."""

    micro_batch: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    ema_start_step: int
    num_epochs: int


def plan_run(cfg: TrainConfig, num_train: int, world: int) -> Plan:
    if cfg.batch_size % world:
        raise MNv4Error(f"`batch_size` {cfg.batch_size} is not divisible by {world} processes; change it")
    per_rank = cfg.batch_size // world
    micro = min(cfg.micro_batch or per_rank, per_rank)
    if per_rank % micro:
        raise MNv4Error(
            f"per-process batch {per_rank} is not a multiple of `micro_batch` {micro}; pick a divisor of {per_rank}"
        )
    if num_train < cfg.batch_size:
        raise MNv4Error(
            f"the training set has {num_train} images, fewer than `batch_size` {cfg.batch_size}; "
            "lower it (the LR scales with it)"
        )
    spe = num_train // cfg.batch_size
    total = max(1, round(cfg.epochs * spe))
    return Plan(
        micro_batch=micro,
        accumulation=per_rank // micro,
        steps_per_epoch=spe,
        total_steps=total,
        warmup_steps=round(cfg.warmup_epochs * spe),
        ema_start_step=round(cfg.ema_start_epochs * spe),
        num_epochs=math.ceil(total / spe),
    )


class _StopRequests:
    """SIGINT / SIGTERM set a flag the loop checks at step boundaries; a second Ctrl-C aborts at once.

    Installed before the data-loader workers fork, so they inherit it and keep running instead of
    dying on the Ctrl-C that reaches the whole process group.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.reason == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user does not want to wait for the step
        self.reason = signal.Signals(signum).name
        print(
            f"\nmnv4: {self.reason} received; saving a checkpoint at the end of this step (Ctrl-C again to abort)",
            file=sys.stderr,
        )

    def __enter__(self) -> _StopRequests:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


class Trainer:
    """One training run. ``cfg`` says what to train; ``data`` and ``model`` may be given directly
    (tests, notebooks, a non-MobileNetV4 classifier such as a distillation teacher).

    ``exist_ok``: start a new run in a folder that already holds one, replacing its files (otherwise
    that is refused, so a run is never overwritten by accident).
    """

    distills = False  # trains on teacher targets: mnv4.distill.student.DistillTrainer sets it
    # Batches (x, y, unreadable files) from dataset items; y must be a tensor (detection packs its boxes into one).
    collate = staticmethod(collate_images)
    command = "mnv4 train"  # the command that resumes this kind of run (named in the stop message)

    def __init__(
        self,
        cfg: TrainConfig,
        data: DataBundle | None = None,
        model: nn.Module | None = None,
        progress: bool | None = None,
        log=None,
        exist_ok: bool = False,
    ) -> None:
        if (cfg.distill or cfg.teacher) and not self.distills:
            raise MNv4Error(
                "this config distils (`distill` / `teacher`): train it with mnv4.distill.train_student, "
                "which `mnv4 train` uses for such configs"
            )
        self.cfg = cfg
        self.data = data
        self._given_model = model
        self.progress = progress
        self.exist_ok = exist_ok
        self._log = log
        self.step = 0
        self.best_top1, self.best_epoch, self.best_weights = -1.0, 0, "raw"
        self.wall_before = 0.0
        self.last_eval: dict[str, EvalResult] = {}
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0  # steps without a readable image on any rank, or with a non-finite loss
        self.lone_images = 0  # readable images left out as their process's only image of a step
        self.epoch_loss = [0.0, 0]  # sum and count of this epoch's finite step losses (kept in last.pt)
        self.stop_reason: str | None = None
        self.lock: DirLock | None = None
        self._made_run_dir: Path | None = None  # the run folder this run created (see _unmake_run_dir)
        self.metrics: MetricsLog | None = None
        self._stop = _StopRequests()

    # ------------------------------------------------------------------ hooks (override in subclasses)
    def build_model(self) -> nn.Module:
        """The model to train: the given one, else ``create_model`` from the config."""
        from ..factory import create_model

        cfg, data = self.cfg, self.data
        if self._given_model is not None:
            model = self._given_model
        else:
            overrides = dict(
                drop_rate=cfg.dropout, drop_path_rate=cfg.drop_path, drop_path_schedule=cfg.drop_path_schedule
            )
            if cfg.bn_momentum is not None:
                overrides["bn_momentum"] = cfg.bn_momentum
            if cfg.bn_eps is not None:
                overrides["bn_eps"] = cfg.bn_eps
            if cfg.model is None and cfg.checkpoint is None and not cfg.pretrained:
                raise MNv4Error(
                    f"recipe {cfg.recipe} starts from pretrained weights: pass `checkpoint` or `pretrained` "
                    "(or `model` to train from scratch)"
                )
            name = ModelSpec.from_dict(cfg.model) if isinstance(cfg.model, dict) else cfg.model
            pretrained = True if cfg.pretrained == "default" else (cfg.pretrained or False)
            model = create_model(
                name, num_classes=len(data.class_names), checkpoint=cfg.checkpoint, pretrained=pretrained, **overrides
            )
        pp: Preprocess = getattr(model, "preprocess", None) or Preprocess()
        size = cfg.input_size or data.input_size or pp.input_size
        if size != pp.input_size:  # the larger test setting belongs to the published weights at their size
            pp = dataclasses.replace(pp, test_input_size=None, test_crop_pct=None)
        if data.input_size is not None:
            # Small-image sets (digits, CIFAR): no centre crop, or the border of a 32 px image is lost.
            pp = dataclasses.replace(pp, input_size=size, crop_pct=1.0)
            if cfg.checkpoint is None and not cfg.pretrained:
                pp = dataclasses.replace(pp, interpolation="bilinear")
        else:
            pp = dataclasses.replace(pp, input_size=size)
        model.preprocess = pp
        model.class_names = list(data.class_names)
        if cfg.fake_quant:  # QAT: the state dict stays the plain model's (mnv4.models.fake_quant)
            from ..models.fake_quant import attach_fake_quant

            attach_fake_quant(model)
        return model

    def build_train_dataset(self) -> Dataset:
        """Items ``(image tensor or BadImage, target)``, indexed by ``(epoch, i)`` from the sampler."""
        cfg = self.cfg
        tf = train_transform(
            self.model.preprocess,
            scale=tuple(cfg.crop_scale),
            hflip=cfg.hflip,
            randaug_prob=cfg.randaug_prob,
            randaug_layers=cfg.randaug_layers,
            randaug_magnitude=cfg.randaug_magnitude,
        )
        return SeededDataset(self.data.train, tf, cfg.seed)

    def build_train_sampler(self, dataset: Dataset) -> GlobalBatchSampler:
        info = self.info
        return GlobalBatchSampler(
            len(dataset), self.cfg.batch_size, info.rank, info.world_size, shuffle=True, seed=self.cfg.seed
        )

    def build_val_dataset(self) -> Dataset:
        """Validation items ``(image tensor or BadImage, target)``."""
        return SeededDataset(self.data.val, eval_transform(self.model.preprocess))

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample training loss ``[B]`` of one micro-batch (a detector computes its losses in forward)."""
        with self.autocast:
            logits = self.net(x)
        return self.loss(logits.float(), y)

    def epoch_line(self, row: dict[str, Any], epoch: int, elapsed: float) -> str:
        """The line printed after each epoch."""
        return _epoch_line(row, self.plan, epoch, elapsed)

    def make_targets(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per micro-batch: Mixup/CutMix as the recipe says (int labels may become soft ones)."""
        return self.mix(x, y) if self.mix is not None else (x, y)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss ``[B]``; ``target`` is int labels ``[B]`` or probabilities ``[B, C]``."""
        return F.cross_entropy(logits, target, reduction="none", label_smoothing=self.cfg.label_smoothing)

    def before_step(self, step: int) -> None:
        """Called before each optimizer step's forward passes (after the step's RNG reseed)."""

    def after_step(self, step: int, loss: float) -> None:
        """Called after each optimizer step with the global mean loss."""

    def extra_state(self) -> dict[str, Any]:
        """More state to save in ``last.pt`` (tensors, numbers, strings and containers only)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def save_weights(self, model: nn.Module, path: Path, extra: dict[str, Any]) -> None:
        """Write ``best`` / ``last`` weights; a subclass training a non-MobileNetV4 model saves its own way."""
        save_model(model, path, extra=extra)

    def wrap_distributed(self, model: nn.Module) -> nn.Module:
        # broadcast_buffers=False: ranks may run different numbers of forwards in a step (unreadable
        # images), which a per-forward buffer broadcast would deadlock; buffers are broadcast
        # explicitly before evaluation and saving instead (see _sync_buffers).
        device = self.info.device
        return DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False
        )

    @property
    def resume_command(self) -> str:
        return f"{self.command} --resume {self.run_dir}"

    # ------------------------------------------------------------------ phases
    def say(self, msg: str) -> None:
        if not self.info.is_main:
            return
        if self._log is not None:
            self._log(msg)
        else:
            tqdm.write(msg, file=sys.stdout)

    def setup(self, resume: str | Path | None = None) -> None:
        """Processes, data, model, optimizer and the run directory; restores ``resume`` if given."""
        cfg = self.cfg
        self.t_start = time.perf_counter()
        self.info = setup(cfg.device)
        self.data = self._load_data()
        state = load_training_state(resume) if resume else None
        if state is not None and "step" not in state:
            raise MNv4Error(f"{resume} is not a training checkpoint (it has no step); pass a run's last.pt")
        self.plan = plan_run(cfg, len(self.data.train), self.info.world_size)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every run
        self.model = self.build_model()
        self.run_dir = self._claim_run_dir(resume)
        self._build_loaders()
        self._build_optimization()
        if state is not None:
            self.resume(state)
        self.net = self.wrap_distributed(self.raw) if self.info.distributed else self.raw
        if cfg.compile:
            self.net = torch.compile(self.net)
        if self.info.is_main:
            atomic_write_text(self.run_dir / CONFIG, _config_yaml(cfg, self.plan, self.info))
            resume_epoch = self.step // self.plan.steps_per_epoch if state is not None else None
            self.metrics = MetricsLog(self.run_dir, resume_epoch, loggers=cfg.loggers, config=cfg.to_dict())
            self.say(self._start_line(resumed=state is not None))

    def _load_data(self) -> DataBundle:
        """The given datasets, else ``cfg.data`` (rank 0 downloads or unpacks first, the others read its cache)."""
        cfg, info, data = self.cfg, self.info, self.data
        if data is None:
            if cfg.data is None:
                raise MNv4Error(
                    f"recipe {cfg.recipe} has no default dataset; pass `data` (a folder, cifar10 or digits)"
                )
            if info.is_main:
                data = load_data(cfg.data, cfg.data_root, cfg.val_split, cfg.seed)
            if info.distributed:
                dist.barrier()
            if data is None:
                data = load_data(cfg.data, cfg.data_root, cfg.val_split, cfg.seed)
        if len(data.val) == 0:
            raise MNv4Error(f"the validation set of {data.name} is empty; add images to val/ or raise `val_split`")
        require_readable(lambda i: data.train[i][0], len(data.train), "training")
        return data

    def _build_loaders(self) -> None:
        cfg, info = self.cfg, self.info
        self.train_dataset = self.build_train_dataset()
        self.sampler = self.build_train_sampler(self.train_dataset)
        common: dict[str, Any] = dict(
            num_workers=cfg.workers, collate_fn=self.collate, pin_memory=info.device.type == "cuda"
        )
        if cfg.workers > 0:
            common["persistent_workers"] = True
        self.train_loader = DataLoader(
            self.train_dataset, batch_size=self.plan.micro_batch, sampler=self.sampler, **common
        )
        val_ds: Any = self.build_val_dataset()
        if info.distributed:  # disjoint shards without padding, so summed counts are exact
            val_ds = Subset(val_ds, range(info.rank, len(val_ds), info.world_size))
        self.val_loader = DataLoader(val_ds, batch_size=max(self.plan.micro_batch, 64), shuffle=False, **common)

    def _build_optimization(self) -> None:
        """The model on its device, its EMA, optimizer, LR schedule, precision and batch mixing."""
        cfg, info, device = self.cfg, self.info, self.info.device
        self.model.to(device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # auto (None): channels_last batches on CPU; the convolutions follow their input's layout.
        self.channels_last_batches = cfg.channels_last or (cfg.channels_last is None and device.type == "cpu")
        if cfg.sync_bn and device.type != "cuda":
            raise MNv4Error("`sync_bn` needs CUDA (PyTorch's SyncBatchNorm has no CPU kernels); turn it off on CPU")
        if cfg.sync_bn and info.distributed:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.raw = self.model
        if not cfg.compile:  # a momentum changing per batch would make torch.compile recompile at every step
            debias_running_stats(self.raw)  # or short runs evaluate with BatchNorm's initial (0, 1) statistics
        self.ema = build_ema(self.raw, cfg.ema_decay)
        self.optimizer = build_optimizer(
            self.raw, cfg.scaled_lr(), cfg.weight_decay, tuple(cfg.betas), cfg.eps, cfg.layer_decay
        )
        self.scheduler = build_scheduler(
            self.optimizer, self.plan.warmup_steps, self.plan.total_steps, cfg.min_lr_ratio
        )
        self.autocast, use_scaler = _precision(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        n_classes = len(self.data.class_names)
        self.mix = batch_mix(n_classes, cfg.mix_prob, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.switch_prob)
        self.bad = BadImageLog(verbose=True)  # every rank names the files it skips

    def _size_note(self) -> str:
        folder = self.cfg.data is not None and Path(str(self.cfg.data)).is_dir()
        if self.cfg.input_size is not None or self.data.input_size is None or not folder:
            return ""
        return " (the images' own size; --input-size or the input_size field changes it)"

    def _start_line(self, resumed: bool) -> str:
        cfg, data, p, info = self.cfg, self.data, self.plan, self.info
        eff = f"{p.micro_batch} x {p.accumulation} accumulation x {info.world_size} process(es)"
        return (
            f"training {_model_label(self.raw)} on "
            f"{data.name} ({len(data.train)} train / {len(data.val)} val images, {len(data.class_names)} "
            f"classes) at {self.raw.preprocess.input_size} px{self._size_note()}, recipe {cfg.recipe}: "
            f"{p.total_steps} steps, "
            f"batch {cfg.batch_size} = {eff}, peak LR {cfg.scaled_lr():.3g}, device {info.device}"
            + (f", resuming at step {self.step}" if resumed else "")
            + f"; run directory {self.run_dir}"
        )

    def resume(self, state: dict[str, Any]) -> None:
        """Restore a ``last.pt`` state (already loaded) into the freshly built objects."""
        self.raw.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.best_top1, self.best_epoch = float(state["best_top1"]), int(state["best_epoch"])
        self.best_weights, self.wall_before = str(state.get("best_weights", "raw")), float(state["wall_seconds"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        loss_sum, loss_n = state.get("epoch_loss", (0.0, 0))
        self.epoch_loss = [float(loss_sum), int(loss_n)]
        self.load_extra_state(state.get("extra", {}))
        saved_total = int(state.get("total_steps", self.plan.total_steps))
        if self.step >= self.plan.total_steps:
            raise MNv4Error(
                f"the run in {self.run_dir} already finished ({self.step} steps = {self.cfg.epochs:g} epochs); "
                f"its results are in {SUMMARY}. To train it longer, resume with a larger `epochs`"
            )
        if saved_total != self.plan.total_steps:
            self.say(
                f"extending the run from {saved_total} to {self.plan.total_steps} steps: from step {self.step} on, "
                f"the LR follows the warm-up + cosine schedule of a run planned for {self.cfg.epochs:g} epochs "
                f"(so it rises from where the shorter schedule ended to that schedule's value at this step)"
            )

    def _claim_run_dir(self, resume: str | Path | None) -> Path:
        """Decide the run directory (rank 0 decides, the others follow) and lock it for this process."""
        cfg, info = self.cfg, self.info
        decided = None
        if info.is_main:
            if resume:
                run_dir = Path(resume).parent
            elif cfg.output:
                run_dir = Path(cfg.output)
                existing = [f for f in RUN_FILES if (run_dir / f).exists()]
                # a run that failed before its first step (a tracker that would not start, say) left only
                # its config and tracker folders: nothing to continue or lose, so the folder is reused
                # rather than refused (its --resume has no checkpoint to continue from). A config.yaml
                # this trainer did not write (the user's own, given as --config) is never overwritten.
                if not any(f in _TRAINED_FILES for f in existing) and _written_by_a_run(run_dir / CONFIG):
                    existing = []
                if existing == [CONFIG] and not self.exist_ok:
                    raise MNv4Error(
                        f"{run_dir / CONFIG} was not written by a run (your own config?) and a run writes its "
                        "config.yaml there; choose another `output`, or replace it with `exist_ok`"
                    )
                if existing and not self.exist_ok:
                    raise MNv4Error(
                        f"{run_dir} already holds a run ({', '.join(existing[:4])}); continue it with `resume`, "
                        "choose another `output`, or replace it with `exist_ok`"
                    )
            else:
                run_dir = default_run_dir(f"{_model_label(self.model)}-{self.data.name}")
            self._made_run_dir = None if run_dir.exists() else run_dir  # removed again if setup fails
            self.lock = DirLock(run_dir, "training run").acquire()
            if not resume and cfg.output and self.exist_ok:
                replaced = [f for f in RUN_FILES if (run_dir / f).exists()]
                if replaced:
                    self.say(f"replacing the run in {run_dir}: removing {', '.join(replaced)}")
                    for f in replaced:
                        p = run_dir / f
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed = remove_orphan_temps(run_dir)
            if removed:
                self.say(f"removed {len(removed)} temporary file(s) left by an interrupted save in {run_dir}")
            decided = str(run_dir)
        if info.distributed:
            box = [decided]
            dist.broadcast_object_list(box, src=0)
            decided = box[0]
        return Path(decided)

    # ------------------------------------------------------------------ the loop
    def run(self, resume: str | Path | None = None, max_steps: int | None = None) -> TrainResult:
        """setup -> (train_epoch, evaluate_and_select, checkpoint) per epoch -> finish."""
        if resume is not None:
            resume = checkpoint_file(resume)
        try:
            with self._stop:
                self.setup(resume)
                self.steps_this_run = 0
                self.max_steps = max_steps
                start_epoch = self.step // self.plan.steps_per_epoch
                for epoch in range(start_epoch, self.plan.num_epochs):
                    row = self.train_epoch(epoch)
                    if self.stop_reason is not None:
                        break
                    self.evaluate_and_select(epoch, row)
                    if self.info.is_main:
                        self.metrics.log(row)
                        self.say(self.epoch_line(row, epoch, time.perf_counter() - self.t_start))
                    self.save_checkpoint()
                return self.finish()
        except BaseException:
            self._unmake_run_dir()
            raise
        finally:
            if self.metrics is not None:
                self.metrics.close()
            if self.lock is not None:
                self.lock.release()

    def _unmake_run_dir(self) -> None:
        """A run refused before its first step (fp16 on a CPU, a tracker that would not start) leaves no
        folder it made behind: retries would otherwise pile up runs/NAME-2, -3... holding only a config."""
        made = self._made_run_dir
        if made is None or not made.is_dir() or any((made / f).exists() for f in _TRAINED_FILES):
            return
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        shutil.rmtree(made, ignore_errors=True)

    def _stop_requested(self) -> str | None:
        if self.max_steps is not None and self.steps_this_run >= self.max_steps:
            return "max_steps"
        return self._stop.reason

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        plan = self.plan
        first = self.step - epoch * plan.steps_per_epoch
        last = min(plan.steps_per_epoch, plan.total_steps - epoch * plan.steps_per_epoch)
        self.sampler.set_epoch(epoch, first)
        self.raw.train()
        self._epoch_t0, self._seen = time.perf_counter(), 0
        if first == 0:  # else a resumed epoch: the steps before the stop count too (restored by resume)
            self.epoch_loss = [0.0, 0]
        self._batches = iter(self.train_loader)
        progress = self.progress
        bar = tqdm(
            total=last - first,
            desc=f"epoch {epoch + 1}/{plan.num_epochs}",
            unit="step",
            disable=True if not self.info.is_main or progress is False else (None if progress is None else False),
            leave=False,
            dynamic_ncols=True,
        )
        self._epoch_readable = 0
        for _ in range(first, last):
            reason = self._stop_requested()
            if reason is not None:
                # Every rank must agree before anyone stops (a signal may reach one rank first).
                self.stop_reason = reason
            loss = self.train_step()
            if loss is None and self.stop_reason is not None:
                break
            if loss is not None and math.isfinite(loss):
                self.epoch_loss = [self.epoch_loss[0] + loss, self.epoch_loss[1] + 1]
            elapsed = time.perf_counter() - self._epoch_t0
            bar.set_postfix(
                loss=f"{loss:.3f}" if loss is not None else "-",
                lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                img_s=f"{self._seen * self.info.world_size / max(elapsed, 1e-9):.0f}",
            )
            bar.update()
            if self.cfg.save_every_steps and self.step % self.cfg.save_every_steps == 0:
                if self.step % plan.steps_per_epoch:  # epoch ends checkpoint anyway
                    self.save_checkpoint()
        bar.close()
        if self.stop_reason is not None:
            self.save_checkpoint()
            return {}
        if self._epoch_readable == 0 and last > first:
            alone = f" ({self.lone_images} readable image(s) were each alone in a process's share)" * bool(
                self.lone_images
            )
            raise MNv4Error(
                f"no step of epoch {epoch + 1} had two readable training images in one process's share{alone}: "
                f"too few images of {self.data.name} can be read; fix or remove the skipped files or raise `batch_size`"
            )
        epoch_time = time.perf_counter() - self._epoch_t0
        return {
            "epoch": epoch + 1,
            "step": self.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": self.epoch_loss[0] / max(self.epoch_loss[1], 1),
            "images_per_sec": self._seen * self.info.world_size / max(epoch_time, 1e-9),
            "epoch_seconds": epoch_time,
        }

    def _fetch_step(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This rank's readable images of the step. A single one is left out: BatchNorm cannot normalise a
        batch of one; the same image twice (what was once done) has no variance at any deep layer, so
        the backward pass divides by sqrt(eps) at each and overflows to NaN; and running statistics
        would make it train against a different normalisation than every other image."""
        xs, ys = [], []
        for _ in range(self.plan.accumulation):
            x, y, broken = next(self._batches)
            self.bad.add(broken)
            if len(y):
                xs.append(x)
                ys.append(y)
        if sum(len(y) for y in ys) == 1:
            self.lone_images += 1
            return [], []
        return xs, ys

    def train_step(self) -> float | None:
        """One optimizer step; returns the global mean loss, or None when no update was made.

        The step's micro-batches are fetched first, so the global count of readable images is known
        before any backward pass: each rank's loss is scaled by world_size / count, which DDP's
        gradient average turns into the exact mean over every readable image of the global batch.
        """
        cfg, info, device = self.cfg, self.info, self.info.device
        _seed_step(sample_seed(cfg.seed, self.step, info.rank, 0xD7), device)
        xs, ys = self._fetch_step()
        local = sum(len(y) for y in ys)
        total, stop = local, int(self.stop_reason is not None)
        if info.distributed:
            t = torch.tensor([local, stop], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            total, stop = int(t[0].item()), int(t[1].item())
            if stop and self.stop_reason is None:
                self.stop_reason = "stop requested on another rank"
        if stop:
            return None  # nothing changed in this step: last.pt resumes exactly here
        self._epoch_readable += total
        self.before_step(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        if total > 0:
            chunks = _rechunk(xs, ys, self.plan.micro_batch)
            scale = info.world_size / total
            if not chunks:
                self._idle_backward()
            for i, (x, y, w) in enumerate(chunks):
                sync = i == len(chunks) - 1 or not info.distributed
                x, y, w = x.to(device, non_blocking=True), y.to(device, non_blocking=True), w.to(device)
                x, y = self.make_targets(x, y)
                if self.channels_last_batches:
                    x = x.contiguous(memory_format=torch.channels_last)
                with contextlib.nullcontext() if sync else self._ddp().no_sync():
                    per_sample = self.forward_loss(x, y) * w
                    loss = per_sample.sum() * scale
                    if i == len(chunks) - 1:
                        reg = l2_penalty(self.raw, cfg.l2)
                        if reg is not None:
                            loss = loss + reg
                    self.scaler.scale(loss).backward()
                loss_sum += per_sample.detach().sum().item()
                self._seen += int(round(w.sum().item()))
        loss_sum = all_reduce_sum([loss_sum], info)[0]
        mean_loss = loss_sum / total if total else None
        finite_grads = total > 0 and math.isfinite(mean_loss) and self._grads_finite()
        if not finite_grads:
            self._skip_update(total, mean_loss)
        else:
            self.nonfinite_in_a_row = 0
            if cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.raw.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.step += 1
        self.steps_this_run += 1
        if self.ema is not None and self.step >= self.plan.ema_start_step:
            self.ema.update_parameters(self.raw)
        self.after_step(self.step, mean_loss if mean_loss is not None else float("nan"))
        return mean_loss

    def _ddp(self) -> DistributedDataParallel:
        return getattr(self.net, "_orig_mod", self.net)  # under torch.compile, the wrapped DDP module

    def _idle_backward(self) -> None:
        """A rank without a readable image still joins DDP's gradient all-reduce, contributing zero.

        Eval mode, so BatchNorm statistics are not touched and dropout/stochastic depth leave every
        parameter in the graph (DDP expects a gradient for each).
        """
        self.raw.eval()
        try:
            size = self.raw.preprocess.input_size
            in_chans = next(m for m in self.raw.modules() if isinstance(m, nn.Conv2d)).in_channels
            x = torch.zeros(2, in_chans, size, size, device=self.info.device)
            with self.autocast:
                out = self.net(x)
            loss = out.float().sum() * 0.0
            reg = l2_penalty(self.raw, self.cfg.l2)
            if reg is not None:
                loss = loss + reg
            self.scaler.scale(loss).backward()
        finally:
            self.raw.train()

    def _grads_finite(self) -> bool:
        """Whether every gradient is finite (after DDP's all-reduce, so all ranks agree); a finite loss can
        still have overflowing gradients, and one such update would turn every weight into NaN."""
        if self.scaler.is_enabled():
            return True  # the GradScaler checks and skips such steps itself
        grads = [p.grad for p in self.raw.parameters() if p.grad is not None]
        return not grads or bool(torch.isfinite(nn.utils.get_total_norm(grads)))

    def _skip_update(self, total: int, mean_loss: float | None) -> None:
        self.skipped_steps += 1
        if total == 0:
            self.say(f"step {self.step + 1}: no process has two readable images in this global batch; no update")
            return
        self.nonfinite_in_a_row += 1
        what = f"loss is {mean_loss}" if not math.isfinite(mean_loss) else "the gradients are not finite"
        self.say(f"step {self.step + 1}: {what}; the update is skipped")
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
            last = self.run_dir / LAST
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was saved yet"
            raise MNv4Error(
                f"the loss or its gradients were not finite for {self.nonfinite_in_a_row} steps in a row "
                f"(last loss: {mean_loss}); "
                f"training stopped at step {self.step + 1} and {kept}. Lower `lr` or set `grad_clip`"
            )

    # ------------------------------------------------------------------ evaluation, checkpoints, end
    def _sync_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm statistics (raw and EMA) before evaluating or saving."""
        if not self.info.distributed:
            return
        modules = [self.raw] + ([self.ema] if self.ema is not None else [])
        for m in modules:
            for b in m.buffers():
                dist.broadcast(b, src=0)

    def evaluate_and_select(self, epoch: int, row: dict[str, Any]) -> None:
        cfg, plan, info = self.cfg, self.plan, self.info
        final_epoch = epoch + 1 == plan.num_epochs
        if (epoch + 1) % max(cfg.eval_every, 1) == 0 or final_epoch:
            self._sync_buffers()
            args = (self.val_loader, info.device, self.autocast, self.channels_last_batches, info)
            self.last_eval = {"raw": evaluate(self.raw, *args)}
            if self.ema is not None and self.step >= plan.ema_start_step:
                self.last_eval["ema"] = evaluate(self.ema.module, *args)
            for kind, res in self.last_eval.items():
                prefix = "" if kind == "raw" else "ema_"
                row.update(
                    {f"{prefix}val_top1": res.top1, f"{prefix}val_top5": res.top5, f"{prefix}val_loss": res.loss}
                )
            kind, res = max(self.last_eval.items(), key=lambda kv: kv[1].top1)
            if res.top1 > self.best_top1:
                self.best_top1, self.best_epoch, self.best_weights = res.top1, epoch + 1, kind
                if info.is_main:
                    weights = self.raw if kind == "raw" else self.ema.module
                    self.save_weights(
                        weights, self.run_dir / BEST, extra={"epoch": epoch + 1, "val_top1": res.top1, "weights": kind}
                    )
        # Fixed columns: the CSV header comes from the first row, which may precede eval or EMA.
        for key in ("val_top1", "val_top5", "val_loss") + (
            ("ema_val_top1", "ema_val_top5", "ema_val_loss") if self.ema else ()
        ):
            row.setdefault(key, "")

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "version": 2,
            "model": self.raw.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng_state(),
            "step": self.step,
            "total_steps": self.plan.total_steps,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "best_weights": self.best_weights,
            "skipped_steps": self.skipped_steps,
            "epoch_loss": list(self.epoch_loss),
            "wall_seconds": self.wall_before + time.perf_counter() - self.t_start,
            "config": self.cfg.to_dict(),
            "class_names": list(self.data.class_names),
            "extra": self.extra_state(),
        }

    def save_checkpoint(self) -> None:
        if self.nonfinite_in_a_row:
            return  # inside a run of non-finite losses: keep the last good checkpoint as it is
        self._sync_buffers()
        if self.info.is_main:
            save_training_state(self.run_dir / LAST, self.checkpoint_state())

    def _gather_bad_images(self) -> None:
        """Rank 0's count of skipped files covers every rank (a file is counted once)."""
        if not self.info.distributed:
            return
        everyone: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(everyone, dict(self.bad.paths))
        for paths in everyone:
            for path, reason in paths.items():
                self.bad.paths.setdefault(path, reason)

    def finish(self) -> TrainResult:
        info = self.info
        self._gather_bad_images()
        wall = self.wall_before + time.perf_counter() - self.t_start
        summary: dict[str, Any] = {}
        stopped = self.stop_reason is not None
        if stopped:
            self.say(
                stop_line(self.step, self.plan.total_steps, self.stop_reason, self.run_dir / LAST, self.resume_command)
            )
        elif info.is_main:
            self.save_weights(
                self.raw, self.run_dir / LAST_WEIGHTS, extra={"epoch": self.plan.num_epochs, "weights": "raw"}
            )
            if self.ema is not None:
                self.save_weights(
                    self.ema.module, self.run_dir / LAST_EMA, extra={"epoch": self.plan.num_epochs, "weights": "ema"}
                )
            summary = self.summary(wall)
            atomic_write_json(self.run_dir / SUMMARY, summary)
        if info.distributed:
            dist.barrier()
        return TrainResult(
            self.run_dir,
            summary,
            self.raw,
            self.ema.module if self.ema is not None else None,
            stopped,
            self.stop_reason,
            self.step,
        )

    def summary(self, wall: float) -> dict[str, Any]:
        final = self.last_eval.get("raw")
        plan, data = self.plan, self.data
        summary = {
            "model": _model_label(self.raw),
            "dataset": data.name,
            "recipe": self.cfg.recipe,
            "epochs": plan.num_epochs,
            "steps": plan.total_steps,
            "num_classes": len(data.class_names),
            "input_size": self.raw.preprocess.input_size,
            "val_top1": round(self.best_top1, 4),  # best epoch, raw or EMA weights (see best_weights)
            "val_top1_final": round(final.top1, 4) if final else None,
            "val_top5_final": round(final.top5, 4) if final else None,
            "val_loss_final": round(final.loss, 6) if final else None,
            "best_epoch": self.best_epoch,
            "best_weights": self.best_weights,
            "best_checkpoint": str(self.run_dir / BEST),
            "last_checkpoint": str(self.run_dir / LAST_WEIGHTS),
            "wall_seconds": round(wall, 2),
            "skipped_images": len(self.bad),
            "skipped_steps": self.skipped_steps,
        }
        if "ema" in self.last_eval:
            summary["ema_val_top1_final"] = round(self.last_eval["ema"].top1, 4)
        return summary


def train(
    cfg: TrainConfig,
    resume: str | Path | None = None,
    data: DataBundle | None = None,
    max_steps: int | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    exist_ok: bool = False,
    trainer: type[Trainer] | None = None,
) -> TrainResult:
    """Train according to ``cfg``; under torchrun every process calls this with the same ``cfg``.

    Args:
        resume: a run folder or its training checkpoint (``last.pt``) to continue from.
        data: datasets to use instead of resolving ``cfg.data`` (tests, notebooks).
        max_steps: stop this invocation after that many optimizer steps, saving ``last.pt`` there.
        progress: progress bars; None shows them on terminals only.
        log: where per-epoch lines go (default: print on rank 0).
        exist_ok: replace a run that already exists in ``cfg.output``.
        trainer: a :class:`Trainer` subclass to run instead (e.g. the distillation student's).
    """
    return (trainer or Trainer)(cfg, data=data, progress=progress, log=log, exist_ok=exist_ok).run(resume, max_steps)


# ---------------------------------------------------------------------------------------------- helpers
def _model_label(model: nn.Module) -> str:
    spec = getattr(model, "spec", None)
    return spec.name if spec is not None else type(model).__name__.lower()


def _rechunk(
    xs: list[torch.Tensor], ys: list[torch.Tensor], micro: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """This rank's readable samples of a step as micro-batches with per-sample weights.

    Unreadable files shrink micro-batches; a lone image joins the previous micro-batch. A rank whose
    whole step is one image has none to train on (see :meth:`Trainer._fetch_step`).
    """
    if not xs:
        return []
    x, y = torch.cat(xs), torch.cat(ys)
    n = len(x)
    bounds = list(range(0, n, micro)) + [n]
    if bounds[-1] - bounds[-2] == 1 and len(bounds) > 2:
        bounds.pop(-2)
    return [(x[a:b], y[a:b], torch.ones(b - a)) for a, b in zip(bounds, bounds[1:])]


def _precision(cfg: TrainConfig, device: torch.device) -> tuple[contextlib.AbstractContextManager, bool]:
    """(autocast context, whether to use a GradScaler)."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext(), False
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16), False
    if cfg.precision == "fp16":
        if device.type != "cuda":
            raise MNv4Error("fp16 training needs CUDA; use `precision` bf16 on CPU")
        return torch.autocast("cuda", dtype=torch.float16), True
    raise MNv4Error(f"`precision` must be fp32, bf16 or fp16, got {cfg.precision!r}")


def _seed_step(seed: int, device: torch.device) -> None:
    """Reseed what dropout, stochastic depth and Mixup/CutMix draw from (CPU, plus the GPU in use)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def _epoch_line(row: dict[str, Any], plan: Plan, epoch: int, elapsed: float) -> str:
    parts = [f"epoch {epoch + 1}/{plan.num_epochs}", f"train_loss {row['train_loss']:.4f}"]
    if row["val_top1"] != "":
        parts.append(f"val top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}% loss {row['val_loss']:.4f}")
    if row.get("ema_val_top1", "") != "":
        parts.append(f"EMA top-1 {row['ema_val_top1']:.2f}%")
    remaining = elapsed / (epoch + 1) * (plan.num_epochs - epoch - 1) if epoch >= 0 else 0.0
    parts += [f"lr {row['lr']:.2e}", f"{row['images_per_sec']:.0f} img/s", f"{row['epoch_seconds']:.1f}s"]
    parts.append(f"eta {remaining / 60:.1f} min")
    return "  ".join(parts)


_DERIVED_MARK = "# derived for this run (not inputs):\n"  # ends every config.yaml a run writes


def _written_by_a_run(config_file: Path) -> bool:
    """No file there, or one a run wrote (it carries the derived-values block)."""
    try:
        return not config_file.exists() or _DERIVED_MARK in config_file.read_text(errors="replace")
    except OSError:
        return False


def _config_yaml(cfg: TrainConfig, plan: Plan, info: DistInfo) -> str:
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
    return yaml.safe_dump(d, sort_keys=False) + _DERIVED_MARK + yaml.safe_dump({"derived": derived}, sort_keys=False)
