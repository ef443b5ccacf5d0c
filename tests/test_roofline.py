"""The roofline model and hardware profiles, `mnv4 roofline`: formulas checked by hand, and models
whose roofline ranking differs from their MAC ranking, so the roofline is told from a MAC count."""

import json
import math

import numpy as np
import pytest

from mnv4.cli import main
from mnv4.errors import MNv4Error
from mnv4.models.registry import get_entry
from mnv4.models.specs import ModelSpec, cn, fib
from mnv4.perf import profile
from mnv4.perf.hardware import (
    BUILTIN_PROFILES,
    PAPER_LATENCIES_MS,
    HardwareProfile,
    get_profile,
    load_profile,
)
from mnv4.perf.latency import LatencyProtocol
from mnv4.perf.roofline import (
    fit_hardware,
    plot_sweep,
    predict_latency,
    ridge_sweep,
    roofline_units,
    spearman,
    sweep_points,
)

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


def test_builtin_profiles_reproduce_paper_rankings_and_scale():
    for name, paper in PAPER_LATENCIES_MS.items():
        models = list(paper)
        pred = [predict_latency(m, name, get_entry(m).default_preprocess.input_size).latency_ms for m in models]
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


def test_predict_latency_is_the_hand_formula():
    from mnv4.perf.counting import LayerStats, Profile

    layers = [  # a compute-bound layer (20 MACs/byte) and a memory-bound one (1 MAC/byte)
        LayerStats("a", "conv", (1, 8, 4, 4), macs=2_000_000, params=0, weight_bytes=40_000, activation_bytes=60_000),
        LayerStats("b", "pwconv", (1, 8, 4, 4), macs=100_000, params=0, weight_bytes=0, activation_bytes=100_000),
    ]
    hw = HardwareProfile("h", peak_macs=1e9, bandwidth=1e8)  # ridge point 10 MACs/byte
    pred = predict_latency(Profile("p", (4, 4), 1, "int8", 0, layers), hw)
    # a: max(2e6 / 1e9, 1e5 / 1e8) = 2 ms of compute; b: max(1e5 / 1e9, 1e5 / 1e8) = 1 ms of memory
    assert pred.layers == [("a", pytest.approx(2e-3), False), ("b", pytest.approx(1e-3), True)]
    assert (pred.latency_s, pred.compute_s, pred.memory_s) == pytest.approx((3e-3, 2e-3, 1e-3))
    assert pred.memory_bound_fraction == pytest.approx(1 / 3)


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
    with pytest.raises(MNv4Error, match="`normalize` '[a-z_]*' is invalid: give 'macs' or one of"):
        ridge_sweep(named, rps, normalize="nope")


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([1, 2, 3, 4, 5], [10, 20, 30, 40, 50], 1.0),
        ([1, 2, 3, 4, 5], [5, 4, 3, 2, 1], -1.0),
        ([1, 2, 3, 4], [1, 2, 1e6, 1e7], 1.0),  # ranks, not values
        # ties share their average rank: Pearson of ranks [1, 2.5, 2.5, 4] and [1, 2, 3, 4] is
        # 4.5 / sqrt(4.5 * 5) (deviations [-1.5, 0, 0, 1.5] and [-1.5, -0.5, 0.5, 1.5])
        ([1, 2, 2, 3], [1, 2, 3, 4], math.sqrt(0.9)),
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


# Two models built so that MACs and bytes disagree: a wide classifier (few MACs, many weight bytes)
# and a full-resolution early conv stack (many MACs, few bytes).
WIDE_FC = ModelSpec(
    name="wide_fc",
    stem=cn(3, 2, 8),
    stages=((cn(3, 2, 8),), (cn(3, 2, 16),), (cn(3, 2, 16),), (cn(3, 2, 16),)),
    num_features=512,
    head_hidden_size=4096,
)
EARLY_MACS = ModelSpec(
    name="early_macs",
    stem=cn(3, 1, 64),
    stages=((fib(3, 1, 64, 2.0),), (cn(3, 2, 16),), (cn(3, 2, 16),), (cn(3, 2, 16),)),
    num_features=64,
    head_hidden_size=64,
)


@pytest.fixture(scope="module")
def disagreeing():
    return {s.name: profile(s, 64, dtype="int8") for s in (WIDE_FC, EARLY_MACS)}


def test_roofline_ranks_differently_from_macs(disagreeing):
    wide, early = disagreeing["wide_fc"], disagreeing["early_macs"]
    assert wide.macs * 5 < early.macs and wide.bytes > 2 * early.bytes  # the premise
    # at RP 0 the roofline is the MAC count; past the crossover the wide classifier is the slow one
    assert roofline_units(wide, 0) < roofline_units(early, 0)
    crossover = (early.macs - wide.macs) / (wide.bytes - early.bytes)  # upper bound where they swap
    assert 0 < crossover < 500
    for rp in (100.0, 347.3, 433.8):  # a memory-bound accelerator: pixel4_dsp, pixel8_edgetpu
        assert roofline_units(wide, rp) > roofline_units(early, rp), rp
    dsp, edgetpu = predict_latency(wide, "pixel8_edgetpu"), predict_latency(early, "pixel8_edgetpu")
    assert dsp.latency_s > edgetpu.latency_s and dsp.memory_bound_fraction > 0.9
    # the sweep shows the swap too
    rps, rel = ridge_sweep([wide, early], [0, 50, 200, 500], normalize="early_macs")
    assert rel["wide_fc"][0] < 1 < rel["wide_fc"][-1]


def test_fit_prefers_the_roofline_to_macs_when_they_disagree(disagreeing, mixed_profiles):
    # latencies from a memory-heavy device: Spearman(roofline) is 1, Spearman(MACs) is not
    profiles = [*mixed_profiles, *disagreeing.values()]
    device = HardwareProfile("dev", peak_macs=1e11, bandwidth=1e9, dtype="int8")  # RP 100
    lat = [predict_latency(p, device).latency_s for p in profiles]
    hw, err = fit_hardware(profiles, lat)
    pred = [predict_latency(p, hw).latency_s for p in profiles]
    assert spearman(pred, lat) == 1.0 and err < 0.02
    assert spearman([p.macs for p in profiles], lat) < 0.9


def test_plot_sweep_marks_the_devices(tmp_path, disagreeing):
    out, rps, rel = plot_sweep(list(disagreeing.values()), tmp_path / "s" / "sweep.png", max_ridge=200)
    assert out.read_bytes()[:8] == PNG_MAGIC and rps[0] == 0 and rps[-1] == 200
    assert set(rel) == {"wide_fc", "early_macs"} and rel["wide_fc"][-1] > rel["early_macs"][-1]
    devices = sorted(hw.ridge_point for hw in BUILTIN_PROFILES.values())
    assert sweep_points(500) == [0.0, devices[0], devices[1], 100.0, devices[2], devices[3], 500.0]
    with pytest.raises(MNv4Error, match="share a dtype"):
        plot_sweep([disagreeing["wide_fc"], profile(EARLY_MACS, 64)], tmp_path / "x.png")
    with pytest.raises(MNv4Error, match="`max_ridge` 0 is invalid"):
        plot_sweep(list(disagreeing.values()), tmp_path / "x.png", max_ridge=0)


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
    assert err.startswith("mnv4: error: --normalize") and err.count("\n") == 1


def test_cli_sweep_reports_only_ridge_points_it_swept(tmp_path, capsys):
    """Beyond --max-ridge the curve has no values: those devices are named, not given the curve's end."""
    out = str(tmp_path / "x.png")
    assert main(["roofline", "--sweep", "mnv4_conv_small", "--max-ridge", "10", "--output", out]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[1:] == ["RP", "0", "RP", "10"]
    assert any(line.startswith("beyond --max-ridge 10, not in the table: ") for line in lines)
    assert sweep_points(10) == [0.0, 10.0]


def test_cli_calibrate_refuses_an_unreadable_profile_name_before_measuring(tmp_path, capsys, monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a process was started"))
    models = ["mnv4_conv_small_035", "mnv4_conv_small_050", "mnv4_conv_small"]
    assert main(["roofline", "calibrate", *models, "--runtime", "torch", "--save", str(tmp_path / "fit.txt")]) == 2
    err = capsys.readouterr().err
    assert "must end in .yaml, .yml or .json" in err and err.count("\n") == 1


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


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: predict_latency("nope", "pixel6_cpu"), "unknown model 'nope'"),
        (lambda: predict_latency("mnv4_conv_small", "nope"), "unknown hardware profile 'nope'"),
        (lambda: predict_latency("mnv4_conv_small", "pixel6_cpu", resolution=0), "`resolution` 0 is invalid"),
        (lambda: predict_latency("mnv4_conv_small", "pixel6_cpu", dtype="fp64"), "`dtype` 'fp64' is invalid"),
        (lambda: profile("mnv4_conv_small", (224, -1)), "`resolution` -1 is invalid"),
        (lambda: profile("mnv4_conv_small", 64, batch_size=0), "`batch_size` 0 is invalid"),
        (lambda: ridge_sweep([profile("mnv4_conv_small", 64)], normalize="x"), "give 'macs' or one of"),
    ],
)
def test_roofline_requests_are_validated(call, message):
    with pytest.raises(MNv4Error, match=message):
        call()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(runtime="tflite"), "`runtime` 'tflite' is invalid: choose one of auto, torch, torch-fused, onnxruntime"),
        (dict(models=["mnv4_conv_small", "mnv4_conv_medium"]), "needs at least 3 models, got 2"),
        (dict(models=["mnv4_conv_small", "mobilenet_v2", "nope"]), "`models` 'nope' is invalid"),
        (dict(protocol=LatencyProtocol(runs=0)), "`runs` 0 is invalid"),
        (dict(threads=0), "`threads` 0 is invalid"),
        (dict(dtype="fp64"), "`dtype` 'fp64' is invalid"),
    ],
)
def test_calibrate_requests_fail_before_any_process(monkeypatch, kwargs, message):
    import subprocess

    from mnv4.deploy.roofline_fit import calibrate

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a process was started"))
    with pytest.raises(MNv4Error, match=message):
        calibrate(**kwargs)
