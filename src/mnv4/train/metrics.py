"""Per-epoch metrics: ``metrics.csv`` in the run directory, experiment trackers (TensorBoard, W&B, MLflow),
curve plots."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from ..errors import MNv4Error
from ..files import atomic_write

__all__ = ["MetricsLog", "read_metrics", "plot_run"]

METRICS_FILE = "metrics.csv"


class MetricsLog:
    """Appends one row per epoch. Columns are fixed by the first row written; a resumed run keeps
    appending to the same file, dropping rows past the resume point so no epoch appears twice.
    The numbers of each row also go to the experiment trackers selected by ``loggers``
    (:mod:`mnv4.train.trackers`; None: TensorBoard when installed)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        resume_epoch: int | None = None,
        loggers: tuple[str, ...] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        from .trackers import open_trackers

        self.path = Path(run_dir) / METRICS_FILE
        if resume_epoch is not None and self.path.exists():
            rows = [r for r in read_metrics(self.path) if int(r["epoch"]) <= resume_epoch]
            self._rewrite(rows)
        self.trackers = open_trackers(run_dir, loggers, config or {}, resume=resume_epoch is not None)

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        if not rows:
            self.path.unlink(missing_ok=True)
            return

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)

        atomic_write(self.path, write)  # a resume killed here keeps the history it was trimming

    def log(self, row: dict[str, Any]) -> None:
        from .trackers import log_all

        new = not self.path.exists()
        if not new:
            with open(self.path, newline="") as f:
                fields = next(csv.reader(f), list(row))
        else:
            fields = list(row)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: _fmt(row.get(k, "")) for k in fields})
        if self.trackers:
            step = int(row.get("step", row.get("epoch", 0)))
            numbers = {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            numbers.pop("step", None)
            self.trackers = log_all(self.trackers, numbers, step)

    def close(self) -> None:
        from .trackers import close_all

        close_all(self.trackers)
        self.trackers = []


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def read_metrics(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict[str, str]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        if r.get(key) not in (None, ""):
            xs.append(float(r["epoch"]))
            ys.append(float(r[key]))
    return xs, ys


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Loss and accuracy curves of a run (from its metrics.csv) as one PNG."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise MNv4Error(f"no {METRICS_FILE} in {run_dir}; pass the folder of a training run")
    try:
        rows = read_metrics(path)
    except (UnicodeDecodeError, csv.Error) as e:
        raise MNv4Error(f"{path} is not a metrics.csv a run wrote ({type(e).__name__}); pass a training run") from None
    if rows and not {"epoch", "step"} <= set(rows[0]):
        raise MNv4Error(f"{path} is not a metrics.csv a run wrote (no epoch and step columns); pass a training run")
    if not rows:
        raise MNv4Error(f"{path} has no epochs yet")
    try:
        for key in ("train_loss", "val_loss", "lr", "val_top1"):
            _column(rows, key)
    except ValueError:
        raise MNv4Error(f"{path} holds values that are not numbers; it is damaged or not a run's metrics.csv") from None
    from ..plotting import pyplot, save_figure

    plt = pyplot()

    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "val"), ("ema_val_loss", "val (EMA)")):
        xs, ys = _column(rows, key)
        if xs:
            ax_loss.plot(xs, ys, marker=".", label=label)
    for key, label in (("val_top1", "val top-1"), ("val_top5", "val top-5"), ("ema_val_top1", "val top-1 (EMA)")):
        xs, ys = _column(rows, key)
        if xs:
            ax_acc.plot(xs, ys, marker=".", label=label)
    xs, ys = _column(rows, "lr")
    ax_lr.plot(xs, ys, marker=".")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy (%)"), (ax_lr, "learning rate (end of epoch)")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    return save_figure(fig, Path(out) if out else path.parent / "curves.png", dpi=100)
