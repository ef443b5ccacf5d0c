"""The roofline model, hardware profiles, `mnv4 roofline` and `mnv4 bench`: formulas checked by hand."""

import csv
import json
import math

import numpy as np
import pytest
import torch

import mnv4
from mnv4.cli import main
from mnv4.deploy.bench import BenchRow, bench, pareto_plot, run_one, write_table
from mnv4.errors import MNv4Error
from mnv4.perf import profile
from mnv4.perf.hardware import (
    _ANCHORED_PEAKS,
    BUILTIN_PROFILES,
    PAPER_LATENCIES_MS,
    PAPER_RESOLUTIONS,
    HardwareProfile,
    anchor_peak,
    get_profile,
    load_profile,
)
from mnv4.perf.roofline import fit_hardware, predict_latency, ridge_sweep, roofline_units, spearman

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tiny_profiles(tiny_hybrid_spec):
    """int8 profiles of the tiny net at a few resolutions (different memory/compute mixes)."""
    return [profile(tiny_hybrid_spec, r, dtype="int8") for r in (32, 64, 96)]


# --- hardware profiles ------------------------------------------------------------------------------


def test_builtin_ridge_points_are_the_papers():
    paper = {"pixel6_cpu": 31.2, "s23_cpu": 39.7, "pixel4_dsp": 347.3, "pixel8_edgetpu": 433.8}
    assert set(BUILTIN_PROFILES) == set(paper)
    for name, rp in paper.items():
        hw = get_profile(name)
        assert hw is BUILTIN_PROFILES[name] and hw.dtype == "int8"
        assert hw.ridge_point == pytest.approx(rp, rel=1e-12)
        assert hw.peak_macs == _ANCHORED_PEAKS[name]


def test_anchored_peaks_match_anchor_peak():
    for name, peak in _ANCHORED_PEAKS.items():
        assert anchor_peak(name) == pytest.approx(peak, rel=0.02), name


def test_builtin_profiles_reproduce_paper_rankings_and_scale():
    for name, paper in PAPER_LATENCIES_MS.items():
        models = list(paper)
        pred = [predict_latency(m, name, PAPER_RESOLUTIONS[m]).latency_ms for m in models]
        measured = [paper[m] for m in models]
        assert spearman(pred, measured) == 1.0, name
        # anchoring: geometric mean of predicted / measured is 1
        log_ratio = np.mean([math.log(p / m) for p, m in zip(pred, measured)])
        assert abs(log_ratio) < 0.02, name


def test_profile_from_ridge_and_dict():
    hw = HardwareProfile.from_ridge("b", 25.0, 2e11)
    assert hw.bandwidth == 8e9 and hw.ridge_point == 25.0 and hw.to_dict()["ridge_point"] == 25.0
    d = HardwareProfile.from_dict({"peak_macs": "1e11", "ridge_point": 50})
    assert d.name == "custom" and d.dtype == "int8" and d.bandwidth == pytest.approx(2e9)


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_profile_file_round_trip(tmp_path, suffix):
    hw = HardwareProfile("board", 1.234567891e11, 3.3e9 / 7, "float16", "measured by hand")
    path = hw.save(tmp_path / f"hw{suffix}")
    assert load_profile(path) == hw
    assert get_profile(str(path)) == hw
    assert (path.stat().st_mode & 0o777) == 0o644


def test_profile_yaml_as_documented(tmp_path):
    # the format in hardware.py's docstring; PyYAML reads 2.0e11 as a string, which must still work
    (tmp_path / "my.yaml").write_text("peak_macs: 2.0e11\nbandwidth: 8.0e9\ndtype: int8\n")
    hw = load_profile(tmp_path / "my.yaml")
    assert hw == HardwareProfile("my", 2e11, 8e9, "int8")  # name defaults to the file stem
    assert hw.ridge_point == 25.0


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"name": "x", "peak_macs": 1e11}', "needs peak_macs and bandwidth"),
        ('{"peak_macs": "fast", "bandwidth": 1e9}', "needs peak_macs and bandwidth"),
        ('{"peak_macs": 1e11, "bandwidth": 1e9, "dtype": "float64"}', "dtype must be one of"),
        ('{"peak_macs": 0, "bandwidth": 1e9}', "must be positive"),
        ('{"peak_macs": 1e11, "bandwidth": -1}', "must be positive"),
        ('{"peak_macs": 1e11, "ridge_point": 0}', "ridge_point must be positive"),
        ('{"peak_macs": 1e11, "ridge_point": -5}', "must be positive"),
        ("[1, 2]", "must hold a mapping"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_profile_files(tmp_path, text, message):
    path = tmp_path / "hw.json"
    path.write_text(text)
    with pytest.raises(MNv4Error, match=message):
        load_profile(path)


def test_bad_yaml_and_missing_profile(tmp_path):
    (tmp_path / "bad.yaml").write_text("peak_macs: [1\nx: :")
    with pytest.raises(MNv4Error, match="not valid YAML"):
        load_profile(tmp_path / "bad.yaml")
    with pytest.raises(MNv4Error, match="hardware profile file not found"):
        get_profile(str(tmp_path / "missing.yaml"))
    with pytest.raises(MNv4Error, match="unknown hardware profile 'nonexistent'; built in: pixel6_cpu"):
        get_profile("nonexistent")


# --- roofline ---------------------------------------------------------------------------------------


def test_predict_latency_is_the_hand_formula(tiny_hybrid_spec):
    prof = profile(tiny_hybrid_spec, 64, dtype="int8")
    hw = HardwareProfile("h", peak_macs=3e9, bandwidth=1e8)  # RP 30: a mix of both kinds of layer
    pred = predict_latency(prof, hw)
    expected = [max(layer.macs / 3e9, layer.bytes / 1e8) for layer in prof.layers]
    assert pred.latency_s == pytest.approx(sum(expected), rel=1e-12)
    assert [t for _, t, _ in pred.layers] == pytest.approx(expected, rel=1e-12)
    mem = [layer.bytes / 1e8 > layer.macs / 3e9 for layer in prof.layers]
    assert [m for _, _, m in pred.layers] == mem and 0 < sum(mem) < len(mem)
    assert pred.compute_s + pred.memory_s == pytest.approx(pred.latency_s)
    assert pred.memory_s == pytest.approx(sum(t for t, m in zip(expected, mem) if m))
    assert pred.latency_ms == pytest.approx(pred.latency_s * 1e3)
    # the units form divides out the peak: latency = units(RP) / peak
    assert roofline_units(prof, hw.ridge_point) / hw.peak_macs == pytest.approx(pred.latency_s, rel=1e-12)
    # a model, a spec, or a name are profiled at the hardware's dtype, like the Profile above
    assert predict_latency(tiny_hybrid_spec, hw, 64).latency_s == pytest.approx(pred.latency_s, rel=1e-12)
    model = mnv4.create_model(tiny_hybrid_spec)
    assert predict_latency(model, hw, 64).latency_s == pytest.approx(pred.latency_s, rel=1e-12)


def test_predict_latency_defaults_to_native_resolution():
    by_name = predict_latency("mnv4_conv_small", "pixel6_cpu")
    explicit = predict_latency(profile("mnv4_conv_small", 224, dtype="int8"), BUILTIN_PROFILES["pixel6_cpu"])
    assert by_name.latency_s == explicit.latency_s and by_name.hardware == "pixel6_cpu"


def test_dtype_changes_memory_bound_time_only(tiny_hybrid_spec):
    memory_bound = HardwareProfile("mem", peak_macs=1e15, bandwidth=1e6)  # every layer memory-bound
    int8 = predict_latency(tiny_hybrid_spec, memory_bound, 64)  # the profile's dtype: int8
    fp32 = predict_latency(tiny_hybrid_spec, memory_bound, 64, dtype="float32")
    fp16 = predict_latency(tiny_hybrid_spec, memory_bound, 64, dtype="float16")
    assert int8.memory_s == int8.latency_s and int8.compute_s == 0
    assert fp32.latency_s == pytest.approx(4 * int8.latency_s, rel=1e-12)
    assert fp16.latency_s == pytest.approx(2 * int8.latency_s, rel=1e-12)
    compute_bound = HardwareProfile("mac", peak_macs=1e9, bandwidth=1e15)
    a = predict_latency(tiny_hybrid_spec, compute_bound, 64)
    b = predict_latency(tiny_hybrid_spec, compute_bound, 64, dtype="float32")
    macs = profile(tiny_hybrid_spec, 64).macs
    assert a.latency_s == b.latency_s == pytest.approx(macs / 1e9) and a.memory_s == 0


def test_ridge_sweep(tiny_profiles):
    rps = [0, 1, 5, 20, 50, 100, 300, 500, 1e4]
    named = []
    for r, p in zip((32, 64, 96), tiny_profiles):
        p.model = f"tiny_{r}"
        named.append(p)
    out_rps, rel = ridge_sweep(named, rps)
    assert list(out_rps) == rps
    assert set(rel) == {"tiny_32", "tiny_64", "tiny_96"}
    for p in named:
        y = rel[p.model]
        assert y[0] == 1.0
        assert np.all(np.diff(y) >= 0) and y[-1] > 1
        assert y * p.macs == pytest.approx([roofline_units(p, rp) for rp in rps], rel=1e-12)
    _, rel_to = ridge_sweep(named, rps, normalize="tiny_64")
    assert np.array_equal(rel_to["tiny_64"], np.ones(len(rps)))
    expected = np.array([roofline_units(named[2], rp) / roofline_units(named[1], rp) for rp in rps])
    assert rel_to["tiny_96"] == pytest.approx(expected, rel=1e-12)
    default_rps, _ = ridge_sweep(named[:1])
    assert default_rps[0] == 0 and default_rps[-1] == 500 and len(default_rps) == 251
    with pytest.raises(MNv4Error, match="normalize must be 'macs' or one of"):
        ridge_sweep(named, rps, normalize="nope")


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([1, 2, 3, 4, 5], [10, 20, 30, 40, 50], 1.0),
        ([1, 2, 3, 4, 5], [5, 4, 3, 2, 1], -1.0),
        ([1, 2, 3, 4], [1, 2, 1e6, 1e7], 1.0),  # ranks, not values
        ([1, 2, 2, 3], [1, 2, 3, 4], 0.9486832980505138),  # ties share their average rank
        ([1, 1, 1], [1, 2, 3], 0.0),  # no variation
    ],
)
def test_spearman_known_cases(a, b, expected):
    assert spearman(a, b) == pytest.approx(expected, abs=1e-12)


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 6, size=12).astype(float)  # plenty of ties
        b = a + rng.normal(0, 2, size=12)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


@pytest.fixture(scope="module")
def mixed_profiles():
    """Models whose layers span a wide range of intensities, so the ridge point is identifiable."""
    models = ("mnv4_conv_small_035", "mnv4_conv_small", "mnv4_hybrid_medium")
    return [profile(m, r, dtype="int8") for m in models for r in (96, 224)]


@pytest.mark.parametrize("ridge", [10.0, 30.0, 57.0])  # below the highest layer intensity (~140)
def test_fit_hardware_recovers_a_known_profile(mixed_profiles, ridge):
    true = HardwareProfile("true", peak_macs=5e10, bandwidth=5e10 / ridge, dtype="int8")
    lat = [predict_latency(p, true).latency_s for p in mixed_profiles]
    hw, err = fit_hardware(mixed_profiles, lat, name="fit")  # default log grid: ~3% steps
    assert hw.name == "fit" and hw.dtype == "int8" and type(hw.bandwidth) is float
    assert hw.ridge_point == pytest.approx(ridge, rel=0.05)
    assert hw.peak_macs == pytest.approx(5e10, rel=0.05)
    assert hw.bandwidth == pytest.approx(true.bandwidth, rel=0.05)
    assert err < 0.02
    exact, err = fit_hardware(mixed_profiles, lat, ridge_points=[3.0, ridge, 1000.0])
    assert exact.ridge_point == pytest.approx(ridge, rel=1e-9) and exact.peak_macs == pytest.approx(5e10, rel=1e-9)
    assert err < 1e-9
    assert [predict_latency(p, exact).latency_s for p in mixed_profiles] == pytest.approx(lat, rel=1e-9)


def test_fitted_profile_saves_as_yaml(mixed_profiles, tmp_path):
    lat = [predict_latency(p, "pixel6_cpu").latency_s for p in mixed_profiles]
    hw, _ = fit_hardware(mixed_profiles, lat, name="fit")
    assert load_profile(hw.save(tmp_path / "fit.yaml")) == hw


# --- mnv4 roofline ----------------------------------------------------------------------------------


def test_cli_roofline_table(tmp_path, capsys):
    assert main(["roofline", "mnv4_conv_small", "--hardware", "pixel6_cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["model", "res", "GMACs", "pixel6_cpu", "(RP", "31.2)", "ms"]
    ms = predict_latency("mnv4_conv_small", "pixel6_cpu").latency_ms
    assert out[2].split()[:4] == ["mnv4_conv_small", "224", "0.186", f"{ms:.2f}"] and len(out) == 3
    user = HardwareProfile("board", 1e11, 1e9, "float32").save(tmp_path / "board.yaml")
    assert main(["roofline", "mnv4_conv_small", "--hardware", "pixel6_cpu", "--hardware", str(user)]) == 0
    out = capsys.readouterr().out
    assert "board (RP 100.0) ms" in out
    ms = predict_latency(profile("mnv4_conv_small", 224, dtype="float32"), load_profile(user)).latency_ms
    assert f"{ms:.2f} (" in out


def test_cli_roofline_table_takes_baselines(capsys):
    from mnv4.deploy.zoo import build

    assert main(["roofline", "mobilenet_v2", "--hardware", "s23_cpu"]) == 0
    row = capsys.readouterr().out.splitlines()[2].split()
    ms = predict_latency(build("mobilenet_v2")[0], "s23_cpu", 224).latency_ms
    assert row[:4] == ["mobilenet_v2", "224", "0.301", f"{ms:.2f}"]


def test_cli_roofline_sweep(tmp_path, capsys):
    png = tmp_path / "sub" / "x.png"
    assert main(["roofline", "--sweep", "mnv4_conv_small", "mnv4_conv_medium", "--output", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["model", "RP", "0"] and "RP 433.8" in out[0]
    rows = {line.split()[0]: line.split()[1:] for line in out[2:4]}
    assert set(rows) == {"mnv4_conv_small", "mnv4_conv_medium"}
    assert rows["mnv4_conv_small"][0] == "1.00" and rows["mnv4_conv_medium"][0] == "1.00"
    assert float(rows["mnv4_conv_small"][-1]) > 1.0
    assert out[-1] == f"wrote {png}"
    args = ["roofline", "--sweep", "mnv4_conv_small", "mnv4_conv_medium", "--output", str(png)]
    assert main([*args, "--normalize", "mnv4_conv_small"]) == 0
    lines = capsys.readouterr().out.splitlines()
    small = [line for line in lines if line.startswith("mnv4_conv_small")]
    assert small[0].split()[1:] == ["1.00"] * lines[0].count("RP")


def test_cli_roofline_errors(tmp_path, capsys):
    assert main(["roofline", "mnv4_conv_small", "--hardware", "nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mnv4: error: unknown hardware profile 'nonexistent'") and err.count("\n") == 1
    assert "Traceback" not in err
    (tmp_path / "bad.yaml").write_text("peak_macs: 1e11\n")
    assert main(["roofline", "mnv4_conv_small", "--hardware", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "needs peak_macs and bandwidth" in err and err.count("\n") == 1
    out = str(tmp_path / "x.png")
    assert main(["roofline", "--sweep", "mnv4_conv_small", "--normalize", "nope", "--output", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mnv4: error: normalize must be") and err.count("\n") == 1


# --- mnv4 bench -------------------------------------------------------------------------------------


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
    assert len(lines) == 2 + len(rows)
    assert lines[2] == ("| mnv4_conv_small | torch | fp32 | 224 | 0.186 | 5.43 | 0.03 | 100x5 | 73.8 (P) | - |")
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


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_run_one_in_process(restore_threads):
    # one thread: two spinning OpenMP threads on a busy 2-core machine can take seconds
    row = run_one("mnv4_conv_small", "torch", threads=1, runs=3, repeats=2, warmup=1, budget_s=None, resolution=64)
    assert row.median_ms > 0 and math.isfinite(row.spread) and not row.error
    assert (row.runs, row.repeats, row.resolution, row.threads) == (3, 2, 64, 1)
    assert torch.get_num_threads() == 1  # the protocol pins the thread count
    assert row.macs == profile("mnv4_conv_small", 64).macs and row.params == 3_774_024
    assert (row.top1, row.top1_source) == (73.8, "MNv4 paper Tab. 6")


def test_run_one_and_bench_reject_bad_requests():
    with pytest.raises(MNv4Error, match="unknown runtime 'tflite'"):
        run_one("mnv4_conv_small", "tflite")
    with pytest.raises(MNv4Error, match="torch has no int8 route"):
        run_one("mnv4_conv_small", "torch", precision="int8")
    with pytest.raises(MNv4Error, match="unknown benchmark model 'nope'"):
        run_one("nope", "torch")
    with pytest.raises(MNv4Error, match="none of the requested runtimes is installed"):
        bench(["mnv4_conv_small"], ["tflite"])


@pytest.mark.slow
def test_bench_one_process_per_measurement(tmp_path):
    # torch has no int8 route, so only fp32 rows; the unknown model fails in its own process only
    rows = bench(
        ["mnv4_conv_small_035", "nope"],
        ["torch"],
        precisions=("fp32", "int8"),
        resolution=64,
        runs=2,
        repeats=1,
        warmup=0,
        budget_s=None,
        artefact_dir=tmp_path,
        progress=False,
    )
    assert [(r.model, r.precision) for r in rows] == [("mnv4_conv_small_035", "fp32"), ("nope", "fp32")]
    ok, bad = rows
    assert ok.median_ms > 0 and not ok.error and (ok.runs, ok.repeats, ok.resolution) == (2, 1, 64)
    assert math.isnan(ok.top1)  # a registered variant without a published accuracy
    assert math.isnan(bad.median_ms) and "unknown benchmark model 'nope'" in bad.error


@pytest.mark.slow
def test_cli_calibrate_then_use_the_profile(tmp_path, capsys):
    saved = tmp_path / "this.yaml"
    models = ["mnv4_conv_small_035", "mnv4_conv_small_050", "mnv4_conv_small"]
    args = ["roofline", "calibrate", *models, "--runtime", "torch", "--runs", "2", "--repeats", "1"]
    assert main([*args, "--save", str(saved)]) == 0
    out = capsys.readouterr().out
    for m in models:
        assert f"\n{m} " in out
    assert "fitted this_machine (torch, float32)" in out and "Spearman(roofline, measured)" in out
    hw = load_profile(saved)
    assert hw.name == "this_machine" and hw.dtype == "float32" and hw.ridge_point > 0
    assert "fitted by mnv4 roofline calibrate" in hw.source
    assert main(["roofline", "mnv4_conv_small", "--hardware", str(saved)]) == 0
    ms = predict_latency(profile("mnv4_conv_small", 224, dtype="float32"), hw).latency_ms
    assert f"{ms:.2f} (" in capsys.readouterr().out
    data = json.loads(json.dumps(hw.to_dict()))
    assert HardwareProfile.from_dict(data) == hw
