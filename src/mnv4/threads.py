"""Scoped control of torch's intra-op thread pool."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

__all__ = ["torch_threads", "sample_threads"]


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with torch's intra-op pool at ``n`` threads (None: as it is), restoring the count after."""
    saved = torch.get_num_threads()
    if n is not None and n != saved:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)


def sample_threads() -> AbstractContextManager[None]:
    """The pool for making one training sample: one thread in the main process, as it is in a DataLoader
    worker (torch gives each worker one). Per-sample ops are tiny, and a multi-threaded pool makes them
    10-1000x slower on a busy machine (every op waits for all its threads to be scheduled)."""
    from torch.utils.data import get_worker_info

    return torch_threads(1 if get_worker_info() is None else None)
