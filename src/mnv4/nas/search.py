"""The search: TuNAS over the MNv4 UIB space, in the paper's two stages (docs/nas.md).

Every optimizer step:

1. ``before_step``: the controller samples an architecture; the super-network runs it.
2. ``train_step``: one SGD step of the shared weights on a training batch (that architecture only).
3. ``after_step``: once the first ``rl_warmup`` (25%) of the stage is over, the controller samples
   another architecture, measures its accuracy Q on a batch of the held-out split of the training
   data (never the validation set) and its cost T, and takes one REINFORCE step on
   ``Q + beta * |T / T0 - 1|``.

Stages: *coarse* searches stem width, stage depths and filters with every block an IB (expansion 4,
3x3 DW); *fine* keeps those and searches each UIB's start / middle DW and expansion (and MQA slots
in hybrid spaces), continuing to train the same shared weights. ``one_stage`` searches everything
jointly for the same total number of steps. The result is the controller's most likely
architecture, moved to the most likely sampled one within ``cost_tolerance`` of the target when it
misses it.

Reproducible and resumable: architectures are drawn from generators seeded by (seed, step), data
order and augmentation by (seed, epoch, index), so a resumed search replays the same steps. Under
torchrun each process trains on its share of the global batch, every process samples the same
architectures and the reward's correct counts are summed over processes, so all controllers agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import InvalidValue, MNv4Error, check_float, check_int
from ..models.specs import ModelSpec
from .controller import Controller, absolute_reward
from .cost import HARDWARE_CHOICES, CostModel, LatencyTable, get_cost_model
from .space import Arch, SearchSpace, get_space
from .supernet import SuperNet

__all__ = ["SearchConfig", "SearchResult", "search", "STATE", "SPEC"]

STATE = "search_state.pt"
SPEC = "spec.json"
HISTORY = "history.jsonl"


@dataclass(frozen=True)
class SearchConfig:
    """Everything a search needs; the CLI maps its flags onto these fields."""

    data: str
    output: str | None = None
    space: str = "s"
    hardware: str = "pixel8_edgetpu"  # macs | local | a built-in roofline profile | a .yaml/.json profile
    target_ms: float | None = None
    target_macs: float | None = None  # millions of MACs
    resolution: int | None = None  # None: the dataset's natural size (32 for CIFAR), else 224
    epochs: float = 10.0  # super-network epochs over the training split, both stages together
    one_stage: bool = False
    coarse_fraction: float = 0.5  # share of the steps the coarse stage gets
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0  # LR warm-up of the shared weights
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.35, 1.0)
    hflip: float = 0.5
    rl_warmup: float = 0.25  # fraction of each stage before the controller learns
    beta: float = -0.10
    controller_lr: float | None = None  # None: 15 / (RL updates of the stage), within [1e-3, 0.1]
    baseline_momentum: float = 0.95
    reward_split: float = 0.2  # held-out fraction of the training data for the reward
    reward_batch: int | None = None  # None: batch_size
    cost_tolerance: float = 0.10
    eval_subnets: int = 12  # sampled sub-networks evaluated for the accuracy-vs-cost scatter
    calib_batches: int = 4
    seed: int = 0
    workers: int = 0
    device: str = "auto"
    threads: int = 1  # threads of the latency measurements (local table, measured latency)
    latency_table: str | None = None  # where the local table is cached (default ~/.cache/mnv4/latency)
    distill: tuple[str, ...] = ()
    save_every_steps: int = 200

    def validated(self) -> SearchConfig:
        if (self.target_ms is None) == (self.target_macs is None):
            raise InvalidValue("target_ms", self.target_ms, "give exactly one of `target_ms` and `target_macs`")
        if self.target_ms is not None:
            check_float("target_ms", self.target_ms, 0.0, lo_open=True)
            if self.hardware == "macs":
                raise InvalidValue("hardware", "macs", "a MAC count has no milliseconds; use `target_macs`")
        if self.target_macs is not None:
            check_float("target_macs", self.target_macs, 0.0, lo_open=True)
        if self.hardware not in HARDWARE_CHOICES and not self.hardware.lower().endswith((".yaml", ".yml", ".json")):
            raise InvalidValue("hardware", self.hardware, f"choose {', '.join(HARDWARE_CHOICES)} or a .yaml/.json file")
        check_float("epochs", self.epochs, 0.0, lo_open=True)
        check_float("coarse_fraction", self.coarse_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        check_int("batch_size", self.batch_size, 2)
        check_float("lr", self.lr, 0.0, lo_open=True)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_float("rl_warmup", self.rl_warmup, 0.0, 1.0, hi_open=True)
        check_float("beta", self.beta, hi=0.0)
        if self.controller_lr is not None:
            check_float("controller_lr", self.controller_lr, 0.0, lo_open=True)
        check_float("baseline_momentum", self.baseline_momentum, 0.0, 1.0, hi_open=True)
        check_float("reward_split", self.reward_split, 0.0, 0.9, lo_open=True)
        check_float("cost_tolerance", self.cost_tolerance, 0.0, lo_open=True)
        check_int("eval_subnets", self.eval_subnets, 0)
        check_int("calib_batches", self.calib_batches, 1)
        check_int("workers", self.workers, 0)
        check_int("threads", self.threads, 1)
        check_int("save_every_steps", self.save_every_steps, 0)
        if self.resolution is not None:
            check_int("resolution", self.resolution, 16)
        if self.reward_batch is not None:
            check_int("reward_batch", self.reward_batch, 1)
        if self.distill:
            raise MNv4Error(
                "`distill` needs the distillation datasets of mnv4.distill, which this build does not include "
                "yet; search on the labelled data instead (docs/nas.md, 'Distillation')"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchConfig:
        d = dict(d)
        for key in ("crop_scale", "distill"):
            if key in d and d[key] is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    @property
    def target_kind(self) -> str:
        return "macs" if self.target_macs is not None else "ms"

    @property
    def target(self) -> float:
        return float(self.target_macs if self.target_macs is not None else self.target_ms)


@dataclass
class StagePlan:
    name: str  # coarse | fine | joint
    start: int  # first global step
    steps: int

    @property
    def end(self) -> int:
        return self.start + self.steps

    def rl_start(self, warmup: float) -> int:
        return self.start + int(round(warmup * self.steps))


@dataclass
class SearchResult:
    output: Path
    arch: Arch
    spec: ModelSpec
    cost: float
    target: float
    unit: str
    report: dict[str, Any] = field(default_factory=dict)


class _Held(Dataset):
    """The held-out split as (image tensor, label), loaded once when small enough."""

    def __init__(self, ds: Dataset, transform: Callable, max_bytes: int = 256 << 20) -> None:
        self.ds, self.transform = ds, transform
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None
        first = transform(ds[0][0]) if len(ds) else None
        if first is not None and first.numel() * 4 * len(ds) <= max_bytes:
            xs, ys = zip(*(self._load(i) for i in range(len(ds))))
            self.cache = torch.stack(xs), torch.tensor(ys)

    def _load(self, i: int) -> tuple[torch.Tensor, int]:
        from ..data.folder import BadImage

        im, y = self.ds[i]
        if isinstance(im, BadImage):
            return torch.zeros(0), -1
        return self.transform(im), int(y)

    def __len__(self) -> int:
        return len(self.ds)

    def batch(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None:
            t = torch.tensor(idx)
            return self.cache[0][t], self.cache[1][t]
        items = [self._load(i) for i in idx]
        items = [(x, y) for x, y in items if y >= 0]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _gen(*keys: int) -> torch.Generator:
    from ..data.sampling import sample_seed

    return torch.Generator().manual_seed(sample_seed(*keys))


def _split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    perm = torch.randperm(n, generator=_gen(seed, 0x5E1)).tolist()
    k = max(1, int(round(n * fraction)))
    return sorted(perm[k:]), sorted(perm[:k])


class Search:
    """One search run, in phases (setup, stages of steps, finish) with hooks per step."""

    def __init__(self, cfg: SearchConfig, data=None, progress: bool | None = None, log=None) -> None:
        self.cfg = cfg.validated()
        self.data = data
        self.progress = progress
        self._log = log
        self.history: list[dict[str, Any]] = []
        self.stage_results: dict[str, Arch] = {}
        self.controller: Controller | None = None
        self.stage_index = -1
        self.step = 0
        self.wall_before = 0.0
        self._costs: dict[tuple, float] = {}

    # -- setup ----------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if not self.info.is_main:
            return
        if self._log is not None:
            self._log(msg)
        else:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stdout)

    def setup(self) -> None:
        from ..data.datasets import load_data
        from ..data.sampling import GlobalBatchSampler, SeededDataset
        from ..data.transforms import eval_transform, train_transform
        from ..models.registry import Preprocess
        from ..train.distributed import setup
        from ..train.optim import build_optimizer, build_scheduler

        cfg = self.cfg
        self.info = setup(cfg.device)
        self.space: SearchSpace = get_space(cfg.space)
        if self.data is None:
            if self.info.is_main:
                self.data = load_data(cfg.data, None, 0.2, cfg.seed)
            if self.info.distributed:
                dist.barrier()
            if self.data is None:
                self.data = load_data(cfg.data, None, 0.2, cfg.seed)
        data = self.data
        self.num_classes = len(data.class_names)
        res = cfg.resolution or data.input_size or 224
        self.resolution = res
        if data.input_size is not None:
            pp = Preprocess(input_size=res, crop_pct=1.0, interpolation="bilinear")
        else:
            pp = Preprocess(input_size=res)
        self.preprocess = pp
        w_idx, r_idx = _split(len(data.train), cfg.reward_split, cfg.seed)
        self.weights_set = Subset(data.train, w_idx)
        self.reward_set = _Held(Subset(data.train, r_idx), eval_transform(pp))
        self.calib_set = _Held(Subset(data.train, w_idx[: cfg.calib_batches * cfg.batch_size]), eval_transform(pp))
        world = self.info.world_size
        if cfg.batch_size % world:
            raise InvalidValue("batch_size", cfg.batch_size, f"must be divisible by the {world} processes")
        if len(self.weights_set) < cfg.batch_size:
            raise InvalidValue(
                "batch_size", cfg.batch_size, f"must be <= the {len(self.weights_set)} training images left for weights"
            )
        tf = train_transform(pp, scale=tuple(cfg.crop_scale), hflip=cfg.hflip)
        train_ds = SeededDataset(self.weights_set, tf, cfg.seed)
        self.sampler = GlobalBatchSampler(len(train_ds), cfg.batch_size, self.info.rank, world, True, cfg.seed)
        from ..data.datasets import collate_images

        self.loader = DataLoader(
            train_ds,
            batch_size=cfg.batch_size // world,
            sampler=self.sampler,
            num_workers=cfg.workers,
            collate_fn=collate_images,
            persistent_workers=cfg.workers > 0,
        )
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = max(1, int(round(cfg.epochs * self.steps_per_epoch)))
        if cfg.one_stage:
            self.stages = [StagePlan("joint", 0, self.total_steps)]
        else:
            coarse = max(1, int(round(cfg.coarse_fraction * self.total_steps)))
            if coarse >= self.total_steps:
                raise InvalidValue("epochs", cfg.epochs, "leaves no steps for the fine stage; raise it")
            self.stages = [StagePlan("coarse", 0, coarse), StagePlan("fine", coarse, self.total_steps - coarse)]

        torch.manual_seed(cfg.seed)
        self.supernet = SuperNet(self.space, self.num_classes).to(self.info.device)
        self.model: nn.Module = self.supernet
        if self.info.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # Each step leaves the DW ops and blocks its architecture does not use without gradients.
            self.model = DistributedDataParallel(self.supernet, find_unused_parameters=True)
        self.optimizer = build_optimizer(self.supernet, cfg.lr, cfg.weight_decay, (0.9, 0.999), 1e-8)
        warm = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        self.scheduler = build_scheduler(self.optimizer, min(warm, self.total_steps // 2), self.total_steps, 0.0)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.cost_model = self._cost_model()
        self.target = cfg.target

    def _cost_model(self) -> CostModel:
        cfg = self.cfg
        cm = get_cost_model(
            cfg.hardware, self.resolution, self.num_classes, cfg.target_kind, cfg.latency_table, cfg.threads
        )
        if isinstance(cm, LatencyTable):
            # One table for all processes: rank 0 measures, the others read its file.
            if self.info.is_main:
                n = cm.build(self.space, progress=self.progress)
                if n or not cm.overhead():
                    self.say(f"latency table: measured {n} segments, {len(cm)} in {cm.path}")
                    fit = cm.fit_overhead([self.space.to_spec(self.space.sample(_rng(cfg.seed, i))) for i in range(3)])
                    self.say(f"latency table: per-call overhead {fit['overhead_ms']:.3f} ms")
            if self.info.distributed:
                dist.barrier()
                cm = get_cost_model(
                    cfg.hardware, self.resolution, self.num_classes, cfg.target_kind, cm.path, cfg.threads
                )
        return cm

    def arch_cost(self, arch: Arch) -> float:
        key = tuple(sorted(self.space.canonical(arch).items()))
        if key not in self._costs:
            self._costs[key] = self.cost_model.cost(self.space.to_spec(arch))
        return self._costs[key]

    # -- stages ---------------------------------------------------------------------------------
    def _controller_for(self, stage: StagePlan) -> Controller:
        cfg = self.cfg
        if stage.name == "coarse":
            fixed = self.space.coarse_fixed()
        elif stage.name == "fine":
            fixed = self.space.fine_fixed(self.stage_results["coarse"])
        else:
            fixed = {}
        updates = max(1, stage.end - stage.rl_start(cfg.rl_warmup))
        lr = cfg.controller_lr or min(0.1, max(1e-3, 15.0 / updates))
        return Controller(self.space.decisions, lr, cfg.baseline_momentum, fixed)

    def _enter_stage(self, index: int) -> None:
        if index == self.stage_index:
            return
        if self.controller is not None and self.stage_index >= 0:
            self.stage_results[self.stages[self.stage_index].name] = self.space.canonical(self.controller.argmax())
        self.stage_index = index
        stage = self.stages[index]
        self.controller = self._controller_for(stage)
        n = len(self.controller.decisions)
        self.say(
            f"stage {stage.name}: steps {stage.start}-{stage.end}, {n} decisions, controller frozen until step "
            f"{stage.rl_start(self.cfg.rl_warmup)}, controller LR {self.controller.lr:.3g}"
        )

    def stage_at(self, step: int) -> int:
        return next(i for i, s in enumerate(self.stages) if step < s.end)

    # -- per-step hooks -------------------------------------------------------------------------
    def before_step(self, step: int) -> Arch:
        self._enter_stage(self.stage_at(step))
        arch = self.space.canonical(self.controller.sample(_gen(self.cfg.seed, step, 1)))
        self.supernet.set_arch(arch)
        return arch

    def train_step(self, batch) -> float:
        x, y, _ = batch
        x, y = x.to(self.info.device), y.to(self.info.device)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.criterion(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.item())

    @torch.no_grad()
    def reward_quality(self, arch: Arch, step: int) -> float:
        """Accuracy of ``arch`` on one held-out batch (batch statistics, like the training pass)."""
        cfg = self.cfg
        n = min(cfg.reward_batch or cfg.batch_size, len(self.reward_set))
        idx = torch.randperm(len(self.reward_set), generator=_gen(cfg.seed, step, 2))[:n].tolist()
        share = idx[self.info.rank :: self.info.world_size]
        correct = total = 0.0
        if share:
            x, y = self.reward_set.batch(share)
            self.supernet.train()
            logits = self.supernet(x.to(self.info.device), arch)
            correct, total = float((logits.argmax(1).cpu() == y).sum()), float(len(y))
        from ..train.distributed import all_reduce_sum

        correct, total = all_reduce_sum([correct, total], self.info)
        return correct / max(total, 1.0)

    def after_step(self, step: int, loss: float, arch: Arch) -> None:
        stage = self.stages[self.stage_index]
        row: dict[str, Any] = {"step": step, "stage": stage.name, "loss": loss}
        if step >= stage.rl_start(self.cfg.rl_warmup):
            rl_arch = self.space.canonical(self.controller.sample(_gen(self.cfg.seed, step, 3)))
            q = self.reward_quality(rl_arch, step)
            cost = self.arch_cost(rl_arch)
            reward = absolute_reward(q, cost, self.target, self.cfg.beta)
            adv = self.controller.update(rl_arch, reward, self.space.active(rl_arch))
            row.update(
                quality=q,
                cost=cost,
                reward=reward,
                advantage=adv,
                baseline=self.controller.baseline,
                arch=self.space.to_string(rl_arch),
            )
        row["entropy"] = self.controller.entropy()
        self.history.append(row)

    # -- state ----------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        from ..train.checkpoint import rng_state

        return {
            "version": 1,
            "config": _plain(self.cfg.to_dict()),
            "step": self.step,
            "stage_index": self.stage_index,
            "stage_results": self.stage_results,
            "supernet": self.supernet.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "controller": self.controller.state_dict() if self.controller else None,
            "history": json.dumps(self.history),
            "rng": rng_state(),
            "wall_seconds": self.wall_before + time.perf_counter() - self.t_start,
            "done": False,
        }

    def save(self, done: bool = False) -> None:
        if not self.info.is_main:
            return
        from ..train.checkpoint import save_training_state

        state = self.state()
        state["done"] = done
        save_training_state(self.out / STATE, state)

    def load(self, path: Path) -> None:
        from ..train.checkpoint import load_training_state, set_rng_state

        state = load_training_state(path)
        if state.get("done"):
            raise MNv4Error(f"the search in {path.parent} already finished; its result is {path.parent / SPEC}")
        saved = SearchConfig.from_dict(state["config"])
        if _plain(saved.to_dict()) != _plain(self.cfg.to_dict()):
            diff = sorted(k for k, v in saved.to_dict().items() if _plain(v) != _plain(getattr(self.cfg, k)))
            raise MNv4Error(f"cannot resume {path}: the search was started with other settings ({', '.join(diff)})")
        self.supernet.load_state_dict(state["supernet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stage_results = {k: dict(v) for k, v in state["stage_results"].items()}
        self.step = int(state["step"])
        if state["controller"] is not None:
            self.stage_index = -1
            self._enter_stage(int(state["stage_index"]))
            self.controller.load_state_dict(state["controller"])
        self.history = json.loads(state["history"])
        set_rng_state(state["rng"])
        self.wall_before = float(state["wall_seconds"])

    # -- the run --------------------------------------------------------------------------------
    def run(self, resume: bool = False, max_steps: int | None = None) -> SearchResult | None:
        """Search; returns None when ``max_steps`` stopped it early (state saved, resumable)."""
        from ..files import DirLock
        from ..train.distributed import teardown

        self.t_start = time.perf_counter()
        self.setup()
        cfg = self.cfg
        self.out = Path(cfg.output) if cfg.output else Path("runs") / f"search-{time.strftime('%Y%m%d-%H%M%S')}"
        lock = DirLock(self.out, "search") if self.info.is_main else None
        if lock is not None:
            lock.acquire()
            if not resume and ((self.out / STATE).exists() or (self.out / SPEC).exists()):
                lock.release()
                raise MNv4Error(f"{self.out} already holds a search; resume it or choose another output folder")
        try:
            if resume:
                self.load(self.out / STATE)
            return self._loop(max_steps)
        finally:
            if lock is not None:
                lock.release()
            if self.info.distributed:
                teardown()

    def _loop(self, max_steps: int | None) -> SearchResult | None:
        from tqdm import tqdm

        cfg = self.cfg
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.say(
                f"searching {self.space.name} ({self.space.num_architectures():.3g} architectures) on "
                f"{self.data.name} at {self.resolution} px for {self.cost_model.describe()} target "
                f"{self.target:g}: {self.total_steps} steps in {len(self.stages)} stage(s), batch {cfg.batch_size}, "
                f"{self.info.world_size} process(es)" + (f", resuming at step {self.step}" if self.step else "")
            )
        stop = {"signal": None}
        handlers = _install_stop(stop) if self.info.is_main and not self.info.distributed else {}
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="search",
            unit="step",
            disable=True if not self.info.is_main or self.progress is False else (None if self.progress is None else False),
            dynamic_ncols=True,
        )
        done_this_run = 0
        try:
            while self.step < self.total_steps:
                epoch, first = divmod(self.step, self.steps_per_epoch)
                self.sampler.set_epoch(epoch, first)
                for batch in self.loader:
                    arch = self.before_step(self.step)
                    loss = self.train_step(batch)
                    self.after_step(self.step, loss, arch)
                    self.step += 1
                    done_this_run += 1
                    bar.update()
                    last = self.history[-1]
                    post = {"loss": f"{loss:.3f}", "H": f"{last['entropy']:.1f}"}
                    if "quality" in last:
                        post.update(Q=f"{last['quality']:.2f}", T=f"{last['cost']:.3g}")
                    bar.set_postfix(post, refresh=False)
                    if self.step in {s.end for s in self.stages} and self.step < self.total_steps:
                        self._enter_stage(self.stage_at(self.step))
                        self.save()
                    elif cfg.save_every_steps and self.step % cfg.save_every_steps == 0:
                        self.save()
                    if stop["signal"] is not None:
                        self.save()
                        raise KeyboardInterrupt
                    if (max_steps is not None and done_this_run >= max_steps) or self.step >= self.total_steps:
                        break
                if max_steps is not None and done_this_run >= max_steps and self.step < self.total_steps:
                    self.save()
                    self.say(f"stopped at step {self.step}; resume to continue")
                    return None
        finally:
            bar.close()
            _restore(handlers)
        self.stage_results[self.stages[self.stage_index].name] = self.space.canonical(self.controller.argmax())
        return self.finish()

    # -- the result -----------------------------------------------------------------------------
    def pick(self) -> tuple[Arch, dict[str, Any]]:
        """The final architecture: the controller's argmax, or, when that misses the target by more
        than ``cost_tolerance``, the most likely of 2000 sampled architectures that meets it."""
        best = self.space.canonical(self.controller.argmax())
        cost = self.arch_cost(best)
        info = {"argmax": self.space.to_string(best), "argmax_cost": cost, "projected": False}
        if abs(cost / self.target - 1) <= self.cfg.cost_tolerance:
            return best, info
        g = _gen(self.cfg.seed, 0xF1A1)
        seen: dict[str, tuple[float, Arch]] = {}
        for _ in range(2000):
            a = self.space.canonical(self.controller.sample(g))
            key = tuple(sorted(a.items()))
            if key not in seen:
                with torch.no_grad():
                    seen[key] = (float(self.controller.log_prob(a, self.space.active(a))), a)
        inside = [(lp, a) for lp, a in seen.values() if abs(self.arch_cost(a) / self.target - 1) <= self.cfg.cost_tolerance]
        if inside:
            lp, a = max(inside, key=lambda t: t[0])
            info["projected"] = True
            return a, info
        return best, info

    @torch.no_grad()
    def evaluate_arch(self, arch: Arch) -> float:
        """Held-out accuracy (%) of ``arch`` with BN statistics recalibrated for it."""
        cfg = self.cfg
        n = len(self.calib_set)
        bs = cfg.batch_size
        batches = (self.calib_set.batch(list(range(i, min(n, i + bs))))[0] for i in range(0, n, bs))
        self.supernet.calibrate_bn(arch, (b.to(self.info.device) for b in batches))
        self.supernet.eval()
        correct = total = 0
        for i in range(0, len(self.reward_set), 256):
            x, y = self.reward_set.batch(list(range(i, min(len(self.reward_set), i + 256))))
            pred = self.supernet(x.to(self.info.device), arch).argmax(1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
        self.supernet.train()
        return 100.0 * correct / max(total, 1)

    def finish(self) -> SearchResult:
        from .report import write_report

        arch, pick_info = self.pick()
        spec = self.space.to_spec(arch, name=f"nas_{self.space.name}_{self.cfg.hardware.split('/')[-1].split('.')[0]}")
        cost = self.arch_cost(arch)
        subnets = []
        if self.info.is_main:
            g = _gen(self.cfg.seed, 0x5CA7)
            rng = _rng(self.cfg.seed, 0x5CA7)
            candidates = [("found", arch)]
            candidates += [("policy", self.space.canonical(self.controller.sample(g))) for _ in range(self.cfg.eval_subnets)]
            candidates += [("uniform", self.space.sample(rng)) for _ in range(self.cfg.eval_subnets)]
            for kind, a in candidates:
                subnets.append(
                    {"kind": kind, "arch": self.space.to_string(a), "cost": self.arch_cost(a), "accuracy": self.evaluate_arch(a)}
                )
        wall = self.wall_before + time.perf_counter() - self.t_start
        result = SearchResult(self.out, arch, spec, cost, self.target, self.cost_model.unit)
        if self.info.is_main:
            self.save(done=True)
            result.report = write_report(self, result, pick_info, subnets, wall)
        return result


def _rng(*keys: int):
    import random

    from ..data.sampling import sample_seed

    return random.Random(sample_seed(*keys))


def _plain(v: Any) -> Any:
    """JSON-like form for comparing configs saved in checkpoints (tuples -> lists)."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _install_stop(stop: dict) -> dict:
    def handler(signum, frame):
        stop["signal"] = signum

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread
            old[sig] = signal.signal(sig, handler)
    return old


def _restore(handlers: dict) -> None:
    for sig, h in handlers.items():
        signal.signal(sig, h)


def search(
    cfg: SearchConfig,
    resume: bool = False,
    data=None,
    max_steps: int | None = None,
    progress: bool | None = None,
    log=None,
) -> SearchResult | None:
    """Run (or resume) a search; under torchrun every process calls this with the same ``cfg``."""
    return Search(cfg, data, progress, log).run(resume, max_steps)
