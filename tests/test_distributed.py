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
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import mnv4
from mnv4.models.specs import ModelSpec, cn, uib

TINY = ModelSpec(
    name="tiny_ddp",
    stem=cn(3, 2, 8),
    stages=((cn(3, 2, 8),), (uib(3, 3, 2, 16, 2.0), uib(0, 3, 1, 16, 2.0)), (uib(3, 0, 2, 16, 2.0),), (cn(1, 1, 16),)),
    num_features=32,
    head_hidden_size=32,
)


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow
def test_two_process_torchrun_matches_single_process_with_accumulation(tmp_path):
    conf = tmp_path / "tiny.json"
    conf.write_text(
        json.dumps({"model": TINY.to_dict(), "input_size": 16, "dropout": 0.0, "lr": 0.01, "lr_scaling": "none"})
    )
    common = ["train", "--config", str(conf), "--batch-size", "32", "--epochs", "0.25", "--no-progress"]
    single = subprocess.run(
        [sys.executable, "-m", "mnv4.cli", *common, "--micro-batch", "16", "--output", str(tmp_path / "one")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    assert "16 x 2 accumulation x 1 process(es)" in single.stdout

    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mnv4.cli"]
    ddp = subprocess.run(
        [*launch, *common, "--output", str(tmp_path / "two")], env=_env(), capture_output=True, text=True, timeout=300
    )
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
