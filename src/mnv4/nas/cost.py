"""Cost models for the search: the T of the reward (docs/nas.md).

A model is cut into *segments*: the stem, each block, and the head (960 conv, pool, 1280 conv,
classifier). A segment's cost depends only on its signature (block, input width, input size,
activation), so every cost model caches per signature and a model's cost is the sum over its
segments. That is exact for MAC counts and for the roofline (both are sums over layers, docs/deploy.md "mnv4 roofline")
and the classic latency-lookup-table approximation for measured latency.

* :class:`MacsCost` counts MACs (millions) with :func:`mnv4.perf.profile`.
* :class:`RooflineCost` is the paper's roofline (Eq. 1) on any hardware profile: the built-in
  Pixel 6 CPU, S23 CPU, Pixel 4 DSP, Pixel 8 EdgeTPU ridge points, or a calibrated YAML/JSON file.
* :class:`LatencyTable` measures each segment on this machine with the paper's protocol (mean of
  N runs, median of 5 repeats, batch 1, fixed threads), caches the table on disk, and adds the
  per-call overhead that segment timings miss, fitted once against whole-model latencies.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import MNv4Error, check_choice, check_int
from ..host import cpu_description
from ..models.blocks import ConvBN, init_weights
from ..models.mobilenetv4 import _build_block
from ..models.specs import AttentionSpec, BlockSpec, ModelSpec, UIBSpec, cn, fib, uib
from ..threads import torch_threads
from .compact import block_token
from .requests import HARDWARE_CHOICES
from .space import SearchSpace

__all__ = [
    "Segment",
    "segments",
    "CostModel",
    "MacsCost",
    "RooflineCost",
    "LatencyTable",
    "get_cost_model",
    "measure_model_ms",
    "time_ms",
    "HARDWARE_CHOICES",
]


def _down(n: int) -> int:
    """Output size of every stride-2 conv in MNv4 ('same' padding, odd kernels): ceil(n / 2)."""
    return (n + 1) // 2


@dataclass(frozen=True)
class Segment:
    """A piece of a model whose cost depends only on ``key``."""

    key: str
    kind: str  # stem | block | head
    block: BlockSpec | None
    in_chs: int
    hw: tuple[int, int]  # input height, width
    act: str
    layer_scale_init: float | None = None
    head: tuple[int, int, int] | None = None  # (num_features, head_hidden_size, num_classes)

    def build(self) -> nn.Module:
        """A randomly initialised module that computes this segment as MobileNetV4's eval forward does."""
        if self.kind == "head":
            nf, hh, nc = self.head
            return _HeadSegment(self.in_chs, nf, hh, nc, self.act)
        m = _build_block(self.block, self.in_chs, self.act, 1, self.layer_scale_init, 0.0, {})
        init_weights(m)
        return _StemSegment(m) if self.kind == "stem" else m


class _StemSegment(nn.Module):
    """The stem plus the channels_last conversion MobileNetV4's CPU eval path does on entry."""

    def __init__(self, stem: nn.Module) -> None:
        super().__init__()
        self.stem = stem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.stem(x)


class _HeadSegment(nn.Module):
    """960 conv, the layout restore of the CPU eval path, pool, 1280 conv, classifier."""

    def __init__(self, in_chs: int, nf: int, hh: int, num_classes: int, act: str) -> None:
        super().__init__()
        self.final_conv = ConvBN(in_chs, nf, 1, act=act)
        self.head_conv = ConvBN(nf, hh, 1, act=act)
        self.classifier = nn.Linear(hh, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final_conv(x).contiguous()
        return self.classifier(self.head_conv(x.mean((2, 3), keepdim=True)).flatten(1))


def _block_segment(b: BlockSpec, in_chs: int, hw: tuple[int, int], act: str, ls: float | None, kind="block"):
    ls_used = ls if isinstance(b, (UIBSpec, AttentionSpec)) else None
    key = f"{kind}:{block_token(b)}|in{in_chs}|{hw[0]}x{hw[1]}|{act}" + (f"|ls{ls_used:g}" if ls_used else "")
    return Segment(key, kind, b, in_chs, hw, act, ls_used)


def _head_segment(in_chs: int, hw: tuple[int, int], act: str, nf: int, hh: int, nc: int) -> Segment:
    key = f"head:in{in_chs}|{hw[0]}x{hw[1]}|{act}|{nf}-{hh}-{nc}"
    return Segment(key, "head", None, in_chs, hw, act, None, (nf, hh, nc))


def segments(spec: ModelSpec, resolution: int | tuple[int, int], num_classes: int = 1000) -> list[Segment]:
    """The stem, every block and the head of ``spec`` at ``resolution``, with their input shapes."""
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    out = [_block_segment(spec.stem, 3, (h, w), spec.act, None, "stem")]
    h, w = (_down(h), _down(w)) if spec.stem.stride == 2 else (h, w)
    chs = spec.stem.out
    for b in spec.blocks:
        out.append(_block_segment(b, chs, (h, w), spec.act, spec.layer_scale_init))
        if b.stride == 2:
            h, w = _down(h), _down(w)
        if not isinstance(b, AttentionSpec):
            chs = b.out
    out.append(_head_segment(chs, (h, w), spec.act, spec.num_features, spec.head_hidden_size, num_classes))
    return out


def space_segments(space: SearchSpace, resolution: int, num_classes: int) -> list[Segment]:
    """Every segment any architecture of ``space`` can contain (what a full latency table holds)."""
    act, ls = space.act, space.layer_scale_init
    found: dict[str, Segment] = {}

    def add(seg: Segment) -> None:
        found.setdefault(seg.key, seg)

    hw = (resolution, resolution)
    for s in space.stem:
        add(_block_segment(cn(3, 2, s), 3, hw, act, None, "stem"))
    hw = (_down(resolution), _down(resolution))
    prev = list(space.stem)
    for st in space.stages:
        out_hw = (_down(hw[0]), _down(hw[1]))
        for p in prev:
            for f in st.filters:
                if "fused_ib" in st.first:
                    for e in st.fused_expand:
                        add(_block_segment(fib(space.fused_kernel, 2, f, e), p, hw, act, ls))
                if "conv2" in st.first:
                    from ..models.blocks import make_divisible

                    for e in st.fused_expand:
                        mid = make_divisible(p * e)
                        add(_block_segment(cn(space.fused_kernel, 2, mid), p, hw, act, ls))
                        add(_block_segment(cn(1, 1, f), mid, out_hw, act, ls))
                if "uib" in st.first:
                    for s0 in st.start_dw:
                        for m0 in st.strided_mid:
                            for e in st.expand:
                                add(_block_segment(uib(s0, m0, 2, f, e), p, hw, act, ls))
        for f in st.filters:
            if st.max_depth > 1:
                for s0 in st.start_dw:
                    for m0 in st.mid_dw:
                        for e in st.expand:
                            add(_block_segment(uib(s0, m0, 1, f, e), f, out_hw, act, ls))
            if st.mqa is not None:
                add(_block_segment(st.mqa, f, out_hw, act, ls))
        prev, hw = list(st.filters), out_hw
    for p in prev:
        add(_head_segment(p, hw, act, space.num_features, space.head_hidden_size, num_classes))
    return list(found.values())


class CostModel:
    """Sum of cached per-segment costs. Subclasses implement :meth:`_measure`."""

    name = "cost"
    unit = ""

    def __init__(self, resolution: int, num_classes: int = 1000) -> None:
        self.resolution = check_int("resolution", resolution, 8)
        self.num_classes = check_int("num_classes", num_classes, 1)
        self._cache: dict[str, float] = {}

    def _measure(self, seg: Segment) -> float:
        raise NotImplementedError

    def segment_cost(self, seg: Segment) -> float:
        if seg.key not in self._cache:
            self._cache[seg.key] = float(self._measure(seg))
        return self._cache[seg.key]

    def overhead(self) -> float:
        return 0.0

    def breakdown(self, spec: ModelSpec) -> list[tuple[Segment, float]]:
        return [(s, self.segment_cost(s)) for s in segments(spec, self.resolution, self.num_classes)]

    def cost(self, spec: ModelSpec) -> float:
        return sum(c for _, c in self.breakdown(spec)) + self.overhead()

    def describe(self) -> str:
        return f"{self.name} ({self.unit}) at {self.resolution} px"


class MacsCost(CostModel):
    """Multiply-accumulates in millions (``mnv4.perf.profile``)."""

    name = "macs"
    unit = "MMACs"

    def _measure(self, seg: Segment) -> float:
        from ..perf import profile

        return profile(seg.build(), seg.hw).macs / 1e6


class RooflineCost(CostModel):
    """The paper's roofline latency in ms on ``hardware`` (a built-in name, file or profile)."""

    unit = "ms"

    def __init__(self, hardware: Any, resolution: int, num_classes: int = 1000) -> None:
        from ..perf.hardware import get_profile

        super().__init__(resolution, num_classes)
        self.hardware = get_profile(hardware)
        self.name = self.hardware.name

    def _measure(self, seg: Segment) -> float:
        from ..perf import profile
        from ..perf.roofline import predict_latency

        return predict_latency(profile(seg.build(), seg.hw, dtype=self.hardware.dtype), self.hardware).latency_ms


def default_cache_dir() -> Path:
    return Path(os.environ.get("MNV4_CACHE", Path.home() / ".cache" / "mnv4")) / "latency"


class LatencyTable(CostModel):
    """Measured per-segment latency (ms) of this machine, cached on disk.

    Protocol (docs/deploy.md "mnv4 bench", scaled down): batch 1, eval mode, ``threads`` intra-op threads, for each
    segment the mean over up to ``runs`` calls (each repeat stops after ``budget_s``), median of
    ``repeats``. ``clock="thread"`` (the default with one thread) times the calling thread's CPU
    time instead of the wall clock: on a shared machine other processes' load inflates wall-clock
    timings by tens of percent while the CPU time the model itself needs stays put; on an idle
    machine the two agree. Segment timings miss the cost of calling the model itself;
    :meth:`fit_overhead` adds the median gap to whole-model timings, once. The file is keyed by a
    fingerprint of the CPU, torch version, threads, runtime, clock and protocol, so another machine
    (or protocol) never reuses it.
    """

    name = "local"
    unit = "ms"
    RUNTIMES = ("torch", "torch-fused")
    CLOCKS = ("thread", "wall")

    def __init__(
        self,
        resolution: int,
        num_classes: int = 1000,
        path: str | os.PathLike | None = None,
        threads: int = 1,
        runtime: str = "torch",
        runs: int = 200,
        repeats: int = 5,
        budget_s: float = 0.05,
        warmup: int = 10,
        clock: str | None = None,
        passes: int = 3,
    ) -> None:
        super().__init__(resolution, num_classes)
        self.threads = check_int("threads", threads, 1)
        self.runtime = check_choice("runtime", runtime, self.RUNTIMES)
        self.clock = check_choice("clock", clock or ("thread" if threads == 1 else "wall"), self.CLOCKS)
        if self.clock == "thread" and threads != 1:
            raise MNv4Error("`clock` thread measures one thread's CPU time; use it with `threads` 1")
        self.runs, self.repeats, self.budget_s, self.warmup = runs, repeats, budget_s, warmup
        self.passes = check_int("passes", passes, 1)
        self.fingerprint = {
            "cpu": cpu_description(),
            "torch": torch.__version__.split("+")[0],
            "threads": self.threads,
            "runtime": runtime,
            "clock": self.clock,
            "protocol": f"runs{runs}-repeats{repeats}-budget{budget_s}-warmup{warmup}-passes{passes}",
        }
        digest = hashlib.sha1(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:12]
        self.path = Path(path) if path is not None else default_cache_dir() / f"table-{digest}.json"
        self._overhead: float | None = None
        self._load()

    # -- the file -------------------------------------------------------------------------------
    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return  # a damaged cache is rebuilt, not trusted
        if data.get("fingerprint") != self.fingerprint:
            return
        self._cache.update({k: float(v) for k, v in data.get("entries", {}).items()})
        overhead = data.get("overhead_ms")
        self._overhead = float(overhead) if overhead is not None else None

    def save(self) -> Path:
        from ..files import atomic_write_json

        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"fingerprint": self.fingerprint, "overhead_ms": self._overhead, "entries": self._cache}
        return atomic_write_json(self.path, data)

    def __len__(self) -> int:
        return len(self._cache)

    # -- measuring ------------------------------------------------------------------------------
    def _time(self, module: nn.Module, x: torch.Tensor, prepared: bool = False, passes: int | None = None) -> float:
        """Median over ``passes`` of the protocol's figure (median of repeat means)."""
        from ..perf.latency import flush_denormals

        flush_denormals()  # random-init weights: keep x86's denormal slow path out of the table
        module = module.eval() if prepared else self._prepare(module.eval())

        def fn():
            with torch.inference_mode():
                return module(x)

        with torch_threads(self.threads):
            runs = [
                time_ms(fn, self.runs, self.repeats, self.warmup, self.budget_s, self.clock)
                for _ in range(passes or self.passes)
            ]
        return statistics.median(runs)

    def _prepare(self, module: nn.Module) -> nn.Module:
        if self.runtime == "torch":
            return module
        from ..deploy.cpu import optimize_for_cpu

        return optimize_for_cpu(nn.Sequential(module))

    def cost(self, spec: ModelSpec) -> float:
        before = len(self._cache)
        total = super().cost(spec)
        if len(self._cache) != before:
            self.save()  # segments outside the built space (e.g. a target model's) are measured once, then kept
        return total

    def _segment_input(self, seg: Segment) -> torch.Tensor:
        x = torch.randn(1, seg.in_chs, *seg.hw, generator=torch.Generator().manual_seed(0))
        if seg.kind != "stem":
            x = x.contiguous(memory_format=torch.channels_last)  # the layout blocks see in the model
        return x

    def _measure(self, seg: Segment, passes: int | None = None) -> float:
        return self._time(seg.build(), self._segment_input(seg), passes=passes)

    def measure_model(self, spec: ModelSpec) -> float:
        """Whole-model latency (ms) of ``spec`` with the table's protocol and runtime."""
        from ..models.mobilenetv4 import MobileNetV4

        torch.manual_seed(0)
        model = MobileNetV4(spec, num_classes=self.num_classes).eval()
        if self.runtime == "torch-fused":
            from ..deploy.cpu import optimize_for_cpu

            model = optimize_for_cpu(model)
        x = torch.randn(1, 3, self.resolution, self.resolution, generator=torch.Generator().manual_seed(0))
        return self._time(model, x, prepared=True)

    def build(self, space: SearchSpace, progress: bool | None = None) -> int:
        """Measure every segment ``space`` can contain that the table lacks; returns how many.

        Each of ``passes`` passes times every missing segment once, in a fresh random order, and a
        segment's entry is the median over the passes: a burst of load on the machine then spoils
        one sample of many segments rather than every sample of a few."""
        import random

        from tqdm import tqdm

        todo = [s for s in space_segments(space, self.resolution, self.num_classes) if s.key not in self._cache]
        if not todo:
            return 0
        samples: dict[str, list[float]] = {s.key: [] for s in todo}
        order = list(todo)
        rng = random.Random(0)
        disable = None if progress is None else not progress
        bar = tqdm(total=len(todo) * self.passes, desc="latency table", unit="seg", disable=disable)
        for _ in range(self.passes):
            rng.shuffle(order)
            for seg in order:
                samples[seg.key].append(self._measure(seg, passes=1))
                bar.update()
        bar.close()
        for key, values in samples.items():
            self._cache[key] = statistics.median(values)
        self.save()
        return len(todo)

    def overhead(self) -> float:
        return self._overhead or 0.0

    @property
    def overhead_fitted(self) -> bool:
        return self._overhead is not None

    def fit_overhead(self, specs: Sequence[ModelSpec]) -> dict[str, Any]:
        """Set the per-call overhead to the median (whole model - sum of segments) over ``specs``
        (negative when segment timings run slower than the model's own calls)."""
        gaps, rows = [], []
        for spec in specs:
            parts = sum(c for _, c in self.breakdown(spec))
            whole = self.measure_model(spec)
            gaps.append(whole - parts)
            rows.append({"model": spec.name, "segments_ms": parts, "measured_ms": whole})
        self._overhead = statistics.median(gaps) if gaps else 0.0
        self.save()
        return {"overhead_ms": self._overhead, "models": rows}

    def check(self, specs: Sequence[ModelSpec]) -> list[dict[str, float]]:
        """Predicted vs measured whole-model latency for ``specs`` (relative errors)."""
        rows = []
        for spec in specs:
            pred = self.cost(spec)
            meas = self.measure_model(spec)
            rows.append({"model": spec.name, "predicted_ms": pred, "measured_ms": meas, "error": pred / meas - 1})
        return rows


def time_ms(
    fn, runs: int = 200, repeats: int = 5, warmup: int = 10, budget_s: float | None = 0.05, clock: str = "wall"
) -> float:
    """Median ms of ``fn()`` by :func:`mnv4.perf.latency.measure_latency` with the table's defaults."""
    from ..perf.latency import measure_latency

    return measure_latency(fn, runs, repeats, warmup, budget_s, clock=clock).median_ms


def get_cost_model(
    hardware: str,
    resolution: int,
    num_classes: int = 1000,
    target: str = "ms",
    table_path: str | os.PathLike | None = None,
    threads: int = 1,
) -> CostModel:
    """The cost model a search optimises: ``target='macs'`` counts MACs whatever the hardware; for
    ``'ms'``, ``local`` is the measured table and anything else a roofline hardware profile."""
    if target == "macs" or hardware == "macs":
        return MacsCost(resolution, num_classes)
    if hardware == "local":
        return LatencyTable(resolution, num_classes, path=table_path, threads=threads)
    return RooflineCost(hardware, resolution, num_classes)


def measure_model_ms(spec: ModelSpec, resolution: int, num_classes: int = 1000, threads: int = 1) -> float:
    """This machine's eager-PyTorch batch-1 latency of ``spec`` with the latency table's protocol
    (thread CPU time with one thread, see :class:`LatencyTable`)."""
    table = LatencyTable(resolution, num_classes, threads=threads, runs=300, budget_s=0.5)
    return table.measure_model(spec)


def iter_specs(space: SearchSpace, archs: Iterable[dict]) -> Iterator[ModelSpec]:
    for i, a in enumerate(archs):
        yield space.to_spec(a, f"{space.name}_{i}")
