"""benchmarks/detection.py's stages: the timing stage alone never starts a training (docs/detection.md,
"Measured")."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_detection", ROOT / "benchmarks" / "detection.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_detection"] = module
    spec.loader.exec_module(module)
    return module


def _args(work: Path, stages: set[str]) -> SimpleNamespace:
    return SimpleNamespace(
        work=str(work),
        size=64,
        epochs=1,
        batch_size=2,
        lr=None,
        workers=0,
        device="cpu",
        backbone_checkpoint=None,
        stages=stages,
    )


def test_cost_stage_alone_refuses_an_untrained_row(tmp_path):
    bench = _load()
    with pytest.raises(SystemExit, match="not trained yet; run the same command with --stages train first"):
        bench.run_one(_args(tmp_path, {"cost"}), "bccd", None, "ssdlite-mnv4-conv-s", 0)
    assert not (tmp_path / "bccd").exists()  # nothing started: no run folder, no lock


def test_cost_stage_alone_reads_a_trained_row(tmp_path):
    bench = _load()
    folder = tmp_path / "bccd" / "ssdlite-mnv4-conv-s" / "seed0"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"wall_seconds": 12.5}))
    (folder / "eval.json").write_text(json.dumps({"AP": 0.4, "AP50": 0.6, "AP_small": 0.0}))
    row = bench.run_one(_args(tmp_path, {"cost"}), "bccd", None, "ssdlite-mnv4-conv-s", 0)
    assert row == {"AP": 0.4, "AP50": 0.6, "AP_small": 0.0, "train_s": 12.5}
