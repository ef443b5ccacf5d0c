"""torchrun on CPU (gloo): distillation from soft-label shards with 2 processes trains like 1 process with the
same global batch (see tests/test_distributed.py for why the two can agree); the mixing sampler hands each
rank its slice of every mixed global batch, and the student's flips are seeded per record."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import mnv4
from mnv4.distill.labelling import LabelConfig, label

from .cli_run import run_mnv4
from .distill_helpers import TINY, color_teacher, make_folder


@pytest.mark.slow
def test_two_process_distillation_matches_single_process(tmp_path):
    make_folder(tmp_path / "photos" / "train", per_class=8, seed=1)
    make_folder(tmp_path / "photos" / "val", per_class=4, seed=2)
    make_folder(tmp_path / "pool", per_class=8, flat=True, seed=3)
    common = dict(teacher="colornet", shard_size=32, check_images=0, record_size=20)
    label(
        LabelConfig(data=str(tmp_path / "photos"), out=str(tmp_path / "d1"), replicas=2, **common),
        progress=False,
        teacher=color_teacher(),
    )
    label(
        LabelConfig(data=str(tmp_path / "pool"), out=str(tmp_path / "d3"), **common),
        progress=False,
        teacher=color_teacher(),
    )
    conf = tmp_path / "tiny.json"
    conf.write_text(
        json.dumps({"model": TINY.to_dict(), "input_size": 16, "dropout": 0.0, "lr": 0.01, "lr_scaling": "none"})
    )
    common_args = [
        "train",
        "--recipe",
        "distill",
        "--config",
        str(conf),
        "--distill",
        str(tmp_path / "d1"),
        "--distill",
        str(tmp_path / "d3"),
        "--mix",
        "1:3",
        "--data",
        str(tmp_path / "photos"),
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--no-progress",
    ]
    single = run_mnv4([*common_args, "--micro-batch", "16", "--output", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-2000:]
    assert "16 x 2 accumulation x 1 process(es)" in single.stdout
    ddp = run_mnv4([*common_args, "--output", str(tmp_path / "two")], processes=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "16 x 1 accumulation x 2 process(es)" in ddp.stdout and ddp.stdout.count("epoch 1/1") == 1

    a = load_file(str(tmp_path / "one" / "last.safetensors"))
    b = load_file(str(tmp_path / "two" / "last.safetensors"))
    params = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(params) > 20
    for k in params:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["distill"]["mix"] == "1:3"  # (48 + 24) records // 32
    torch.manual_seed(0)  # the trainer's initial weights (seed 0)
    init = mnv4.create_model(TINY, num_classes=3).state_dict()
    moved = max((a[k] - init[k]).abs().max().item() for k in params)
    assert moved > 1e-3  # training moved the weights, so agreement within 1e-4 means something


@pytest.mark.slow
def test_torchrun_labelling_splits_shards_and_matches_one_process(tmp_path):
    make_folder(tmp_path / "photos", per_class=6, bad=True)
    teacher = mnv4.create_model(TINY, num_classes=3)
    teacher.class_names = ["blue", "green", "red"]
    mnv4.save_model(teacher, tmp_path / "t.safetensors")
    args = [
        "distill",
        "label",
        "--teacher",
        str(tmp_path / "t.safetensors"),
        "--data",
        str(tmp_path / "photos"),
        "--teacher-size",
        "24",
        "--replicas",
        "2",
        "--shard-size",
        "8",
        "--batch-size",
        "4",
        "--threads",
        "1",
        "--no-progress",
    ]
    one = run_mnv4([*args, "-o", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_mnv4([*args, "-o", str(tmp_path / "two")], processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote 36 records in 5 shards") == 1  # rank 0 reports, once all shards exist
    a = json.loads((tmp_path / "one" / "manifest.json").read_text())
    b = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]] and len(a["shards"]) == 5
    assert a["records"] == b["records"] == 36 and b["skipped_records"] == 2
