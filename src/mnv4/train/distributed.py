"""torchrun integration: one process per device, gloo on CPU and nccl on CUDA.

Nothing here is needed for a single process; ``setup`` returns world size 1 when the torchrun
environment variables are absent.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import InvalidValue, MNv4Error

__all__ = ["DistInfo", "setup", "teardown", "all_reduce_sum", "pick_device", "check_device"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def check_device(requested: str) -> str:
    """``requested`` if it names a device mnv4 can use, else :class:`InvalidValue`."""
    if not isinstance(requested, str) or not _DEVICE.match(requested):
        raise InvalidValue("device", requested, "choose auto, cpu, cuda, cuda:N or mps")
    return requested


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """The device for ``requested`` (auto: CUDA when available, else CPU), checked to exist."""
    check_device(requested)
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MNv4Error("`device` cuda was requested but no CUDA device is available; use cpu")
        if ":" in requested and int(requested.split(":")[1]) >= torch.cuda.device_count():
            raise InvalidValue("device", requested, f"this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(requested if ":" in requested else f"cuda:{local_rank}")
    if requested == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise MNv4Error("`device` mps was requested but this machine has no Apple GPU; use cpu")
    return torch.device(requested)


def setup(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if launched by torchrun, and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
    if world > 1 and dev.type == "cpu":
        # Ranks share the cores; letting each spawn a thread per core oversubscribes the machine.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return DistInfo(rank, world, local_rank, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()
