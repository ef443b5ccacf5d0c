import json
import random

import pytest

from mnv4.models.specs import MODEL_SPECS
from mnv4.nas.cost import LatencyTable, MacsCost, RooflineCost, get_cost_model, segments, space_segments
from mnv4.perf import profile
from mnv4.perf.hardware import BUILTIN_PROFILES, HardwareProfile
from mnv4.perf.roofline import predict_latency

from .nas_common import tiny_space


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_segment_costs_add_up_to_mnv4_perf_on_the_published_models(name):
    spec = MODEL_SPECS[name]
    assert MacsCost(224).cost(spec) == pytest.approx(profile(spec, 224).macs / 1e6, rel=1e-9)
    for hw in ("pixel6_cpu", "pixel8_edgetpu"):
        want = predict_latency(spec, hw, 224).latency_ms
        assert RooflineCost(hw, 224).cost(spec) == pytest.approx(want, rel=1e-9)


def test_roofline_cost_takes_a_profile_file(tmp_path):
    path = tmp_path / "board.yaml"
    HardwareProfile("board", 2e11, 1e10, "int8").save(path)
    spec = MODEL_SPECS["mnv4_conv_small"]
    cm = get_cost_model(str(path), 96, 1000, "ms")
    assert isinstance(cm, RooflineCost) and cm.name == "board"
    assert cm.cost(spec) == pytest.approx(predict_latency(spec, str(path), 96).latency_ms, rel=1e-9)
    # The same model costs more on a board with a tenth of the bandwidth (memory-bound layers).
    slow = tmp_path / "slow.yaml"
    HardwareProfile("slow", 2e11, 1e9, "int8").save(slow)
    assert get_cost_model(str(slow), 96, 1000, "ms").cost(spec) > cm.cost(spec)
    assert isinstance(get_cost_model("pixel6_cpu", 96, 10, "macs"), MacsCost)
    assert get_cost_model("s23_cpu", 96).hardware == BUILTIN_PROFILES["s23_cpu"]


def test_space_segments_cover_every_sampled_architecture():
    for space in (tiny_space(), tiny_space(True)):
        keys = {s.key for s in space_segments(space, 32, 10)}
        rng = random.Random(0)
        for _ in range(100):
            assert {s.key for s in segments(space.to_spec(space.sample(rng)), 32, 10)} <= keys


def test_latency_table_measures_caches_and_predicts(tmp_path):
    space = tiny_space()
    path = tmp_path / "table.json"
    kw = dict(path=path, runs=5, repeats=3, budget_s=0.01, warmup=1, passes=1)
    table = LatencyTable(32, 10, **kw)
    rng = random.Random(1)
    specs = [space.to_spec(space.sample(rng), f"m{i}") for i in range(3)]
    for spec in specs:
        assert table.cost(spec) > 0
    n = len(table)
    assert len(json.loads(path.read_text())["entries"]) == n  # lazily measured segments are kept on disk
    assert n == len({s.key for spec in specs for s in segments(spec, 32, 10)})
    fit = table.fit_overhead(specs[:2])
    assert set(fit) == {"overhead_ms", "models"} and len(fit["models"]) == 2
    rows = table.check(specs[2:])
    assert rows[0]["measured_ms"] > 0 and rows[0]["predicted_ms"] > 0

    # A second table with the same fingerprint reads the file instead of measuring again.
    again = LatencyTable(32, 10, **kw)
    assert len(again) == n and again.overhead() == pytest.approx(table.overhead())
    again._measure = lambda seg, passes=None: pytest.fail("measured a cached segment")
    assert again.cost(specs[0]) == pytest.approx(table.cost(specs[0]))
    # Another protocol (or machine) never reuses it.
    assert len(LatencyTable(32, 10, path=path, runs=6, repeats=3, budget_s=0.01, warmup=1, passes=1)) == 0
    data = json.loads(path.read_text())
    assert data["fingerprint"]["threads"] == 1 and len(data["entries"]) == n


def test_latency_table_build_fills_the_whole_space(tmp_path):
    space = tiny_space()
    table = LatencyTable(16, 10, path=tmp_path / "t.json", runs=2, repeats=1, budget_s=0.001, warmup=0, passes=2)
    calls = []
    table._measure = lambda seg, passes=None: calls.append(seg.key) or 0.01
    assert table.build(space, progress=False) == len(space_segments(space, 16, 10))
    assert len(calls) == 2 * len(set(calls))  # every segment once per pass (passes=2)
    assert table.build(space, progress=False) == 0
    assert table.cost(space.to_spec(space.sample(random.Random(2)))) > 0


def test_thread_clock_ignores_time_spent_off_the_cpu():
    import time

    from mnv4.nas.cost import time_ms

    def nap():
        time.sleep(0.002)

    wall = time_ms(nap, runs=5, repeats=3, warmup=0, budget_s=None, clock="wall")
    cpu = time_ms(nap, runs=5, repeats=3, warmup=0, budget_s=None, clock="thread")
    assert wall >= 1.9 and cpu < 0.5 * wall
    with pytest.raises(Exception, match="one thread"):
        LatencyTable(32, 10, threads=2, clock="thread")
