"""Runs are never lost or mixed: ownership, stop requests, non-finite losses, bad data, file modes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mnv4.data.datasets import DataBundle
from mnv4.errors import MNv4Error
from mnv4.files import DirLock, FolderLocked, atomic_write_text, remove_orphan_temps
from mnv4.train.trainer import Trainer, _rechunk, train

from .test_train import tiny_cfg, tiny_digits


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_an_existing_run_is_never_overwritten(tmp_path):
    data = tiny_digits(64, 16)
    cfg = tiny_cfg(tmp_path, epochs=1)
    first = train(cfg, data=data, progress=False)
    before = (first.run_dir / "summary.json").read_text()
    with pytest.raises(MNv4Error, match="already holds a run"):
        train(cfg, data=data, progress=False)
    assert (first.run_dir / "summary.json").read_text() == before
    lines = []
    second = train(cfg, data=data, progress=False, exist_ok=True, log=lines.append)
    assert any("replacing the run" in line and "metrics.csv" in line for line in lines)
    rows = (second.run_dir / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 2  # a fresh file, not the old one appended to


def test_a_run_that_failed_before_its_first_step_does_not_block_the_next(tmp_path, monkeypatch):
    """A tracker that would not start (say) fails the run after its config.yaml is written: a folder the run
    made is removed again; in a folder that was there before, the config is left, and as it holds nothing to
    continue or lose, the corrected command runs there instead of being refused."""
    from mnv4.train import trackers

    data = tiny_digits(64, 16)
    cfg = tiny_cfg(tmp_path, epochs=1)

    def no_tracker(*args, **kwargs):
        raise MNv4Error("tensorboard is not installed")

    monkeypatch.setattr(trackers, "open_trackers", no_tracker)
    with pytest.raises(MNv4Error, match="tensorboard"):
        train(cfg, data=data, progress=False)
    run_dir = Path(cfg.output)
    assert not run_dir.exists()  # the run made it, and took no step
    run_dir.mkdir(parents=True)
    with pytest.raises(MNv4Error, match="tensorboard"):
        train(cfg, data=data, progress=False)
    monkeypatch.undo()
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "last.pt").exists()
    result = train(cfg, data=data, progress=False)
    assert result.run_dir == run_dir and (run_dir / "summary.json").is_file()
    with pytest.raises(MNv4Error, match="already holds a run"):  # now it has trained: refused as before
        train(cfg, data=data, progress=False)


def test_default_run_names_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tiny_digits(64, 16)
    cfg = tiny_cfg(tmp_path, epochs=1, output=None)
    a = train(cfg, data=data, progress=False)
    b = train(cfg, data=data, progress=False)
    assert a.run_dir.name == "tiny_train-digits" and b.run_dir.name == "tiny_train-digits-2"


def test_a_run_folder_has_one_owner_and_stale_locks_are_recovered(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder.mkdir()
        (folder / ".mnv4.lock").write_text(
            json.dumps({"pid": holder.pid, "host": os.uname().nodename, "since": time.time(), "cmd": "x"})
        )
        with pytest.raises(FolderLocked, match=f"in use by another training run \\(pid {holder.pid}"):
            train(tiny_cfg(tmp_path, epochs=1, output=str(folder)), data=tiny_digits(64, 16), progress=False)
    finally:
        holder.kill()
        holder.wait()
    # The owner is dead now: its lock is stale and the next run takes the folder over.
    res = train(tiny_cfg(tmp_path, epochs=1, output=str(folder)), data=tiny_digits(64, 16), progress=False)
    assert res.summary["steps"] == 2 and not (folder / ".mnv4.lock").exists()
    with DirLock(folder) as lock:
        assert lock.held and DirLock(folder).acquire().held  # re-entrant within one process


class _SignalAt(Trainer):
    """Delivers a real SIGTERM to this process after a given step, as a cluster preemption would."""

    def __init__(self, *a, at: int, sig=signal.SIGTERM, **k) -> None:
        super().__init__(*a, **k)
        self.at, self.sig = at, sig

    def after_step(self, step: int, loss: float) -> None:
        if step == self.at:
            os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("sig,name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")])
def test_sigterm_and_ctrl_c_save_at_the_step_boundary_and_resume_bit_exact(tmp_path, sig, name):
    kw = dict(epochs=2, batch_size=32, dropout=0.2, randaug_prob=0.5, mix_prob=0.5, ema_decay=0.9)
    data = tiny_digits(128, 32)
    full = train(tiny_cfg(tmp_path / "a", **kw), data=data, progress=False)
    cfg = tiny_cfg(tmp_path / "b", **kw)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stopped = _SignalAt(cfg, data=data, progress=False, at=3, sig=sig).run()
    assert stopped.stopped_early and stopped.stop_reason == name and stopped.step == 3
    assert {s: signal.getsignal(s) for s in before} == before  # the run's handlers are gone again
    state = torch.load(stopped.run_dir / "last.pt", weights_only=True)
    assert state["step"] == 3
    resumed = train(cfg, resume=stopped.run_dir / "last.pt", data=data, progress=False)
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


def test_a_finished_run_can_be_extended(tmp_path):
    data = tiny_digits(64, 16)
    cfg = tiny_cfg(tmp_path, epochs=1)
    done = train(cfg, data=data, progress=False)
    with pytest.raises(MNv4Error, match="already finished .* larger `epochs`"):
        train(cfg, resume=done.run_dir / "last.pt", data=data, progress=False)
    longer = cfg.__class__.from_dict({**cfg.to_dict(), "epochs": 3})
    lines = []
    ext = train(longer, resume=done.run_dir / "last.pt", data=data, progress=False, log=lines.append)
    assert ext.summary["steps"] == 6 and ext.summary["epochs"] == 3
    assert any("extending the run from 2 to 6 steps" in line for line in lines)
    rows = (ext.run_dir / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]


class _NaNAfter(Trainer):
    def __init__(self, *a, after: int, **k) -> None:
        super().__init__(*a, **k)
        self.after = after

    def loss(self, logits, target):
        per_sample = super().loss(logits, target)
        return per_sample * float("nan") if self.step >= self.after else per_sample


def test_non_finite_loss_stops_with_one_error_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=3, save_every_steps=1, max_nonfinite_steps=2)
    trainer = _NaNAfter(cfg, data=tiny_digits(64, 16), progress=False, after=3)
    with pytest.raises(MNv4Error, match="not finite for 2 steps in a row.*last good checkpoint"):
        trainer.run()
    state = torch.load(trainer.run_dir / "last.pt", weights_only=True)
    assert state["step"] == 3  # the skipped steps did not overwrite it
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (trainer.run_dir / ".mnv4.lock").exists()  # the lock is released on errors too


def _broken_bundle(tmp_path, good: int, bad: int) -> DataBundle:
    from mnv4.data.folder import SafeImageFolder

    tr, va = tiny_digits(good, 16).train, tiny_digits(good, 16).val
    root = tmp_path / "imgs"
    for i in range(good):
        im, y = tr[i]
        (root / f"d{y}").mkdir(parents=True, exist_ok=True)
        im.save(root / f"d{y}" / f"{i}.png")
    classes = [f"d{c}" for c in range(10)]  # every digit class exists, so labels match the val set's
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(bad):
        (root / classes[i % len(classes)] / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return DataBundle("broken", SafeImageFolder(root), va, classes, 16)


def test_unreadable_images_never_crash_batchnorm_or_skew_steps(tmp_path):
    # 8 readable images among 40 broken ones, micro-batches of 2: many micro-batches hold one readable
    # image or none, and some whole steps none at all.
    data = _broken_bundle(tmp_path, good=8, bad=40)
    cfg = tiny_cfg(tmp_path, epochs=2, batch_size=8, micro_batch=2)
    res = train(cfg, data=data, progress=False)
    assert res.summary["skipped_images"] == 40 and res.summary["steps"] == 12
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_no_readable_training_image_is_one_error_before_training(tmp_path):
    from mnv4.data.folder import SafeImageFolder

    root = tmp_path / "all_bad"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            (root / c / f"{i}.jpg").write_bytes(b"not a jpeg")
    data = DataBundle("all_bad", SafeImageFolder(root), tiny_digits(16, 16).val, ["a", "b"], 16)
    with pytest.raises(MNv4Error, match="none of 12 training images sampled across the set could be read"):
        train(tiny_cfg(tmp_path, epochs=1, batch_size=4), data=data, progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_rechunk_keeps_batchnorm_batches_above_one():
    x = torch.arange(5.0).view(5, 1, 1, 1)
    y = torch.arange(5)
    sizes = [len(c[0]) for c in _rechunk([x], [y], 2)]
    assert sizes == [2, 3]  # the lone fifth image joins the previous micro-batch
    ((xx, yy, w),) = _rechunk([x[:1], x[1:3]], [y[:1], y[1:3]], 2)  # micro-batches of 1 and 2 images: one of 3
    assert xx.flatten().tolist() == [0.0, 1.0, 2.0] and w.tolist() == [1.0] * 3 and yy.tolist() == [0, 1, 2]
    assert _rechunk([], [], 2) == []


def test_run_files_honour_the_umask_and_orphan_temps_are_removed(tmp_path):
    old = os.umask(0o002)
    try:
        res = train(tiny_cfg(tmp_path, epochs=1), data=tiny_digits(64, 16), progress=False)
    finally:
        os.umask(old)
    for name in ("config.yaml", "summary.json", "last.pt", "best.safetensors", "last.safetensors"):
        assert (res.run_dir / name).stat().st_mode & 0o777 == 0o664, name
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = res.run_dir / f".last.pt.{dead.pid}.abcd.tmp"
    orphan.write_bytes(b"half a checkpoint")
    mine = atomic_write_text(res.run_dir / "note.txt", "x")
    assert remove_orphan_temps(res.run_dir) == [orphan] and mine.exists()


def test_max_steps_cli_prints_a_resume_command_that_works(tmp_path, capsys, monkeypatch):
    from mnv4.cli import main

    from .test_train import TINY

    conf = tmp_path / "cfg.json"
    conf.write_text(json.dumps({"model": TINY.to_dict(), "epochs": 1, "batch_size": 32, "input_size": 16}))
    out = tmp_path / "run"
    argv = ["train", "--config", str(conf), "--output", str(out), "--no-progress"]
    monkeypatch.setattr("mnv4.data.digits.DigitsDataset.__len__", lambda self: min(len(self.targets), 96))
    assert main([*argv, "--max-steps", "1"]) == 0
    said = capsys.readouterr().out
    assert f"continue with: mnv4 train --resume {out}" in said and said.count("stopped at step") == 1  # once
    # an -o naming another folder is refused, not ignored (the results would not be where the user looks)
    assert main(["train", "--resume", str(out), "-o", str(tmp_path / "elsewhere"), "--no-progress"]) == 2
    assert "is not the run being resumed" in capsys.readouterr().err and not (tmp_path / "elsewhere").exists()
    assert main(["detect", "train", "--resume", str(out), "--no-progress"]) == 2  # the other trainer's run
    assert f"is a classification training run; continue it with `mnv4 train --resume {out}`" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert main(["train", "--resume", str(out), "--lr", "0.1", "--no-progress"]) == 2
    assert "--lr cannot change" in capsys.readouterr().err


def test_a_resume_that_dies_while_trimming_metrics_keeps_the_history(tmp_path, monkeypatch):
    """MetricsLog drops rows past the resume point by rewriting metrics.csv: atomically, so a failure midway
    (disk full, a kill) leaves the previous file whole instead of a truncated one."""
    import csv

    from mnv4.train.metrics import METRICS_FILE, MetricsLog, read_metrics

    log = MetricsLog(tmp_path, loggers=())
    for epoch in (1, 2, 3):
        log.log({"epoch": epoch, "loss": 1.0 / epoch})
    log.close()
    before = (tmp_path / METRICS_FILE).read_text()

    def fail(self, rows):
        self.writerow(next(iter(rows)))
        raise OSError("No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", fail)
    with pytest.raises(OSError, match="No space"):
        MetricsLog(tmp_path, resume_epoch=2, loggers=())
    assert (tmp_path / METRICS_FILE).read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == [METRICS_FILE]  # no temp file left either
    monkeypatch.undo()
    MetricsLog(tmp_path, resume_epoch=2, loggers=()).close()
    assert [r["epoch"] for r in read_metrics(tmp_path / METRICS_FILE)] == ["1", "2"]
