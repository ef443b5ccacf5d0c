"""What ``mnv4 search`` is asked to do: :class:`SearchConfig`, the one home of the search's defaults.

Its :func:`mnv4.requests.option` fields become the command's flags (:func:`mnv4.cli.args.add_request_flags`,
with ``given_only``: a resume must tell a flag given from one left out), their help naming the field's
default. Nothing here imports torch: the CLI builds its parser from this record at start-up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InvalidValue, MNv4Error, check_float, check_int
from ..perf.hardware import BUILTIN_PROFILES
from ..requests import option

if TYPE_CHECKING:
    from ..train.config import TrainConfig

__all__ = ["SearchConfig", "HARDWARE_CHOICES", "RESUME_MAY_CHANGE"]

# A MAC count, a latency table measured here, or a built-in roofline profile (mnv4.perf.hardware).
HARDWARE_CHOICES = ("macs", "local", *BUILTIN_PROFILES)
# What a resumed search may change: where and how it runs, not what it searches.
RESUME_MAY_CHANGE = ("output", "workers", "device", "save_every_steps")
# The fields the super-network's training run (a TrainConfig) takes from the search as they are.
_TRAIN_FIELDS = (
    "data", "output", "epochs", "batch_size", "micro_batch", "lr", "warmup_epochs", "weight_decay", "label_smoothing",
    "crop_scale", "hflip", "seed", "workers", "device", "save_every_steps",
)  # fmt: skip


@dataclass(frozen=True)
class SearchConfig:
    """Everything a search needs. Fields with help are ``mnv4 search`` flags; ``data``, ``output``,
    ``resolution`` (``--input-size``), ``batch_size``, ``workers``, ``device``, ``distill`` and ``mix``
    take the shared flags (docs/cli.md)."""

    data: str
    output: str | None = None
    space: str = option(
        "s",
        # the presets are mnv4.nas.space.SPACES (torch; tests/test_requests.py checks this list against it)
        "search space: a preset, s | m | l | m_hybrid | extended (--show-space prints it), or a .json/.yaml file",
        metavar="SPACE",
    )
    hardware: str = option(
        "pixel8_edgetpu",
        f"cost model: {' | '.join(BUILTIN_PROFILES)} (roofline), local (a latency table measured here), macs, "
        "or a PROFILE.yaml from `mnv4 roofline calibrate`",
        metavar="HW",
    )
    target_ms: float | None = option(None, "latency target", kind=float, metavar="MS")
    target_macs: float | None = option(None, "millions of MACs", kind=float, metavar="M")
    target_like: str | None = option(
        None, "the cost of a registered model, e.g. mnv4_conv_small", kind=str, metavar="MODEL"
    )
    resolution: int | None = None  # None: the dataset's natural size (32 for CIFAR), else 224
    epochs: float = option(10.0, "super-network epochs over the training data, both stages together")
    one_stage: bool = option(False, "search all decisions jointly (paper Tab. 4 ablation)")
    fine_expand: bool = option(False, "the fine stage also searches expansions (paper: fixed at 4)")
    coarse_fraction: float = option(0.5, "share of the steps the coarse (filters, depth) stage gets")
    batch_size: int = 64
    micro_batch: int | None = option(None, "per-process batch that fits in memory; the rest is accumulated", kind=int)
    lr: float = option(2e-3, "peak LR of the shared weights (AdamW, warm-up + cosine)")
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0  # LR warm-up of the shared weights
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.35, 1.0)
    hflip: float = 0.5
    rl_warmup: float = option(0.25, "fraction of each stage before the controller starts learning")
    beta: float = option(-0.10, "cost weight of the reward Q + beta*|T/T0 - 1| (negative)")
    controller_lr: float | None = option(
        None, "Adam LR of the controller (default: 15 / its updates, within [1e-3, 0.1])", kind=float
    )
    baseline_momentum: float = 0.95
    reward_split: float = option(0.2, "held-out fraction of the training data the reward uses")
    reward_batch: int | None = None  # None: batch_size
    cost_tolerance: float = option(0.10, "accepted relative distance of the result from the target")
    eval_subnets: int = option(12, "sub-networks of each kind evaluated for the scatter plot")
    calib_batches: int = 4
    seed: int = option(0, "seed of weights, data order, augmentation and architecture samples")
    workers: int = 0
    device: str = "auto"
    threads: int = option(1, "CPU threads of latency measurements (local table, measured latency)")
    latency_table: str | None = option(
        None,
        "file caching the measured latency table (--hardware local; default ~/.cache/mnv4/latency)",
        kind=str,
        metavar="FILE",
    )
    distill: tuple[str, ...] = ()  # soft-label datasets the shared weights learn from (mnv4.nas.soft_labels)
    mix: str | None = None  # their mixing ratio, as for a distilled student (None: equal shares)
    save_every_steps: int = option(200, "checkpoint every N steps (and at epoch ends)")

    def validated(self) -> SearchConfig:
        given = [t for t in (self.target_ms, self.target_macs, self.target_like) if t is not None]
        if len(given) != 1:
            raise MNv4Error("give exactly one target: `target_ms`, `target_macs` or `target_like`")
        if self.target_like is not None:
            from ..models.registry import get_entry

            get_entry(self.target_like)  # an unknown name fails here, with the list of models
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
        check_int("seed", self.seed, 0)
        check_int("threads", self.threads, 1)
        check_int("save_every_steps", self.save_every_steps, 0)
        if self.resolution is not None:
            check_int("resolution", self.resolution, 16)
        if self.reward_batch is not None:
            check_int("reward_batch", self.reward_batch, 1)
        if self.mix is not None and not self.distill:
            raise InvalidValue("mix", self.mix, "it mixes soft-label datasets; give them with `distill`")
        if self.distill:
            from ..data.sampling import parse_mix

            parse_mix(self.mix, len(self.distill))  # a bad ratio fails before any data is read
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

    def train_config(self) -> TrainConfig:
        """The super-network's training run: the `quick` recipe with this search's settings."""
        from ..train.config import resolve_config

        shared = {name: getattr(self, name) for name in _TRAIN_FIELDS}
        return resolve_config("quick", model=None, lr_scaling="none", dropout=0.0, input_size=self.resolution, **shared)

    @property
    def target_kind(self) -> str:
        if self.target_like is not None:
            return "macs" if self.hardware == "macs" else "ms"
        return "macs" if self.target_macs is not None else "ms"

    def resolve_target(self, cost_model: Any) -> float:
        """T0 in the cost model's unit (a :class:`mnv4.nas.cost.CostModel`, not imported here: cost imports this
        module): the given number, or the cost of ``target_like`` on it."""
        if self.target_like is not None:
            from ..models.registry import get_entry

            return float(cost_model.cost(get_entry(self.target_like).spec))
        return float(self.target_macs if self.target_macs is not None else self.target_ms)
