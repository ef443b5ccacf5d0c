"""torchrun on CPU (gloo): a 2-process search must equal a 1-process search with accumulation.

Each rank trains on its half of every global batch and evaluates its half of every reward batch;
the single process runs the same halves as two micro-batches. BatchNorm normalises each half with
its own statistics in both cases, the reward's correct counts are summed over ranks, and every
rank draws the same architectures from generators seeded by (seed, step), so the controllers see
the same rewards and the shared weights the same gradients (up to float summation order).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from .cli_run import run_mnv4
from .nas_common import tiny_space


@pytest.mark.slow
def test_two_process_search_matches_single_process_with_accumulation(tmp_path):
    space = tmp_path / "tiny.json"
    space.write_text(json.dumps(tiny_space().to_dict()))
    common = ["search", "--data", "digits", "--space", str(space), "--target-macs", "0.15", "--input-size", "16"]
    common += ["--epochs", "0.6", "-b", "64", "--eval-subnets", "1", "--no-progress", "--coarse-fraction", "0.5"]
    single = run_mnv4([*common, "--micro-batch", "32", "-o", "one"], timeout=600, cwd=tmp_path)
    assert single.returncode in (0, 3), single.stderr[-2000:]
    ddp = run_mnv4([*common, "-o", "two"], processes=2, timeout=600, cwd=tmp_path)
    assert ddp.returncode in (0, 3), ddp.stderr[-3000:]
    assert "32 x 1 accumulation x 2 process(es)" in ddp.stdout
    assert ddp.stdout.count("spec: two/spec.json") == 1  # only rank 0 reports

    h1 = [json.loads(x) for x in (tmp_path / "one" / "history.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (tmp_path / "two" / "history.jsonl").read_text().splitlines()]
    assert [r.get("arch") for r in h1] == [r.get("arch") for r in h2]
    assert sum("reward" in r for r in h1) > 5
    for a, b in zip(h1, h2):
        if "reward" in a:
            assert abs(a["reward"] - b["reward"]) < 1e-6
    assert json.loads((tmp_path / "one" / "spec.json").read_text()) == json.loads(
        (tmp_path / "two" / "spec.json").read_text()
    )
    a = load_file(str(tmp_path / "one" / "supernet.safetensors"))
    b = load_file(str(tmp_path / "two" / "supernet.safetensors"))
    params = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for k in params:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)
