"""The paper's latency protocol (Appendix B; docs/deploy.md, `mnv4 bench`): warm up, take the mean of
N runs, report the median of R repeats.

The paper uses about 1000 runs and 5 repeats on one fast core. On a shared development machine a
large model at 1000 runs takes minutes, so each repeat may also stop at a time budget (but never
below ``min_runs``); the runs actually done are reported with the result.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..errors import check_float, check_int
from ..requests import option

__all__ = [
    "LatencyProtocol",
    "PAPER_PROTOCOL",
    "LatencyResult",
    "measure_latency",
    "alternating_rounds",
    "alternating_medians",
    "paired_difference",
    "paired_ratio",
    "set_threads",
    "flush_denormals",
]


@dataclass(frozen=True)
class LatencyProtocol:
    """How a latency is measured (the paper's Appendix B): the one home of these defaults, used by
    :func:`measure_latency`, ``mnv4 bench`` and ``mnv4 roofline calibrate``."""

    runs: int = option(1000, "runs per repeat (paper: ~1000)")
    repeats: int = option(5, "repeats; the median of their means is reported")
    warmup: int = option(20, "untimed runs first")
    budget_s: float | None = option(3.0, "max seconds per repeat (0 = always --runs)", kind=float, flag="--budget")

    def validated(self) -> LatencyProtocol:
        check_int("runs", self.runs, 1)
        check_int("repeats", self.repeats, 1)
        check_int("warmup", self.warmup, 0)
        if self.budget_s is not None:
            check_float("budget_s", self.budget_s, 0.0)  # 0: no budget, as on the command line (--budget 0)
        return self


PAPER_PROTOCOL = LatencyProtocol()


@dataclass
class LatencyResult:
    median_ms: float  # median over repeats of the per-repeat mean
    repeat_means_ms: list[float] = field(default_factory=list)
    runs: int = 0  # runs in the shortest repeat
    repeats: int = 0
    warmup: int = 0
    threads: int | None = None

    @property
    def spread(self) -> float:
        """(max - min) / median over the repeats: how noisy the machine was."""
        if not self.repeat_means_ms or not self.median_ms:
            return 0.0
        return (max(self.repeat_means_ms) - min(self.repeat_means_ms)) / self.median_ms

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spread"] = self.spread
        return d


def measure_latency(
    fn: Callable[[], object],
    runs: int = PAPER_PROTOCOL.runs,
    repeats: int = PAPER_PROTOCOL.repeats,
    warmup: int = PAPER_PROTOCOL.warmup,
    budget_s: float | None = PAPER_PROTOCOL.budget_s,
    min_runs: int = 10,
    threads: int | None = None,
    clock: str = "wall",
) -> LatencyResult:
    """Time ``fn()`` (one batch-1 inference) with the paper's protocol.

    ``budget_s`` caps each repeat's wall time (None or 0 = always ``runs``); the warm-up is not timed.
    ``clock="thread"`` measures this thread's CPU time instead of the wall clock: time spent waiting
    for the CPU on a shared machine is left out (the NAS latency table's clock, docs/nas.md).
    """
    if runs < 1 or repeats < 1:
        raise ValueError("runs and repeats must be >= 1")
    tick = _tick(clock)
    for _ in range(warmup):
        fn()
    means, done = [], []
    for _ in range(repeats):
        start_wall, start = time.perf_counter(), tick()
        n = 0
        while n < runs:
            fn()
            n += 1
            if budget_s and n >= min_runs and time.perf_counter() - start_wall > budget_s:  # 0 / None: no budget
                break
        means.append((tick() - start) / n * 1e3)
        done.append(n)
    return LatencyResult(statistics.median(means), means, min(done), repeats, warmup, threads)


def _tick(clock: str) -> Callable[[], float]:
    if clock not in ("wall", "thread"):
        raise ValueError(f"clock must be 'wall' or 'thread', got {clock!r}")
    return time.thread_time if clock == "thread" else time.perf_counter


def alternating_rounds(
    fns: dict[str, Callable], x, rounds: int = 7, iters: int = 20, clock: str = "wall"
) -> dict[str, list[float]]:
    """Per-call ms of each ``fn(x)`` in every round: ``rounds`` rounds of ``iters`` calls per candidate,
    the order rotating every round, so drift and noise from other processes hit every candidate alike.

    Round ``r`` of two candidates was timed seconds apart, so ``a[r] - b[r]`` is a paired difference;
    its median is far steadier than the difference of the two medians. For side-by-side comparisons
    inside one process (same runtime); call under ``torch.inference_mode()`` for torch. ``clock`` is
    :func:`measure_latency`'s ("thread": this thread's CPU time, meaningful with one intra-op thread)."""
    tick = _tick(clock)
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for name in names:  # warm-up
        for _ in range(2):
            fns[name](x)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = tick()
            for _ in range(iters):
                fns[name](x)
            times[name].append((tick() - start) / iters * 1e3)
    return times


def alternating_medians(fns: dict[str, Callable], x, rounds: int = 7, iters: int = 20) -> dict[str, float]:
    """Median per-call ms of each ``fn(x)`` over :func:`alternating_rounds`."""
    return {k: statistics.median(v) for k, v in alternating_rounds(fns, x, rounds, iters).items()}


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(median, min, max) over rounds of ``a[r] - b[r]`` (two candidates of one :func:`alternating_rounds`)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    return statistics.median(d), min(d), max(d)


def paired_ratio(a: list[float], b: list[float]) -> dict:
    """Per-round ratios ``a[r] / b[r]`` of two candidates of one :func:`alternating_rounds`, and a sign test.

    Returns the median, min and max ratio, ``a_faster`` (rounds with ratio < 1) of ``rounds``, and the
    two-sided exact sign-test p-value of "neither is faster" (ties count half each way). A small p says
    the difference is real; a large one over many rounds says it is noise at that resolution."""
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    n = len(ratios)
    faster = sum(r < 1 for r in ratios) + 0.5 * sum(r == 1 for r in ratios)
    k = min(faster, n - faster)
    # P(X <= k) for X ~ Binomial(n, 1/2), doubled (two-sided), capped at 1.
    tail = sum(math.comb(n, i) for i in range(int(math.floor(k)) + 1)) / 2**n
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "a_faster": faster,
        "rounds": n,
        "sign_p": min(1.0, 2 * tail),
    }


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op thread count (the protocol fixes threads; other runtimes take it as an option)."""
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def flush_denormals() -> None:
    """Treat denormal floats as zero in torch's CPU kernels (as mobile runtimes do).

    Products of tiny activations are denormal, and x86 computes those ~40x slower. Trained weights
    rarely produce them; randomly initialised ones do (see :mod:`mnv4.models.batchnorm`, whose
    recalibration is the real fix). Flushing keeps the one that slips through from timing the FPU's
    slow path; every runtime ``mnv4 bench`` drives flushes (see ``Format.denormals``).
    """
    import torch

    torch.set_flush_denormal(True)
