"""Running the command line in a subprocess, alone or under torchrun, as the distributed tests do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_mnv4(
    args: list[str], processes: int = 1, timeout: float = 300, cwd: str | Path | None = None
) -> subprocess.CompletedProcess:
    """``python -m mnv4.cli ARGS`` (``processes`` > 1: under ``torchrun --standalone``), offline, one thread
    per process, with the output captured."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)  # a test run under torchrun must not leak its own rank setup
    cmd = [sys.executable, "-m", "mnv4.cli"]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        cmd += ["-m", "mnv4.cli"]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
