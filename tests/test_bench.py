"""``mnv4 bench``: request validation before any process starts, the runtime list from the format
table, one process per measurement, the Markdown/CSV table and the Pareto plot."""

from __future__ import annotations

import csv
import math
import os
import subprocess

import pytest
import torch

import mnv4.deploy.bench as bench_mod
from mnv4.deploy.bench import (
    TORCH_RUNTIMES,
    BenchRow,
    Measurement,
    all_runtimes,
    available_runtimes,
    bench,
    check_bench_request,
    measure_in_subprocess,
    pareto_plot,
    run_one,
    runtime_precisions,
    write_table,
)
from mnv4.deploy.formats import FORMATS, PRECISIONS
from mnv4.deploy.requests import BenchRequest
from mnv4.errors import InvalidValue, MNv4Error
from mnv4.models.meta import weights_meta
from mnv4.perf import profile
from mnv4.perf.latency import LatencyProtocol

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_runtimes_come_from_the_format_table():
    assert all_runtimes() == [*TORCH_RUNTIMES, *(f.runtime for f in FORMATS.values())]
    assert runtime_precisions("onnxruntime") == FORMATS["onnx"].precisions == ("fp32", "fp16", "int8")
    assert runtime_precisions("litert") == ("fp32", "int8") and runtime_precisions("torch-fused") == ("fp32",)
    have = available_runtimes()
    assert set(TORCH_RUNTIMES) <= set(have)
    for f in FORMATS.values():
        assert (f.runtime in have) == (f.installed() and f.can_run())


@pytest.fixture
def no_subprocess(monkeypatch):
    """Any attempt to start a measurement process fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a subprocess was started for an invalid request")

    monkeypatch.setattr(subprocess, "run", refuse)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(models=["nope"]), InvalidValue, "`models` 'nope' is invalid: choose one of mnv4_conv_small"),
        (dict(models=[]), MNv4Error, "no models to benchmark"),
        (dict(runtimes=["tflite"]), InvalidValue, "`runtimes` 'tflite' is invalid: choose from torch, torch-fused"),
        (dict(runtimes=[]), MNv4Error, "no runtimes to benchmark"),
        (dict(precisions=["fp64"]), InvalidValue, "`precisions` 'fp64' is invalid: choose from fp32, fp16, bf16, int8"),
        (dict(precisions=[]), MNv4Error, "no precisions to benchmark"),
        (dict(runs=0), InvalidValue, "`runs` 0 is invalid: must be >= 1"),
        (dict(repeats=0), InvalidValue, "`repeats` 0 is invalid: must be >= 1"),
        (dict(warmup=-1), InvalidValue, "`warmup` -1 is invalid: must be >= 0"),
        (dict(threads=0), InvalidValue, "`threads` 0 is invalid: must be >= 1"),
        (dict(budget_s=-1.0), InvalidValue, "`budget_s` -1.0 is invalid: must be >= 0"),
        (dict(input_size=8), InvalidValue, "`input_size` 8 is invalid: must be >= 16"),
        (dict(timeout=-1.0), InvalidValue, "`timeout` -1.0 is invalid"),
        # valid pieces, but nothing to measure: torch runs fp32 only
        (dict(runtimes=["torch"], precisions=["int8"]), MNv4Error, "nothing to measure: .*torch: fp32"),
        (dict(calib_dir="/nonexistent/calib"), MNv4Error, "calibration folder not found: /nonexistent/calib"),
    ],
)
def test_bad_requests_fail_before_any_process_starts(no_subprocess, kwargs, error, message):
    kw = dict(models=["mnv4_conv_small"], runtimes=["torch"], precisions=["fp32"])
    kw.update(kwargs)
    with pytest.raises(error, match=message):
        bench(**kw)


def test_a_named_runtime_that_cannot_run_is_an_error(no_subprocess, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "openvino" else real(n, *a))
    with pytest.raises(MNv4Error, match=r"pip install 'mnv4\[openvino\]'"):
        bench(models=["mnv4_conv_small"], runtimes=["openvino"])
    # a precision whose package is missing (OpenVINO INT8 needs nncf) names its extra too
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "nncf" else real(n, *a))
    with pytest.raises(MNv4Error, match=r"nncf.*pip install 'mnv4\[openvino\]'"):
        bench(models=["mnv4_conv_small"], runtimes=["openvino", "torch"], precisions=["fp32", "int8"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "openvino" else real(n, *a))
    # among the defaults, a missing runtime is skipped instead
    todo = check_bench_request(BenchRequest(("mnv4_conv_small",), None, ("fp32",)))
    assert "openvino" not in {m.runtime for m in todo} and "torch" in {m.runtime for m in todo}
    if not FORMATS["coreml"].can_run():
        with pytest.raises(MNv4Error, match="coreml cannot run on this platform"):
            bench(models=["mnv4_conv_small"], runtimes=["coreml"])


def test_request_expands_to_the_supported_combinations():
    todo = check_bench_request(BenchRequest(("mnv4_conv_small", "mobilenet_v2"), ("torch", "pt2"), PRECISIONS))
    assert [(m.model_name, m.runtime, m.precision) for m in todo] == [
        ("mnv4_conv_small", "torch", "fp32"),
        ("mnv4_conv_small", "torch", "bf16"),
        ("mnv4_conv_small", "pt2", "fp32"),
        ("mnv4_conv_small", "pt2", "fp16"),
        ("mnv4_conv_small", "pt2", "bf16"),
        ("mobilenet_v2", "torch", "fp32"),
        ("mobilenet_v2", "torch", "bf16"),
        ("mobilenet_v2", "pt2", "fp32"),
        ("mobilenet_v2", "pt2", "fp16"),
        ("mobilenet_v2", "pt2", "bf16"),
    ]


def test_every_measurement_failing_is_a_failed_command(monkeypatch, tmp_path, capsys):
    from mnv4.cli import main

    monkeypatch.setattr(bench_mod, "measure_in_subprocess", lambda m: bench_mod.error_row(m, "boom"))
    rows = bench(models=["mnv4_conv_small"], runtimes=["torch"], progress=False)
    assert [(r.model, r.error) for r in rows] == [("mnv4_conv_small", "boom")]
    args = ["bench", "-m", "mnv4_conv_small", "--runtimes", "torch", "-o", str(tmp_path), "--no-progress"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "failed: boom" in captured.out and "no measurement succeeded" in captured.err


def test_cli_bench_errors_name_the_flags(no_subprocess, tmp_path, capsys):
    from mnv4.cli import main

    base = ["bench", "-m", "mnv4_conv_small", "-o", str(tmp_path), "--no-progress"]
    assert main([*base, "--precisions", "fp64"]) == 2
    assert "--precisions 'fp64' is invalid" in capsys.readouterr().err
    assert main([*base, "--runtimes", "tflite"]) == 2
    assert "--runtimes 'tflite' is invalid" in capsys.readouterr().err
    assert main([*base, "-m", "nope"]) == 2
    assert "--model 'nope' is invalid" in capsys.readouterr().err
    assert main([*base, "--budget", "-1"]) == 2
    assert "--budget -1.0 is invalid: must be >= 0" in capsys.readouterr().err  # 0: no budget
    (tmp_path / "file.txt").write_text("x")
    assert main([*base, "-o", str(tmp_path / "file.txt" / "b")]) == 2  # before any measuring (no_subprocess)
    assert "file.txt is a file, so no folder can be made under it" in capsys.readouterr().err


def test_a_hung_measurement_becomes_an_error_row():
    row = measure_in_subprocess(Measurement("mnv4_conv_small", "torch", "fp32", BenchRequest(input_size=64)), 0.01)
    assert math.isnan(row.median_ms) and row.error == "timed out after 0 s"
    assert row.resolution == 64 and row.top1 == row.top1  # the zoo's published figure is kept


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
    torch.set_flush_denormal(False)


def test_run_one_in_process(restore_threads):
    # one thread: two spinning OpenMP threads on a busy 2-core machine can take seconds
    protocol = LatencyProtocol(runs=3, repeats=2, warmup=1, budget_s=None)
    row = run_one(
        Measurement("mnv4_conv_small", "torch", "fp32", BenchRequest(input_size=64, threads=1, protocol=protocol))
    )
    assert row.median_ms > 0 and math.isfinite(row.spread) and not row.error
    assert (row.runs, row.repeats, row.resolution, row.threads) == (3, 2, 64, 1)
    assert torch.get_num_threads() == 1  # the protocol pins the thread count
    assert row.macs == profile("mnv4_conv_small", 64).macs
    assert row.params == sum(p.numel() for p in __import__("mnv4").create_model("mnv4_conv_small").parameters())
    assert 60 < row.top1 < 90 and "Tab. 6" in row.top1_source  # a published figure, with its source
    assert "BatchNorm statistics re-estimated" in row.weights  # timed with realistic activations


def test_artefacts_made_only_to_be_timed_are_removed(restore_threads, monkeypatch, tmp_path):
    """Without artefact_dir, run_one's export and bench's folder live in a temporary folder removed when
    done (they were left in the system temp folder, one per run)."""
    pytest.importorskip("onnxruntime")
    import tempfile
    from pathlib import Path

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    protocol = LatencyProtocol(runs=2, repeats=1, warmup=0, budget_s=None)
    request = BenchRequest(input_size=64, threads=1, protocol=protocol)
    row = run_one(Measurement("mnv4_conv_small_035", "onnxruntime", "fp32", request))
    assert row.median_ms > 0 and not row.error and "top-1" in row.parity
    assert list(tmp_path.iterdir()) == []
    seen = []

    def fake(m, timeout=None):
        folder = Path(m.request.artefact_dir)
        (folder / "m.onnx").write_bytes(b"artefact")
        seen.append(folder)
        return row

    monkeypatch.setattr(bench_mod, "measure_in_subprocess", fake)
    assert bench(models=["mnv4_conv_small_035"], runtimes=["onnxruntime"], threads=1, progress=False) == [row]
    assert seen and seen[0].parent == tmp_path and list(tmp_path.iterdir()) == []


def test_zoo_build_gives_realistic_activations():
    from mnv4.deploy.zoo import build

    model, entry = build("mobilenet_v3_small", input_size=64)
    meta = weights_meta(model)
    assert entry.source == "torchvision" and meta.random and meta.bn_images == 32 and meta.source is None
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert y.std().item() > 1e-3  # default BN statistics would leave ~1e-10 here
    raw, _ = build("mobilenet_v3_small", realistic=False)
    with torch.no_grad():
        assert raw(torch.randn(2, 3, 64, 64)).std().item() < 1e-3


@pytest.mark.slow
def test_bench_one_process_per_measurement(tmp_path):
    # torch has no int8 route, so only fp32 rows, each measured in its own process
    rows = bench(
        models=["mnv4_conv_small_035", "mobilenet_v3_small"],
        runtimes=["torch"],
        precisions=("fp32", "int8"),
        input_size=64,
        runs=2,
        repeats=1,
        warmup=0,
        budget_s=None,
        artefact_dir=tmp_path,
        progress=False,
    )
    assert [(r.model, r.precision) for r in rows] == [("mnv4_conv_small_035", "fp32"), ("mobilenet_v3_small", "fp32")]
    for r in rows:
        assert r.median_ms > 0 and not r.error and (r.runs, r.repeats, r.resolution) == (2, 1, 64)
    assert math.isnan(rows[0].top1)  # a registered variant without a published accuracy
    assert rows[1].top1 > 60


def _rows():
    ok = BenchRow("mnv4_conv_small", "torch", "fp32", 224, 5.4321, 0.03, 100, 5, 2, 186_000_000, 3_774_024, 73.8, "P")
    fast = BenchRow("mobilenet_v2", "onnxruntime", "int8", 224, 2.5, 0.1, 100, 5, 2, 300_000_000, 3_500_000, 71.9, "T")
    nan = math.nan
    bad = BenchRow("mnv4_conv_large", "openvino", "int8", 384, nan, nan, 0, 0, 2, 0, 0, 82.9, "P", "", "boom: it broke")
    untrained = BenchRow("mnv4_conv_small_035", "torch", "fp32", 224, 1.0, 0.0, 10, 1, 2, 48_000_000, 1, nan, "")
    return [ok, fast, bad, untrained]


def test_write_table(tmp_path):
    rows = _rows()
    text = write_table(rows, tmp_path / "bench.md", tmp_path / "bench.csv")
    assert (tmp_path / "bench.md").read_text() == text
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows) + 3  # the table, then the CPU and (int8 rows) its int8 line
    assert lines[-2].startswith("CPU: ") and lines[-1].startswith("int8: ")
    assert lines[2] == ("| mnv4_conv_small | torch | fp32 | 224 | 0.186 | 5.43 | 3% | 100x5 | 73.8 (P) | - |")
    assert "| failed: boom: it broke |" in lines[4]
    assert lines[5].split("|")[9].strip() == "-"  # no published accuracy
    with open(tmp_path / "bench.csv", newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["model"] for r in back] == [r.model for r in rows]
    assert list(back[0]) == list(BenchRow.__dataclass_fields__)
    assert float(back[0]["median_ms"]) == 5.4321 and int(back[0]["macs"]) == 186_000_000
    assert math.isnan(float(back[2]["median_ms"])) and back[2]["error"] == "boom: it broke"
    assert write_table(rows, None, None) == text


def test_pareto_plot(tmp_path):
    out = pareto_plot(_rows(), tmp_path / "p" / "pareto.png", title="t")
    assert out == tmp_path / "p" / "pareto.png" and out.read_bytes()[:8] == PNG_MAGIC


def test_rows_whose_repeats_disagree_are_flagged():
    from mnv4.deploy.bench import NOISY_SPREAD

    rows = _rows()
    rows[1].spread = 0.6  # repeats of 2.0 and 3.5 ms around a 2.5 ms median: a busy machine
    lines = write_table(rows, None, None).splitlines()
    assert lines[3].split("|")[7].strip() == "60% noisy" and lines[2].split("|")[7].strip() == "3%"
    assert lines[4].split("|")[7].strip() == "-"  # a failed row has no spread
    assert lines[-1].startswith(f"noisy: the repeats' means differ by more than {NOISY_SPREAD:.0%}")
    rows[1].spread = 0.1
    assert "noisy" not in write_table(rows, None, None)


@pytest.mark.parametrize(("load", "cpus", "warned"), [(0.2, 2, False), (3.5, 2, True), (5.0, 16, False)])
def test_busy_machine_warning(monkeypatch, load, cpus, warned):
    from mnv4.deploy.bench import machine_load_warning

    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    warning = machine_load_warning(2)
    assert (warning is not None) == warned
    if warned:
        assert f"load average {load:.1f} on {cpus} CPUs" in warning and "--threads" in warning
