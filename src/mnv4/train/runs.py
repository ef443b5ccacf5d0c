"""Run folders, one set of rules for every command that writes one (train, distill, search).

A run folder holds a run's checkpoint (``last.pt``) and results. What lives here: the default folder
name when none is given (``runs/LABEL``, then ``-2``, ``-3``...), a run folder or checkpoint path
given to resume turned into the checkpoint file, which settings a resume may change, and what a
stopped run says and exits with.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import MNv4Error
from .checkpoint import LAST, load_training_state
from .config import TrainConfig

__all__ = [
    "RUNS_DIR",
    "unused_dir",
    "default_run_dir",
    "checkpoint_file",
    "find_resume",
    "resumed_fields",
    "TRAIN_RESUME_MAY_CHANGE",
    "resumed_train_config",
    "check_resume_output",
    "stop_line",
    "exit_code",
    "plain",
]

RUNS_DIR = "runs"  # where runs go without an explicit output folder (relative to the working directory)
# What a resumed training run may change: where and how it runs, and how long (extending a finished run).
TRAIN_RESUME_MAY_CHANGE = ("output", "workers", "device", "save_every_steps", "data_root", "epochs", "loggers")


def unused_dir(base: str | os.PathLike) -> Path:
    """``base``, or ``base-2``, ``base-3``... : the first that does not exist yet."""
    path, n = Path(base), 1
    while path.exists():
        n += 1
        path = Path(f"{base}-{n}")
    return path


def default_run_dir(label: str) -> Path:
    """The folder of a run given no output: ``runs/LABEL``, suffixed when taken."""
    return unused_dir(Path(RUNS_DIR) / label)


def checkpoint_file(run: str | os.PathLike) -> Path:
    """A run folder stands for its ``last.pt``; any other path is the checkpoint itself."""
    path = Path(run)
    return path / LAST if path.is_dir() else path


def find_resume(resume: str, output: str | None, runs_dir: str | os.PathLike = RUNS_DIR) -> Path:
    """A ``resume`` value -> checkpoint file. 'auto' means OUTPUT/last.pt, or the newest run under ``runs_dir``."""
    if resume != "auto":
        return checkpoint_file(resume)
    if output:
        return Path(output) / LAST
    candidates = sorted(Path(runs_dir).glob(f"*/{LAST}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise MNv4Error(f"`resume`: no run with a {LAST} under {runs_dir}/; pass the run folder")
    return candidates[-1]


def resumed_fields(
    saved: Mapping[str, Any], requested: Mapping[str, Any], may_change: Iterable[str], kind: str = "run"
) -> dict[str, Any]:
    """A resumed run's settings: the ``saved`` ones, with the ``requested`` values (None: not requested) of
    the fields in ``may_change``. Requesting another value for any other field is refused, naming it:
    a resume continues the same run, so what it trains or searches cannot change."""
    allowed = set(may_change)
    fixed = sorted(
        k for k, v in requested.items() if v is not None and k not in allowed and plain(saved.get(k)) != plain(v)
    )
    if fixed:
        names = ", ".join(f"`{k}`" for k in fixed)
        raise MNv4Error(
            f"cannot resume: the {kind} was started with other settings and {names} cannot change "
            f"(start a new {kind} with another `output`)"
        )
    out = dict(saved)
    out.update({k: v for k, v in requested.items() if k in allowed and v is not None})
    return out


def resumed_train_config(
    checkpoint: str | os.PathLike,
    requested: Mapping[str, Any],
    may_change: Iterable[str] = TRAIN_RESUME_MAY_CHANGE,
    config_cls: type[TrainConfig] = TrainConfig,
) -> TrainConfig:
    """The config of the training run saved in ``checkpoint`` (its ``last.pt``), with the ``requested``
    changes a resume may make (``may_change``, by default :data:`TRAIN_RESUME_MAY_CHANGE`; see
    :func:`resumed_fields`), rebuilt as ``config_cls`` (a TrainConfig subclass for other trainers)."""
    checkpoint = Path(checkpoint)
    check_resume_output(requested.get("output"), checkpoint)
    saved = load_training_state(checkpoint)["config"]
    # a detection run's config has a head, a classification run's none: resuming one with the other's
    # trainer would fail on the fields or the data, so it is refused naming the command that resumes it
    is_detection, wants_detection = "head" in saved, any(f.name == "head" for f in dataclasses.fields(config_cls))
    if is_detection != wants_detection:
        command = "mnv4 detect train --resume" if is_detection else "mnv4 train --resume"
        kind = "a detection" if is_detection else "a classification"
        raise MNv4Error(f"{checkpoint.parent} is {kind} training run; continue it with `{command} {checkpoint.parent}`")
    fields = resumed_fields(saved, requested, may_change)
    fields["output"] = str(checkpoint.parent)  # the run continues where it is
    return config_cls.from_dict(fields)


def check_resume_output(output: str | os.PathLike | None, checkpoint: str | os.PathLike) -> None:
    """A resumed run continues in its own folder: an ``output`` that names another folder is refused
    rather than ignored (the user would look for the results there)."""
    run = Path(checkpoint).parent
    if output is not None and Path(output).resolve() != run.resolve():
        raise MNv4Error(
            f"`output` {str(output)!r} is not the run being resumed ({run}); a resumed run continues in its own "
            "folder: drop `output`, or pass the run folder to `resume` alone"
        )


def stop_line(step: int, total_steps: int, reason: str | None, checkpoint: Path, command: str) -> str:
    """The one line a run stopped before its end prints: where, why, and the command that continues it."""
    return f"stopped at step {step} of {total_steps} ({reason}); checkpoint {checkpoint}; continue with: {command}"


def exit_code(stop_reason: str | None) -> int:
    """A stopped run's exit status: 128 + the signal number as shells report it, 0 for a planned stop."""
    return {"SIGINT": 130, "SIGTERM": 143}.get(stop_reason or "", 0)


def plain(v: Any) -> Any:
    """Settings as they come back from a checkpoint compare equal to the ones given now (tuples = lists)."""
    if isinstance(v, Mapping):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [plain(x) for x in v]
    return v
