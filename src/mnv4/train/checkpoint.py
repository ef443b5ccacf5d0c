"""Training checkpoints: everything a resume needs, loadable with ``torch.load(weights_only=True)``.

Only tensors, numbers, strings and containers of them are stored (RNG states as uint8 tensors,
the config as a dict), so resuming never unpickles code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import MNv4Error
from ..files import atomic_write

__all__ = ["rng_state", "set_rng_state", "save_training_state", "load_training_state"]

LAST = "last.pt"
_REQUIRED = ("model", "optimizer", "scheduler", "step", "config", "rng")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """The state saved in ``last.pt``; one clear error for anything else (weights files included)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        raise MNv4Error(
            f"{path} holds weights only, not a training state; to resume pass the run folder or its {LAST}, "
            "to start a new run from these weights pass them as `checkpoint`"
        )
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MNv4Error(f"no checkpoint to resume from at {path}") from None
    except IsADirectoryError:
        raise MNv4Error(f"{path} is a folder without a {LAST}; pass a run folder that holds one") from None
    except Exception as e:  # truncated or foreign file: say which, never a pickle traceback
        raise MNv4Error(f"cannot resume from {path}: not an mnv4 training checkpoint ({type(e).__name__})") from None
    missing = [k for k in _REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise MNv4Error(
            f"cannot resume from {path}: not an mnv4 training checkpoint (no {', '.join(missing[:3])}); "
            f"pass a run folder or its {LAST}"
        )
    return state
