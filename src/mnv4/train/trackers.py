"""Experiment trackers fed by the metric sink (:class:`mnv4.train.metrics.MetricsLog`): TensorBoard,
Weights & Biases and MLflow, each an optional extra imported only when selected (config field
``loggers``, ``mnv4 train --logger``). Only rank 0 writes metrics, so only rank 0 opens them.

Where they write follows each tool's own settings: W&B's ``WANDB_MODE`` (``offline`` works without
network), ``WANDB_PROJECT`` (default ``mnv4``) and ``WANDB_DIR`` (default: the run folder); MLflow's
``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_NAME`` (default ``mnv4``). The W&B and MLflow run ids
are kept in the run folder (``trackers.json``), so a resumed run keeps logging to the same tracked run.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

from ..errors import MNv4Error, missing_extra
from ..files import atomic_write_json

__all__ = ["LOGGERS", "TRACKERS_FILE", "Tracker", "open_trackers"]

LOGGERS = ("tensorboard", "wandb", "mlflow")
TRACKERS_FILE = "trackers.json"
_PARAM_CHARS = 500  # MLflow's limit on one parameter value
# What to do when a tracker cannot start a run (no W&B login; an MLflow store this install cannot open:
# MLflow 3's default is a SQLite database, which the mlflow-skinny client of the `mlflow` extra lacks).
_START_HINTS = {
    "wandb": "log in with `wandb login` or set WANDB_API_KEY (WANDB_MODE=offline logs into the run folder "
    "without an account)",
    "mlflow": "point MLFLOW_TRACKING_URI at a tracking server (http://HOST:PORT) or at a local store "
    "(file:./mlruns with MLFLOW_ALLOW_FILE_STORE=true)",
}


def _start_error(name: str, error: Exception) -> MNv4Error:
    """A tracker's own start-up exception as one line: its first sentence, then what to do."""
    cause = (str(error).strip().splitlines() or [""])[0].split(". ")[0][:160]
    return MNv4Error(
        f"{name} could not start a run ({type(error).__name__}: {cause}); {_START_HINTS[name]}, "
        f"or drop {name} from `loggers`"
    )


class Tracker(Protocol):
    name: str

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing_extra("tensorboard", "tensorboard") from None
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            if k != "epoch":
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None) -> None:
        try:
            import wandb
        except ImportError:
            raise missing_extra("wandb", "wandb") from None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "mnv4"),
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=os.environ.get("WANDB_DIR", str(run_dir)),
            config=config,
        )
        self.run_id = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def _params(config: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    out = []
    for k, v in config.items():
        if isinstance(v, dict):  # nested (a spec, the derived plan): one JSON value
            v = json.dumps(v, sort_keys=True)
        out.append(Param(k, str(v)[:_PARAM_CHARS]))
    return out


class _Mlflow:
    name = "mlflow"

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise missing_extra("mlflow", "mlflow") from None
        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, else mlflow's default store
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                return
            except Exception:  # noqa: BLE001 - not in this store (another MLFLOW_TRACKING_URI): start a new run
                pass
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mnv4")
        experiment = self.client.get_experiment_by_name(name)
        eid = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(eid, run_name=run_dir.name, tags={"mnv4.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=_params(config))

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _tensorboard_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def open_trackers(
    run_dir: str | os.PathLike, loggers: tuple[str, ...] | None, config: dict[str, Any], resume: bool
) -> list[Tracker]:
    """Start the selected trackers (None: TensorBoard when it is installed, as before ``loggers``
    existed). A selected tracker whose package is missing is one error naming the extra."""
    run_dir = Path(run_dir)
    if loggers is None:
        loggers = ("tensorboard",) if _tensorboard_installed() else ()
    state_file = run_dir / TRACKERS_FILE
    ids: dict[str, str] = {}
    if resume and state_file.is_file():
        try:
            ids = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError):
            ids = {}  # a damaged id file only costs continuity: the tracker starts a new run
    out: list[Tracker] = []
    try:
        for name in loggers:
            if name == "tensorboard":
                out.append(_TensorBoard(run_dir))
            elif name in ("wandb", "mlflow"):
                cls = _Wandb if name == "wandb" else _Mlflow
                try:
                    tracker = cls(run_dir, config, ids.get(name))
                except MNv4Error:
                    raise
                except Exception as e:  # noqa: BLE001 - any library's start-up failure becomes one line
                    raise _start_error(name, e) from e
                ids[name] = tracker.run_id
                out.append(tracker)
            else:
                raise MNv4Error(f"unknown logger {name!r}; choose from {', '.join(LOGGERS)}")
    except BaseException:
        close_all(out)
        raise
    if any(n in ids for n in ("wandb", "mlflow")):
        atomic_write_json(state_file, ids)
    return out


def log_all(trackers: list[Tracker], metrics: dict[str, float], step: int) -> list[Tracker]:
    """Log to every tracker; one that fails (a lost connection) is dropped with a warning, not the run."""
    alive = []
    for t in trackers:
        try:
            t.log(metrics, step)
            alive.append(t)
        except Exception as e:  # noqa: BLE001 - any tracker failure must not end hours of training
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            warnings.warn(f"{t.name} logging failed ({first}); the run goes on without it", stacklevel=2)
    return alive


def close_all(trackers: list[Tracker]) -> None:
    for t in trackers:
        try:
            t.close()
        except Exception as e:  # noqa: BLE001 - closing must not hide the run's own result or error
            warnings.warn(f"closing {t.name} failed ({e})", stacklevel=2)
