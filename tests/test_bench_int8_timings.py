"""benchmarks/int8.py's timing cache: an artefact rewritten since it was timed is timed again, the others are
read back (docs/deploy.md, the INT8 timings in rounds)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_int8", ROOT / "benchmarks" / "int8.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.pop("runtimes", None)
    spec.loader.exec_module(module)
    return module


def test_rewritten_artefacts_are_timed_again(tmp_path, monkeypatch):
    bench = _load()
    calls = []

    def fake_time(spec):
        calls.append(Path(spec["path"]).name)
        return {"median_ms": 1.0 + len(calls), "runs": 10}

    monkeypatch.setattr(bench, "_time_in_child", fake_time)
    base, a, b = (tmp_path / n for n in ("base.safetensors", "a.onnx", "b.onnx"))
    for f in (base, a, b):
        f.write_bytes(b"x")
    rows = [
        {"route": "onnx", "variant": "fp32", "path": str(a), "precision": "fp32"},
        {"route": "onnx", "variant": "ptq", "path": str(b), "precision": "int8"},
    ]
    args = SimpleNamespace(threads=1, res=32, runs=10, repeats=1, rounds=2)
    first = bench.time_stage(args, rows, str(base), tmp_path)
    assert sorted(calls) == sorted(["base.safetensors", "a.onnx", "b.onnx"] * 2)
    assert all(len(first[k]["round_ms"]) == 2 for k in ("torch-fused", "onnx_fp32", "onnx_ptq"))

    calls.clear()
    again = bench.time_stage(args, rows, str(base), tmp_path)  # nothing changed: all read back
    assert calls == [] and again == first

    b.write_bytes(b"rewritten")  # a new INT8 artefact (other size and time): only it is timed again
    st = b.stat()
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = bench.time_stage(args, rows, str(base), tmp_path)
    assert calls == ["b.onnx", "b.onnx"]
    assert third["onnx_fp32"] == first["onnx_fp32"] and third["onnx_ptq"]["round_ms"] != first["onnx_ptq"]["round_ms"]
    assert json.loads((tmp_path / "timings.json").read_text()) == third

    calls.clear()  # a new timing protocol (the runner changed how it times): everything is timed again
    monkeypatch.setattr(sys.modules["runtimes"], "TIMING_PROTOCOL", sys.modules["runtimes"].TIMING_PROTOCOL + 1)
    bench.time_stage(args, rows, str(base), tmp_path)
    assert sorted(calls) == sorted(["base.safetensors", "a.onnx", "b.onnx"] * 2)
