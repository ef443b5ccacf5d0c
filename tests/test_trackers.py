"""Experiment trackers: what a run logs to W&B (offline) and MLflow (a local file store) is read back
from their own storage and equals the run's metrics.csv; selection, resume and failures."""

from __future__ import annotations

import glob
import json
import os
import struct
import sys
import time

import pytest

from mnv4.cli import build_parser
from mnv4.errors import MNv4Error
from mnv4.train import train
from mnv4.train.metrics import read_metrics

from .cli_run import run_mnv4
from .conftest import require
from .test_train import TINY, tiny_cfg, tiny_digits


def _csv_column(run_dir, key: str) -> list[float]:
    return [float(r[key]) for r in read_metrics(run_dir / "metrics.csv")]


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    mlflow = require("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database unless told otherwise
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mnv4-test")
    return mlflow.tracking.MlflowClient(tracking_uri=uri)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    require("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    return tmp_path / "wb"


def _wandb_records(path: str) -> list:
    """The records of an offline ``.wandb`` file: a 7-byte header, then 32 KiB blocks of chunks
    (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last), each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (n == 0 and kind == 0):  # block trailer / zero padding
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _wait_for_flush(path: str, limit_s: float = 60.0) -> None:
    """Some wandb releases (0.21) return from ``finish()`` before their service process has written the
    offline file: wait until it holds the header and stops growing (a bound, not a timing assertion)."""
    deadline, last = time.monotonic() + limit_s, -1
    while time.monotonic() < deadline:
        size = os.path.getsize(path)
        if size > 7 and size == last:
            return
        last = size
        time.sleep(0.5)


def _wandb_history(wb_dir) -> tuple[str, list[dict]]:
    (path,) = glob.glob(str(wb_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    _wait_for_flush(path)
    records = _wandb_records(path)
    run_id = next(r.run.run_id for r in records if r.WhichOneof("record_type") == "run")
    rows = [
        {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    return run_id, rows


@pytest.mark.slow
def test_wandb_offline_receives_every_epoch(tmp_path, wandb_offline):
    res = train(tiny_cfg(tmp_path, epochs=2, loggers=("wandb",)), data=tiny_digits(64, 32), progress=False)
    run_id, rows = _wandb_history(wandb_offline)
    assert json.loads((res.run_dir / "trackers.json").read_text()) == {"wandb": run_id}
    assert [r["val_top1"] for r in rows] == pytest.approx(_csv_column(res.run_dir, "val_top1"), abs=1e-4)
    assert [r["train_loss"] for r in rows] == pytest.approx(_csv_column(res.run_dir, "train_loss"), rel=1e-5)
    assert [r["_step"] for r in rows] == [int(r["step"]) for r in read_metrics(res.run_dir / "metrics.csv")]


def test_mlflow_receives_metrics_and_params_and_a_resumed_run_continues_it(tmp_path, mlflow_store):
    cfg = tiny_cfg(tmp_path, epochs=3, loggers=("mlflow",))
    first = train(cfg, data=tiny_digits(64, 32), progress=False, max_steps=2)  # stops inside epoch 2 of 3
    assert first.stopped_early
    res = train(cfg, data=tiny_digits(64, 32), progress=False, resume=first.run_dir)
    run_id = json.loads((res.run_dir / "trackers.json").read_text())["mlflow"]
    (run,) = mlflow_store.search_runs([mlflow_store.get_experiment_by_name("mnv4-test").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED" and run.info.run_name == "run"
    history = mlflow_store.get_metric_history(run_id, "val_top1")
    steps = [int(r["step"]) for r in read_metrics(res.run_dir / "metrics.csv")]
    assert sorted(m.step for m in history) == steps and len(steps) == 3
    by_step = {m.step: m.value for m in history}
    assert [by_step[s] for s in steps] == pytest.approx(_csv_column(res.run_dir, "val_top1"), abs=1e-4)
    assert run.data.params["lr"] == "0.02" and run.data.params["recipe"] == "quick"


def test_a_missing_tracker_package_is_one_error_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(MNv4Error, match=r"wandb is not installed; install it with: pip install 'mnv4\[wandb\]'"):
        train(tiny_cfg(tmp_path, loggers=("wandb",)), data=tiny_digits(64, 32), progress=False)
    assert not (tmp_path / "run" / "metrics.csv").exists()
    with pytest.raises(MNv4Error, match="loggers"):
        tiny_cfg(tmp_path, loggers=("neptune",))


def test_a_tracker_that_cannot_start_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    """W&B without a login (a fresh HOME, no key, online mode) and an MLflow store the client cannot open
    end in one MNv4Error naming the tracker, its cause and the settings that fix it; nothing is trained."""
    require("wandb")
    for var in ("WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # a process of its own: wandb keeps its first settings (another test's offline mode) for the process
    proc = run_mnv4(["train", "--epochs", "0.01", "--logger", "wandb", "-o", str(tmp_path / "run"), "--no-progress"])
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("mnv4: error: wandb could not start a run (") and "log in with `wandb login`" in err
    assert err.endswith("or drop wandb from --logger") and not (tmp_path / "run" / "metrics.csv").exists()

    def refuse(self, *a):
        raise RuntimeError("unsupported URI 'sqlite:///mlflow.db'. See the docs.\nsecond line")

    monkeypatch.setattr("mnv4.train.trackers._Mlflow.__init__", refuse)
    with pytest.raises(MNv4Error) as e:
        train(tiny_cfg(tmp_path, loggers=("mlflow",)), data=tiny_digits(64, 32), progress=False)
    assert str(e.value).startswith(
        "mlflow could not start a run (RuntimeError: unsupported URI 'sqlite:///mlflow.db');"
    )
    assert "MLFLOW_TRACKING_URI" in str(e.value) and "second line" not in str(e.value)


def test_logger_flag_parses_to_the_config_field(tmp_path):
    args = build_parser().parse_args(["train", "--logger", "wandb,mlflow"])
    assert args.logger == ("wandb", "mlflow")
    assert build_parser().parse_args(["train", "--logger", "none"]).logger == ()
    assert tiny_cfg(tmp_path, loggers="tensorboard, mlflow").loggers == ("tensorboard", "mlflow")


def test_a_failing_tracker_warns_once_and_the_run_goes_on(tmp_path, mlflow_store, monkeypatch):
    from mlflow.tracking import MlflowClient

    def broken(self, *a, **k):
        if k.get("metrics"):
            raise ConnectionError("tracking server went away")

    monkeypatch.setattr(MlflowClient, "log_batch", broken)
    with pytest.warns(UserWarning, match="mlflow logging failed .*went away.* goes on without it") as caught:
        res = train(tiny_cfg(tmp_path, epochs=2, loggers=("mlflow",)), data=tiny_digits(64, 32), progress=False)
    assert len([w for w in caught if "mlflow" in str(w.message)]) == 1
    assert len(read_metrics(res.run_dir / "metrics.csv")) == 2


@pytest.mark.slow
def test_only_rank_zero_opens_a_tracker_under_torchrun(tmp_path, mlflow_store):
    conf = tmp_path / "tiny.json"
    conf.write_text(json.dumps({"model": TINY.to_dict(), "input_size": 16, "epochs": 0.25, "batch_size": 32}))
    argv = ["train", "--config", str(conf), "--logger", "mlflow", "-o", str(tmp_path / "ddp"), "--no-progress"]
    proc = run_mnv4(argv, processes=2)  # inherits the MLFLOW_* settings
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = mlflow_store.search_runs([mlflow_store.get_experiment_by_name("mnv4-test").experiment_id])
    assert len(runs) == 1 and len(mlflow_store.get_metric_history(runs[0].info.run_id, "val_top1")) == 1


def test_tensorboard_gets_every_number_but_the_epoch_at_its_step(tmp_path, monkeypatch):
    import types

    written: list[tuple[str, float, int]] = []

    class Writer:  # stands in for torch.utils.tensorboard.SummaryWriter (tensorboard need not be installed)
        def __init__(self, logdir):
            assert logdir == str(tmp_path / "run" / "tensorboard")

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    res = train(tiny_cfg(tmp_path, epochs=2, loggers=("tensorboard",)), data=tiny_digits(64, 32), progress=False)
    rows = read_metrics(res.run_dir / "metrics.csv")
    got = {(tag, step): value for tag, value, step in written}
    assert {tag for tag, _ in got} >= {"val_top1", "train_loss", "lr"} and "epoch" not in {t for t, _ in got}
    for r in rows:
        assert got[("val_top1", int(r["step"]))] == pytest.approx(float(r["val_top1"]), abs=1e-4)
