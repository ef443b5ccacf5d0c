"""torchrun on CPU (gloo): 2 processes must train like 1 process with the same global batch.

What is compared, and why it can match: the single process runs the global batch of 32 as two
micro-batches of 16 with gradient accumulation, while each of the 2 DDP ranks runs one batch of 16.
The global-batch sampler gives rank r exactly the single process's r-th micro-batch, augmentation
is seeded per sample, and BatchNorm normalises each micro-batch / rank batch with its own
statistics in both cases, so the gradients are the same up to float summation order. Parameters
are compared (within 1e-4); BN running statistics are not, because DDP keeps rank 0's (updated
from its 16 images per step) while the single process updates them from both micro-batches.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import mnv4
from mnv4.models.specs import ModelSpec, cn, uib

from .cli_run import run_mnv4

TINY = ModelSpec(
    name="tiny_ddp",
    stem=cn(3, 2, 8),
    stages=((cn(3, 2, 8),), (uib(3, 3, 2, 16, 2.0), uib(0, 3, 1, 16, 2.0)), (uib(3, 0, 2, 16, 2.0),), (cn(1, 1, 16),)),
    num_features=32,
    head_hidden_size=32,
)


@pytest.mark.slow
def test_two_process_torchrun_matches_single_process_with_accumulation(tmp_path):
    conf = tmp_path / "tiny.json"
    conf.write_text(
        json.dumps({"model": TINY.to_dict(), "input_size": 16, "dropout": 0.0, "lr": 0.01, "lr_scaling": "none"})
    )
    common = ["train", "--config", str(conf), "--batch-size", "32", "--epochs", "0.25", "--no-progress"]
    single = run_mnv4([*common, "--micro-batch", "16", "--output", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-2000:]
    assert "16 x 2 accumulation x 1 process(es)" in single.stdout

    ddp = run_mnv4([*common, "--output", str(tmp_path / "two")], processes=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "16 x 1 accumulation x 2 process(es)" in ddp.stdout
    assert ddp.stdout.count("epoch 1/1") == 1  # only rank 0 logs

    a = load_file(str(tmp_path / "one" / "last.safetensors"))
    b = load_file(str(tmp_path / "two" / "last.safetensors"))
    params = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(params) > 20
    for k in params:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["steps"] == 11

    torch.manual_seed(0)  # the trainer's initial weights (seed 0), to show training moved them
    init = mnv4.create_model(TINY, num_classes=10).state_dict()
    moved = max((a[k] - init[k]).abs().max().item() for k in params)
    assert moved > 1e-2  # so agreement within 1e-4 is meaningful


@pytest.mark.slow
def test_unreadable_images_concentrated_on_one_rank_neither_hang_nor_crash(tmp_path):
    """Rank 1's whole share of the epoch is broken except one image: it has steps with no readable
    image (it must still join the gradient all-reduce) and a step with one (BatchNorm needs two)."""
    from PIL import Image

    from mnv4.data.digits import digits_split
    from mnv4.data.sampling import GlobalBatchSampler

    tr, _ = digits_split(0.2, seed=0, size=16)
    n, batch = 32, 8
    names = [f"{i:03d}.png" for i in range(n)]  # one class folder per digit; sorted order = index order
    rank1 = {i for _, i in GlobalBatchSampler(n, batch, rank=1, world_size=2, shuffle=True, seed=0)}
    keep_one = min(rank1)
    root = tmp_path / "data"
    for c in range(10):
        (root / "train" / f"d{c}").mkdir(parents=True)
        (root / "val" / f"d{c}").mkdir(parents=True)
    # ImageFolder orders by class folder, then file name: put every training image in one folder
    # order so dataset index == our index.
    order = []
    for i in range(n):
        im, y = tr[i]
        order.append((f"d{y}", names[i]))
    order.sort()
    for idx, (cls, name) in enumerate(order):
        path = root / "train" / cls / name
        if idx in rank1 and idx != keep_one:
            path.write_bytes(b"\x89PNG\r\n\x1a\n broken")
        else:
            tr[int(name[:3])][0].save(path)
    for c in range(10):
        for j in range(2):
            Image.new("RGB", (16, 16), (c * 20, j * 50, 0)).save(root / "val" / f"d{c}" / f"{j}.png")

    conf = tmp_path / "tiny.json"
    conf.write_text(json.dumps({"model": TINY.to_dict(), "input_size": 16, "lr": 0.01, "lr_scaling": "none"}))
    args = ["train", "--config", str(conf), "--data", str(root), "--batch-size", str(batch), "--epochs", "1"]
    ddp = run_mnv4([*args, "--no-progress", "--output", str(tmp_path / "run")], processes=2, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["steps"] == n // batch and s["skipped_images"] == len(rank1) - 1  # counted over both ranks
    weights = load_file(str(tmp_path / "run" / "last.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def _mostly_broken_folder(root, good: int, broken: int, classes: int = 3):
    """``classes`` class folders, each with ``good`` readable 32 px digits and ``broken`` unreadable files."""
    from mnv4.data.digits import digits_split

    tr, _ = digits_split(0.2, seed=0, size=32)
    kept = {c: 0 for c in range(classes)}
    for i in range(len(tr)):
        y = tr.targets[i]
        if y < classes and kept[y] < good:
            (root / f"c{y}").mkdir(parents=True, exist_ok=True)
            tr[i][0].save(root / f"c{y}" / f"good{kept[y]}.png")
            kept[y] += 1
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for j in range(broken):
            (root / f"c{c}" / f"bad{j}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_mostly_unreadable_images_train_to_the_end(tmp_path, processes):
    """8 good and 40 broken images per class at batch 4: many steps hold a single readable image per
    process. Such an image used to be doubled to make a BatchNorm batch, which has no variance deep in
    the network: the gradients overflowed to NaN and the run stopped blaming the learning rate."""
    _mostly_broken_folder(tmp_path / "data", good=8, broken=40)
    args = ["train", "--data", str(tmp_path / "data"), "--batch-size", "4", "--input-size", "32", "--epochs", "2"]
    out = run_mnv4([*args, "--no-progress", "--output", str(tmp_path / "run")], processes=processes, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "not finite" not in out.stdout + out.stderr
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["steps"] == 2 * ((144 - 29) // 4)  # 3 x 48 files, 20% of them for validation
    assert 90 <= s["skipped_images"] <= 120  # of the 120 broken files, those in the training split
    weights = load_file(str(tmp_path / "run" / "last.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_too_few_readable_images_say_so(tmp_path, capsys):
    """One readable image in the whole set: no step can train; the error says why, not "lower lr"."""
    from mnv4.cli import main
    from mnv4.data.digits import digits_split

    _mostly_broken_folder(tmp_path / "data", good=0, broken=10)
    digits_split(0.2, seed=0, size=16)[0][0][0].save(tmp_path / "data" / "c0" / "good.png")
    conf = tmp_path / "tiny.json"
    conf.write_text(json.dumps({"model": TINY.to_dict(), "input_size": 16}))
    args = ["train", "--config", str(conf), "--data", str(tmp_path / "data"), "--batch-size", "4", "--epochs", "1"]
    assert main([*args, "--no-progress", "--output", str(tmp_path / "run")]) != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in last and "too few images of data can be read" in last, last
