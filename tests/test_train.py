"""The trainer: schedule, optimizer groups, a real (tiny) run end to end, exact resume, CLI commands."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import mnv4
from mnv4.cli import main
from mnv4.data.datasets import DataBundle
from mnv4.data.digits import digits_split
from mnv4.errors import MNv4Error
from mnv4.models.specs import ModelSpec, cn, uib
from mnv4.train import Trainer, resolve_config, train
from mnv4.train.metrics import read_metrics
from mnv4.train.optim import build_optimizer, load_optimizer_state, param_groups, warmup_cosine

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = ModelSpec(
    name="tiny_train",
    stem=cn(3, 2, 8),
    stages=((cn(3, 2, 8),), (uib(3, 3, 2, 16, 2.0), uib(0, 3, 1, 16, 2.0)), (uib(3, 0, 2, 16, 2.0),), (cn(1, 1, 16),)),
    num_features=32,
    head_hidden_size=32,
)


def tiny_digits(n_train: int = 256, n_val: int = 128, size: int = 16) -> DataBundle:
    tr, va = digits_split(0.2, seed=0, size=size)
    tr.images, tr.targets = tr.images[:n_train], tr.targets[:n_train]
    va.images, va.targets = va.images[:n_val], va.targets[:n_val]
    return DataBundle("digits", tr, va, list(tr.classes), size)


def tiny_cfg(tmp_path, **kw):
    base = dict(model=TINY.to_dict(), epochs=3, batch_size=32, lr=2e-2, lr_scaling="none", output=str(tmp_path / "run"))
    base.update(kw)
    return resolve_config("quick", **base)


def test_warmup_then_cosine_to_final_fraction():
    f = [warmup_cosine(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert f[20] == pytest.approx(0.1) and f[12] == pytest.approx(0.55)


def test_batchnorm_parameters_are_not_weight_decayed():
    model = mnv4.create_model(TINY, num_classes=3)
    decay, plain = param_groups(model, 0.05)
    bn = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in plain["params"]} == bn and plain["weight_decay"] == 0.0
    assert id(model.classifier.bias) in {id(p) for p in decay["params"]}  # as TF: only BN is excluded
    assert len(decay["params"]) + len(plain["params"]) == len(list(model.parameters()))


def _adamw_steps(opt: torch.optim.Optimizer, model: torch.nn.Module, n: int = 3) -> None:
    for step in range(n):  # the same gradients for every optimizer under test
        g = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_adamw_takes_the_fused_kernel_and_computes_torchs_reference_update():
    model = mnv4.create_model(TINY, num_classes=3)
    ref_model = copy.deepcopy(model)
    opt = build_optimizer(model, 1e-2, 0.05, (0.9, 0.999), 1e-8)
    assert opt.defaults["fused"] and not opt.defaults["foreach"]
    ref = torch.optim.AdamW(param_groups(ref_model, 0.05), lr=1e-2, eps=1e-8, foreach=False)  # the plain loop
    _adamw_steps(opt, model)
    _adamw_steps(ref, ref_model)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    # no fused kernel for these parameters (here: the meta device): the per-tensor loop
    meta = build_optimizer(mnv4.create_model(TINY, num_classes=3).to("meta"), 1e-2, 0.05, (0.9, 0.999), 1e-8)
    assert not meta.defaults["fused"] and meta.defaults["foreach"] is False


def test_an_older_optimizer_state_resumes_on_the_fused_kernel():
    """A last.pt from the per-tensor loop (what mnv4 used before) keeps its moments and step count but
    continues on the kernel the trainer built."""
    model = mnv4.create_model(TINY, num_classes=3)
    old = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-2, foreach=False)
    _adamw_steps(old, model, n=2)
    opt = build_optimizer(model, 1e-2, 0.05, (0.9, 0.999), 1e-8)
    load_optimizer_state(opt, old.state_dict())
    assert all(g["fused"] and not g["foreach"] for g in opt.param_groups)
    p = model.classifier.weight
    assert float(opt.state[p]["step"]) == 2 and torch.equal(opt.state[p]["exp_avg"], old.state[p]["exp_avg"])
    _adamw_steps(opt, model, n=1)  # and it steps
    assert float(opt.state[p]["step"]) == 3


def test_tiny_run_learns_and_writes_everything(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=6, ema_decay=0.9, ema_start_epochs=1)
    res = train(cfg, data=tiny_digits(), progress=False)
    run = res.run_dir
    s = json.loads((run / "summary.json").read_text())
    for key in ("model", "dataset", "epochs", "val_top1", "wall_seconds", "best_checkpoint"):
        assert key in s
    assert s["model"] == "tiny_train" and s["dataset"] == "digits" and s["epochs"] == 6
    assert s["val_top1"] > 35.0  # chance is 10%: it really learned
    assert "ema_val_top1_final" in s
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 7 and rows[0].startswith("epoch,step,lr,train_loss")
    assert "ema_val_top1" in rows[0]
    assert (run / "config.yaml").read_text().startswith("name: quick")
    model = mnv4.create_model(checkpoint=s["best_checkpoint"])
    assert model.class_names == [str(i) for i in range(10)] and model.preprocess.input_size == 16
    assert (run / "last.safetensors").exists() and (run / "last_ema.safetensors").exists()
    state = torch.load(run / "last.pt", weights_only=True)  # loadable without unpickling code
    assert state["step"] == 6 * 8 and state["ema"] is not None


def test_killed_mid_epoch_then_resumed_matches_uninterrupted_run(tmp_path):
    # Everything that draws random numbers is on: augmentation, Mixup/CutMix, dropout, stochastic
    # depth, EMA, gradient accumulation; 3 epochs x 4 steps, checkpoint every 3 steps.
    kw = dict(
        epochs=3,
        batch_size=32,
        micro_batch=16,
        dropout=0.2,
        drop_path=0.2,
        randaug_prob=0.5,
        mix_prob=0.5,
        ema_decay=0.9,
        ema_start_epochs=0.5,
        grad_clip=1.0,
        save_every_steps=3,
    )
    data = tiny_digits(n_train=128, n_val=32)
    full = train(tiny_cfg(tmp_path / "a", **kw), data=data, progress=False)

    cfg = tiny_cfg(tmp_path / "b", **kw)
    stopped = train(cfg, data=data, max_steps=7, progress=False)  # stopped at step 7 of 12, in epoch 2
    assert stopped.stopped_early and stopped.stop_reason == "max_steps"
    assert not (stopped.run_dir / "summary.json").exists()
    assert torch.load(stopped.run_dir / "last.pt", weights_only=True)["step"] == 7  # saved where it stopped
    resumed = train(cfg, resume=stopped.run_dir / "last.pt", data=data, progress=False)

    # Bit-exact, as the docs promise: every parameter, buffer and EMA tensor is identical.
    for name, ref in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], ref), name
    for name, ref in full.ema_model.state_dict().items():
        assert torch.equal(resumed.ema_model.state_dict()[name], ref), name
    rows = (resumed.run_dir / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    # epoch 2 was cut at its 3rd step: its loss averages all 4 steps, not only the one after the resume
    losses = [[r["train_loss"] for r in read_metrics(run.run_dir / "metrics.csv")] for run in (full, resumed)]
    assert losses[0] == losses[1]
    assert resumed.summary["val_top1"] == full.summary["val_top1"]


def test_bad_configurations_fail_before_training(tmp_path):
    data = tiny_digits(n_train=64, n_val=16)
    with pytest.raises(MNv4Error, match="fewer than `batch_size`"):
        train(tiny_cfg(tmp_path, batch_size=128), data=data, progress=False)
    with pytest.raises(MNv4Error, match="fp16 training needs CUDA"):
        train(tiny_cfg(tmp_path, precision="fp16"), data=data, progress=False)
    with pytest.raises(MNv4Error, match="not a multiple of `micro_batch`"):
        train(tiny_cfg(tmp_path, micro_batch=12), data=data, progress=False)


def test_bf16_autocast_and_channels_last_train_on_cpu(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=1, precision="bf16", channels_last=True)
    res = train(cfg, data=tiny_digits(n_train=64, n_val=32), progress=False)
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    assert res.summary["steps"] == 2


def test_cpu_training_feeds_channels_last_batches_unless_told_not_to(tmp_path):
    """The default (auto) on CPU: batches in channels_last, the layout oneDNN's convolutions train
    fastest in, with the parameters left as they are; channels_last=False keeps plain NCHW batches."""
    layouts: list[tuple[bool, bool]] = []

    class Recording(Trainer):
        def forward_loss(self, x, y):
            layouts.append((x.is_contiguous(memory_format=torch.channels_last), x.is_contiguous()))
            return super().forward_loss(x, y)

    data = tiny_digits(n_train=64, n_val=32)
    res = train(tiny_cfg(tmp_path / "auto", epochs=1), data=data, progress=False, trainer=Recording)
    assert layouts == [(True, False)] * 2
    assert all(p.is_contiguous() for p in res.model.parameters())
    layouts.clear()
    train(tiny_cfg(tmp_path / "off", epochs=1, channels_last=False), data=data, progress=False, trainer=Recording)
    assert layouts == [(False, True)] * 2


@pytest.mark.slow
def test_three_digits_epochs_evaluate_far_above_chance(tmp_path):
    # 66 steps: BatchNorm's running variance used to keep ~10x its initial 1.0 in the deep layers (whose
    # batch variance is ~1e-4), so this run evaluated at 10% (chance) while its training loss fell.
    cfg = resolve_config("quick", epochs=3, input_size=16, output=str(tmp_path / "run"))
    result = train(cfg, progress=False, log=lambda msg: None)
    assert result.summary["steps"] == 66
    assert result.summary["val_top1_final"] > 50.0  # 77% here; chance is 10%


@pytest.mark.slow
def test_cli_train_eval_plot_predict_on_an_image_folder(tmp_path, capsys):
    # A real folder (PNG files from the digits) with one broken file, driven through the CLI.
    tr, _ = digits_split(0.2, seed=0, size=16)
    root = tmp_path / "imgs"
    for i in range(200):
        im, y = tr[i]
        (root / f"digit{y}").mkdir(parents=True, exist_ok=True)
        im.save(root / f"digit{y}" / f"{i}.png")
    (root / "digit3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    conf = tmp_path / "cfg.yaml"
    conf.write_text(json.dumps({"model": TINY.to_dict(), "input_size": 16, "epochs": 2}))
    out = tmp_path / "run"
    argv = ["train", "--config", str(conf), "--data", str(root), "--batch-size", "32", "--output", str(out)]
    assert main([*argv, "--set", "lr=0.004", "--no-progress", "--val-split", "0.25"]) == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "skipped 1 unreadable image" in captured.out
    assert "epoch 2/2" in captured.out and "best val top-1" in captured.out
    s = json.loads((out / "summary.json").read_text())
    assert s["dataset"] == "imgs" and s["skipped_images"] == 1 and s["input_size"] == 16

    assert main(["eval", "--checkpoint", s["best_checkpoint"], "--data", str(root), "--val-split", "0.25"]) == 0
    text = capsys.readouterr().out
    assert "top-1" in text and (out / "best-confusion.png").stat().st_size > 1000
    assert main(["plot", str(out)]) == 0 and (out / "curves.png").stat().st_size > 1000
    assert main(["predict", str(root / "digit7"), "--checkpoint", s["best_checkpoint"], "--topk", "1"]) == 0
    assert "digit" in capsys.readouterr().out  # class names travel with the checkpoint


def test_cli_resume_continues_the_saved_run(tmp_path, capsys, monkeypatch):
    conf = tmp_path / "cfg.json"
    conf.write_text(json.dumps({"model": TINY.to_dict(), "epochs": 1, "batch_size": 64}))
    out = tmp_path / "run"
    monkeypatch.setattr("mnv4.data.digits.DigitsDataset.__len__", lambda self: min(len(self.targets), 128))
    argv = ["train", "--config", str(conf), "--output", str(out), "--no-progress", "--input-size", "16"]
    assert main([*argv, "--max-steps", "1", "--save-every-steps", "1"]) == 0
    assert "--resume" in capsys.readouterr().out
    assert main(["train", "--resume", "--output", str(out), "--no-progress"]) == 0
    assert "resuming at step 1" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    assert "already finished" in capsys.readouterr().err


def test_recipe_without_data_and_sync_bn_messages(tmp_path, capsys):
    assert main(["train", "--recipe", "paper-conv-small", "--output", str(tmp_path / "x")]) == 2
    assert "no default dataset" in capsys.readouterr().err
    with pytest.raises(MNv4Error, match="SyncBatchNorm has no CPU kernels"):
        train(tiny_cfg(tmp_path, sync_bn=True, device="cpu"), data=tiny_digits(64, 16), progress=False)


class _Code:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoint_files_store_plain_tensors_only(tmp_path, capsys):
    """last.pt loads with weights_only=True and holds only tensors and plain Python values; a resume file
    that needs code to unpickle is refused without running it."""
    cfg = tiny_cfg(tmp_path, epochs=1)
    res = train(cfg, data=tiny_digits(n_train=64, n_val=16), progress=False)
    sd = load_file(str(res.run_dir / "best.safetensors"))
    assert "classifier.weight" in sd and sd["classifier.weight"].shape[0] == 10
    state = torch.load(res.run_dir / "last.pt", weights_only=True)

    def leaves(x):
        if isinstance(x, dict):
            assert all(isinstance(k, (str, int)) for k in x)
            for v in x.values():
                yield from leaves(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from leaves(v)
        else:
            yield x

    found = list(leaves(state))
    assert any(isinstance(v, torch.Tensor) for v in found)
    assert all(isinstance(v, (torch.Tensor, str, int, float, bool, type(None))) for v in found)
    with pytest.raises(MNv4Error, match="not an mnv4 training checkpoint"):
        (tmp_path / "bad.pt").write_bytes(b"junk")
        train(cfg, resume=tmp_path / "bad.pt", data=tiny_digits(64, 16), progress=False)
    torch.save({**state, "model": _Code()}, tmp_path / "code.pt")
    with pytest.raises(MNv4Error, match="not an mnv4 training checkpoint"):
        train(cfg, resume=tmp_path / "code.pt", data=tiny_digits(64, 16), progress=False)
    assert "code ran" not in capsys.readouterr().out


def test_finetune_recipe_starts_from_a_checkpoint_with_a_new_classifier(tmp_path):
    first = train(tiny_cfg(tmp_path / "pre", epochs=1), data=tiny_digits(64, 16), progress=False)
    tr, va = digits_split(0.2, seed=0, size=16)
    keep_tr = [i for i, t in enumerate(tr.targets) if t < 5][:64]
    keep_va = [i for i, t in enumerate(va.targets) if t < 5][:16]
    tr.images, tr.targets = tr.images[keep_tr], [tr.targets[i] for i in keep_tr]
    va.images, va.targets = va.images[keep_va], [va.targets[i] for i in keep_va]
    five = DataBundle("five", tr, va, ["zero", "one", "two", "three", "four"], 16)
    with pytest.raises(MNv4Error, match="starts from pretrained weights"):
        train(resolve_config("finetune", batch_size=32), data=five, progress=False)
    cfg = resolve_config("finetune", checkpoint=str(first.run_dir / "best.safetensors"), epochs=1, batch_size=32)
    cfg = cfg.__class__.from_dict({**cfg.to_dict(), "output": str(tmp_path / "ft")})
    with pytest.warns(UserWarning, match="classifier is freshly initialised"):
        res = train(cfg, data=five, progress=False)
    assert res.model.spec.name == "tiny_train" and res.model.num_classes == 5  # architecture from the file
    assert mnv4.create_model(checkpoint=res.summary["best_checkpoint"]).class_names[-1] == "four"


@pytest.mark.slow
def test_resume_is_bit_exact_with_loader_workers(tmp_path):
    kw = dict(epochs=2, batch_size=32, randaug_prob=0.5, mix_prob=0.5, dropout=0.2, workers=2)
    data = tiny_digits(n_train=96, n_val=32)
    full = train(tiny_cfg(tmp_path / "a", **kw), data=data, progress=False)
    cfg = tiny_cfg(tmp_path / "b", **kw)
    stopped = train(cfg, data=data, max_steps=4, progress=False)
    resumed = train(cfg, resume=stopped.run_dir, data=data, progress=False)
    for name, ref in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], ref), name
