"""The search: TuNAS over the MNv4 UIB space, in the paper's two stages (docs/nas.md).

Every optimizer step:

1. ``before_step``: the controller samples an architecture; the super-network runs it.
2. ``train_step``: one SGD step of the shared weights on a training batch (that architecture only).
3. ``after_step``: once the first ``rl_warmup`` (25%) of the stage is over, the controller samples
   another architecture, measures its accuracy Q on a batch of the held-out split of the training
   data (never the validation set) and its cost T, and takes one REINFORCE step on
   ``Q + beta * |T / T0 - 1|``.

Stages: *coarse* searches stem width, stage depths and filters with every block an IB (expansion 4,
3x3 DW); *fine* keeps those and searches each UIB's start / middle DW (and MQA slots in hybrid
spaces; the expansion too with ``fine_expand``), continuing to train the same shared weights.
``one_stage`` searches everything jointly for the same total number of steps. The result is the controller's most likely
architecture, moved to the most likely sampled one within ``cost_tolerance`` of the target when it
misses it.

Reproducible and resumable: architectures are drawn from generators seeded by (seed, step), data
order and augmentation by (seed, epoch, index), so a resumed search replays the same steps. Under
torchrun each process trains on its share of the global batch, every process samples the same
architectures and the reward's correct counts are summed over processes, so all controllers agree.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset

from ..data.transforms import eval_transform
from ..errors import InvalidValue, MNv4Error
from ..train.checkpoint import LAST
from ..train.distributed import all_reduce_sum
from ..train.runs import plain, resumed_fields, stop_line
from ..train.trainer import Trainer
from ..weights.checkpoint import save_model
from ..weights.io import write_safetensors
from .controller import Controller, absolute_reward
from .cost import CostModel, LatencyTable, get_cost_model
from .report import SPEC, SearchResult, write_report
from .requests import RESUME_MAY_CHANGE, SearchConfig
from .space import Arch, SearchSpace, get_space
from .supernet import SuperNet

__all__ = [
    "SearchConfig",
    "SearchResult",
    "SearchStopped",
    "SuperNetTrainer",
    "HeldOutSet",
    "subnet_accuracy",
    "STATE",
    "SPEC",
]

STATE = LAST  # the trainer's last.pt, with the controller and history in its extra state
SUBNET = "subnet.safetensors"
SUPERNET = "supernet.safetensors"


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
class SearchStopped:
    """What a search stopped before its end returns (``max_steps``, Ctrl-C, SIGTERM): where it stopped and
    why (``stop_reason`` as in :class:`mnv4.train.trainer.TrainResult`); ``search(..., resume=True)``
    continues it from ``output``."""

    output: Path
    step: int
    total_steps: int
    stop_reason: str | None


class HeldOutSet(Dataset):
    """Images of a split as (image tensor, label) for forward-only passes, decoded once and kept in
    memory when they fit in ``max_bytes``. Unreadable images are left out of every batch."""

    def __init__(self, ds: Dataset, transform: Callable, max_bytes: int = 256 << 20) -> None:
        self.ds, self.transform = ds, transform
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None
        first = next((x for x, y in (self._load(i) for i in range(min(len(ds), 32))) if y >= 0), None)
        if first is not None and first.numel() * 4 * len(ds) <= max_bytes:
            items = [self._load(i) for i in range(len(ds))]
            xs = [x if y >= 0 else torch.zeros_like(first) for x, y in items]
            self.cache = torch.stack(xs), torch.tensor([y for _, y in items])

    def _load(self, i: int) -> tuple[torch.Tensor, int]:
        from ..data.images import BadImage

        im, y = self.ds[i]
        if isinstance(im, BadImage):
            return torch.zeros(0), -1
        return self.transform(im), int(y)

    def __len__(self) -> int:
        return len(self.ds)

    def batch(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None:
            x, y = self.cache[0][torch.tensor(idx)], self.cache[1][torch.tensor(idx)]
            keep = y >= 0
            return x[keep], y[keep]
        items = [self._load(i) for i in idx]
        items = [(x, y) for x, y in items if y >= 0]
        if not items:
            return torch.zeros(0), torch.zeros(0, dtype=torch.long)
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _gen(*keys: int) -> torch.Generator:
    from ..data.sampling import sample_seed

    return torch.Generator().manual_seed(sample_seed(*keys))


def _split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    perm = torch.randperm(n, generator=_gen(seed, 0x5E1)).tolist()
    k = max(1, int(round(n * fraction)))
    return sorted(perm[k:]), sorted(perm[:k])


class SuperNetTrainer(Trainer):
    """The super-network phase of the search as a :class:`~mnv4.train.trainer.Trainer`: the base class
    runs the steps, DDP, checkpoints, resume and stop requests; the hooks sample the architecture of
    each step (``before_step``), train the controller (``after_step``), evaluate the current best
    architecture at epoch ends, and write the search result at the end (``finish``).

    ``data.train`` is the part of the training data the weights learn from, ``data.val`` the held-out
    part the reward is measured on (the dataset's own validation images are not used)."""

    command = "mnv4 search"

    def __init__(self, scfg: SearchConfig, data, cost_model: CostModel, progress=None, log=None) -> None:
        super().__init__(scfg.train_config(), data=data, progress=progress, log=log)
        self.scfg = scfg
        self.space: SearchSpace = get_space(scfg.space)
        self.cost_model = cost_model
        self.target = scfg.resolve_target(cost_model)
        self.history: list[dict[str, Any]] = []
        self.stage_results: dict[str, Arch] = {}
        self.controller: Controller | None = None
        self.stage_index = -1
        self._costs: dict[tuple, float] = {}
        self.result: SearchResult | None = None

    # -- Trainer hooks --------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from ..models.registry import Preprocess

        net = SuperNet(self.space, len(self.data.class_names))
        res = self.scfg.resolution or self.data.input_size or 224
        if self.data.input_size is not None:  # small-image sets: no centre crop (as the trainer does)
            net.preprocess = Preprocess(input_size=res, crop_pct=1.0, interpolation="bilinear")
        else:
            net.preprocess = Preprocess(input_size=res)
        net.class_names = list(self.data.class_names)
        self.raw_preprocess = net.preprocess
        self._prepare_search()
        return net

    def wrap_distributed(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device = self.info.device
        # Each step leaves the DW ops and blocks its architecture does not run without gradients.
        return DistributedDataParallel(
            model,
            device_ids=[device] if device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=True,
        )

    def setup(self, resume=None) -> None:
        super().setup(resume)
        if self.step == 0:
            self.say(
                f"searching space {self.space.name} ({self.space.num_architectures():.3g} architectures) for "
                f"{self.cost_model.describe()} target {self.target:g}: {len(self.stages)} stage(s), "
                f"{self.plan.total_steps} steps; reward on {len(self.data.val)} held-out training images"
            )

    def _prepare_search(self) -> None:
        """Stages and held-out sets; called from build_model, once the base class has planned the
        run and before it restores a checkpoint (whose controller needs the stages)."""
        cfg = self.scfg
        pp = self.raw_preprocess
        self.resolution = pp.input_size
        self.num_classes = len(self.data.class_names)
        self.reward_set = HeldOutSet(self.data.val, eval_transform(pp))
        images = self.calib_images()
        calib = Subset(images, range(min(len(images), cfg.calib_batches * cfg.batch_size)))
        self.calib_set = HeldOutSet(calib, eval_transform(pp))
        total = self.plan.total_steps
        if cfg.one_stage:
            self.stages = [StagePlan("joint", 0, total)]
        else:
            coarse = max(1, int(round(cfg.coarse_fraction * total)))
            if coarse >= total:
                raise InvalidValue("epochs", cfg.epochs, f"gives {total} step(s), too few for two stages; raise it")
            self.stages = [StagePlan("coarse", 0, coarse), StagePlan("fine", coarse, total - coarse)]

    def calib_images(self) -> Dataset:
        """Labelled (PIL image, label) items whose images recalibrate BatchNorm for a sub-network."""
        return self.data.train

    def before_step(self, step: int) -> None:
        self._enter_stage(self.stage_at(step))
        arch = self.space.canonical(self.controller.sample(_gen(self.cfg.seed, step, 1)))
        self.raw.set_arch(arch)

    def after_step(self, step: int, loss: float) -> None:
        step -= 1  # the base class reports the step count after the update; rows use the step index
        stage = self.stages[self.stage_index]
        row: dict[str, Any] = {"step": step, "stage": stage.name, "loss": loss}
        if step >= stage.rl_start(self.scfg.rl_warmup):
            rl_arch = self.space.canonical(self.controller.sample(_gen(self.cfg.seed, step, 3)))
            q = self.reward_quality(rl_arch, step)
            cost = self.arch_cost(rl_arch)
            reward = absolute_reward(q, cost, self.target, self.scfg.beta)
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

    def evaluate_and_select(self, epoch: int, row: dict[str, Any]) -> None:
        """Epoch end: the controller's most likely architecture, its cost and held-out accuracy."""
        best = self.space.canonical(self.controller.argmax())
        acc, top5, loss = self.evaluate_arch(best, full=True)
        rows = [r for r in self.history if r["step"] >= self.step - self.plan.steps_per_epoch]
        rl = [r for r in rows if "reward" in r]
        row.update(
            stage=self.stages[self.stage_index].name,
            val_top1=acc,  # the argmax architecture on the held-out split, BN recalibrated
            val_top5=top5,
            val_loss=loss,
            argmax_cost=self.arch_cost(best),
            entropy=self.controller.entropy(),
            mean_quality=sum(r["quality"] for r in rl) / len(rl) if rl else "",
            mean_cost=sum(r["cost"] for r in rl) / len(rl) if rl else "",
            mean_reward=sum(r["reward"] for r in rl) / len(rl) if rl else "",
        )
        self.say(
            f"  stage {row['stage']}: controller entropy {row['entropy']:.2f} nats, most likely architecture "
            f"{self.space.to_string(best)} ({row['argmax_cost']:.4g} {self.cost_model.unit}, "
            f"{acc:.2f}% held-out)"
        )

    def extra_state(self) -> dict[str, Any]:
        return {
            "search_config": plain(self.scfg.to_dict()),
            "stage_index": self.stage_index,
            "stage_results": json.dumps(self.stage_results),
            "controller": self.controller.state_dict() if self.controller else None,
            "history": json.dumps(self.history),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("search_config")
        if saved is None:
            raise MNv4Error("this checkpoint is not from a search; resume it with `mnv4 train`")
        now = self.scfg.to_dict()
        resumed_fields(saved, now, RESUME_MAY_CHANGE, "search")  # refuses any other change
        self.stage_results = json.loads(state["stage_results"])
        self.history = json.loads(state["history"])
        if state["controller"] is not None:
            self.stage_index = -1
            self._enter_stage(int(state["stage_index"]), quiet=True)
            self.controller.load_state_dict(state["controller"])

    # -- stages ---------------------------------------------------------------------------------
    def _controller_for(self, stage: StagePlan) -> Controller:
        cfg = self.scfg
        if stage.name == "coarse":
            fixed = self.space.coarse_fixed()
        elif stage.name == "fine":
            fixed = self.space.fine_fixed(self.stage_results["coarse"], self.scfg.fine_expand)
        else:
            fixed = {}
        updates = max(1, stage.end - stage.rl_start(cfg.rl_warmup))
        lr = cfg.controller_lr or min(0.1, max(1e-3, 15.0 / updates))
        return Controller(self.space.decisions, lr, cfg.baseline_momentum, fixed)

    def _enter_stage(self, index: int, quiet: bool = False) -> None:
        if index == self.stage_index:
            return
        if self.controller is not None and self.stage_index >= 0:
            # The next stage keeps this stage's filters and depths, so this stage's result must already meet
            # the target: the argmax, or the most likely sampled architecture within cost_tolerance (pick()).
            self.stage_results[self.stages[self.stage_index].name] = self.pick()[0]
        self.stage_index = index
        stage = self.stages[index]
        self.controller = self._controller_for(stage)
        if not quiet:
            self.say(
                f"stage {stage.name}: steps {stage.start}-{stage.end}, {len(self.controller.decisions)} decisions, "
                f"controller frozen until step {stage.rl_start(self.scfg.rl_warmup)}, "
                f"controller LR {self.controller.lr:.3g}"
            )

    def stage_at(self, step: int) -> int:
        return next(i for i, s in enumerate(self.stages) if step < s.end)

    # -- reward and evaluation ------------------------------------------------------------------
    def arch_cost(self, arch: Arch) -> float:
        key = tuple(sorted(self.space.canonical(arch).items()))
        if key not in self._costs:
            self._costs[key] = self.cost_model.cost(self.space.to_spec(arch))
        return self._costs[key]

    @torch.no_grad()
    def reward_quality(self, arch: Arch, step: int) -> float:
        """Accuracy of ``arch`` on one held-out batch (batch statistics, like the training pass)."""
        cfg = self.scfg
        n = min(cfg.reward_batch or cfg.batch_size, len(self.reward_set))
        idx = torch.randperm(len(self.reward_set), generator=_gen(cfg.seed, step, 2))[:n].tolist()
        # Contiguous shares, run in micro-batches: one process with accumulation sees exactly the
        # batches (and BatchNorm statistics) that the processes of a torchrun job see.
        world, rank = self.info.world_size, self.info.rank
        share = idx[rank * n // world : (rank + 1) * n // world]
        correct = total = 0.0
        self.raw.train()
        micro = self.plan.micro_batch
        for i in range(0, len(share), micro):
            x, y = self.reward_set.batch(share[i : i + micro])
            if len(y) > 1:  # BatchNorm needs two samples
                logits = self.raw(x.to(self.info.device), arch)
                correct += float((logits.argmax(1).cpu() == y).sum())
                total += float(len(y))
        correct, total = all_reduce_sum([correct, total], self.info)
        return correct / max(total, 1.0)

    def evaluate_arch(self, arch: Arch, full: bool = False) -> Any:
        """Held-out top-1 (%) of ``arch`` with BN statistics recalibrated for it; ``full`` returns
        (top-1, top-5, loss)."""
        res = subnet_accuracy(self.raw, arch, self.calib_set, self.reward_set, self.scfg.batch_size, self.info.device)
        self.raw.train()
        return res if full else res[0]

    # -- the result -----------------------------------------------------------------------------
    def pick(self) -> tuple[Arch, dict[str, Any]]:
        """The final architecture: the controller's argmax, or, when that misses the target by more
        than ``cost_tolerance``, the most likely of 2000 sampled architectures that meets it."""
        best = self.space.canonical(self.controller.argmax())
        cost = self.arch_cost(best)
        info = {"argmax": self.space.to_string(best), "argmax_cost": cost, "projected": False}
        tol = self.scfg.cost_tolerance
        if abs(cost / self.target - 1) <= tol:
            return best, info
        g = _gen(self.cfg.seed, 0xF1A1)
        seen: dict[tuple, tuple[float, Arch]] = {}
        for _ in range(2000):
            a = self.space.canonical(self.controller.sample(g))
            key = tuple(sorted(a.items()))
            if key not in seen:
                with torch.no_grad():
                    seen[key] = (float(self.controller.log_prob(a, self.space.active(a))), a)
        inside = [(lp, a) for lp, a in seen.values() if abs(self.arch_cost(a) / self.target - 1) <= tol]
        if inside:
            _, a = max(inside, key=lambda t: t[0])
            info["projected"] = True
            return a, info
        return best, info

    def finish(self):
        if self.stop_reason is not None:
            self.say(
                stop_line(self.step, self.plan.total_steps, self.stop_reason, self.run_dir / LAST, self.resume_command)
            )
            return super_finish_stopped(self)
        self.stage_results[self.stages[self.stage_index].name] = self.space.canonical(self.controller.argmax())
        arch, pick_info = self.pick()
        spec = self.space.to_spec(arch, name=f"nas_{self.space.name}_{self.cost_model.name}")
        result = SearchResult(self.run_dir, arch, spec, self.arch_cost(arch), self.target, self.cost_model.unit)
        if self.info.is_main:
            subnets = []
            g, rng = _gen(self.cfg.seed, 0x5CA7), _rng(self.cfg.seed, 0x5CA7)
            candidates = [("found", arch)]
            candidates += [
                ("policy", self.space.canonical(self.controller.sample(g))) for _ in range(self.scfg.eval_subnets)
            ]
            candidates += [("uniform", self.space.sample(rng)) for _ in range(self.scfg.eval_subnets)]
            for kind, a in candidates:
                subnets.append(
                    {
                        "kind": kind,
                        "arch": self.space.to_string(a),
                        "cost": self.arch_cost(a),
                        "accuracy": self.evaluate_arch(a),
                    }
                )
            # The found architecture with the super-network's weights and its own BN statistics: a warm start.
            self.evaluate_arch(arch)
            subnet = self.raw.extract(arch, spec.name)
            subnet.preprocess, subnet.class_names = self.raw.preprocess, list(self.data.class_names)
            save_model(subnet, self.run_dir / SUBNET, extra={"source": "nas super-network"})
            write_safetensors(
                self.run_dir / SUPERNET,
                self.raw.state_dict(),
                {"format": "mnv4-supernet", "space": self.space.to_dict()},
            )
            wall = self.wall_before + time.perf_counter() - self.t_start
            result.report = write_report(self, result, pick_info, subnets, wall)
            self.say(
                f"found {result.report['compact']}: {result.cost:.4g} {result.unit} for target {self.target:g} "
                f"({100 * result.report['cost_error']:+.1f}%); spec {self.run_dir / SPEC}"
            )
        if self.info.distributed:
            dist.barrier()
        self.result = result
        return result


def super_finish_stopped(trainer: Trainer) -> SearchStopped:
    """What a stopped search returns: where and why it stopped (``resume`` continues it)."""
    if trainer.info.distributed:
        dist.barrier()
    return SearchStopped(trainer.run_dir, trainer.step, trainer.plan.total_steps, trainer.stop_reason)


@torch.no_grad()
def subnet_accuracy(
    net: SuperNet,
    arch: Arch,
    calib: HeldOutSet,
    data: HeldOutSet,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> tuple[float, float, float]:
    """(top-1 %, top-5 %, loss) of ``arch`` run by the super-network on ``data``, after recalibrating
    its BN statistics on the images of ``calib`` (see :meth:`SuperNet.calibrate_bn`)."""
    import torch.nn.functional as F

    n = len(calib)
    batches = (calib.batch(list(range(i, min(n, i + batch_size))))[0] for i in range(0, n, batch_size))
    net.calibrate_bn(arch, (b.to(device) for b in batches if len(b) > 1))
    net.eval()
    top1 = top5 = loss = 0.0
    total = 0
    for i in range(0, len(data), 256):
        x, y = data.batch(list(range(i, min(len(data), i + 256))))
        logits = net(x.to(device), arch).float().cpu()
        hit = logits.topk(min(5, logits.shape[1]), 1).indices == y[:, None]
        top1 += float(hit[:, 0].sum())
        top5 += float(hit.any(1).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        total += len(y)
    total = max(total, 1)
    return 100.0 * top1 / total, 100.0 * top5 / total, loss / total


def _rng(*keys: int):
    import random

    from ..data.sampling import sample_seed

    return random.Random(sample_seed(*keys))


def cost_range(space: SearchSpace, cost_model: CostModel) -> tuple[float, float]:
    """About the cheapest and dearest cost of ``space``'s architectures: those with the smallest and the largest
    choice of every numeric decision (depth, filters, expansion, kernel sizes with 0 = no layer, attention)."""

    def extreme(pick) -> Arch:
        return space.canonical(
            {d.name: pick(d.choices) if all(map(_is_number, d.choices)) else d.choices[0] for d in space.decisions}
        )

    lo, hi = (cost_model.cost(space.to_spec(extreme(pick))) for pick in (min, max))
    return min(lo, hi), max(lo, hi)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_reachable(cfg: SearchConfig, cost_model: CostModel) -> None:
    """Refuse a target no architecture of the space can meet, before any training: the search would end
    hours later with a spec far from it."""
    target = cfg.resolve_target(cost_model)
    lo, hi = cost_range(get_space(cfg.space), cost_model)
    tol = cfg.cost_tolerance
    if target < lo * (1 - tol) or target > hi * (1 + tol):
        unit = cost_model.unit
        raise MNv4Error(
            f"the target {target:.4g} {unit} is out of reach: space {cfg.space} costs about {lo:.3g} to {hi:.3g} "
            f"{unit} on {cost_model.describe()}; choose a target in that range, or another `space` or `hardware`, "
            "or another input size"
        )


def _cost_model(cfg: SearchConfig, resolution: int, num_classes: int, info, progress, log) -> CostModel:
    cm = get_cost_model(cfg.hardware, resolution, num_classes, cfg.target_kind, cfg.latency_table, cfg.threads)
    if not isinstance(cm, LatencyTable):
        return cm
    say = log or print
    # One table for all processes: rank 0 measures, the others read its file.
    if info.is_main:
        space = get_space(cfg.space)
        n = cm.build(space, progress=progress)
        if n or not cm.overhead_fitted:
            fit = cm.fit_overhead([space.to_spec(space.sample(_rng(cfg.seed, i)), f"probe{i}") for i in range(3)])
            say(
                f"latency table {cm.path}: measured {n} new segment(s), {len(cm)} in all; per-call overhead "
                f"{fit['overhead_ms']:.3f} ms"
            )
    if info.distributed:
        dist.barrier()
        cm = get_cost_model(cfg.hardware, resolution, num_classes, cfg.target_kind, cm.path, cfg.threads)
    return cm
