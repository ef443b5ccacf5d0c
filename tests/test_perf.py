"""The profiler's per-layer table: MACs agree with torch's FLOP counter, bytes follow the dtype."""

import math
import statistics
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mnv4
from mnv4.perf import profile


def test_layer_sum_equals_whole_model_flop_count(tiny_hybrid_spec):
    model = mnv4.create_model(tiny_hybrid_spec).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 48, 64))
    prof = profile(model, resolution=(48, 64))
    assert prof.macs == counter.get_total_flops() // 2
    assert prof.params == sum(p.numel() for p in model.parameters())
    kinds = {layer.kind for layer in prof.layers}
    assert kinds == {"conv", "pwconv", "dwconv", "linear", "attention"}


def test_profile_leaves_the_model_untouched():
    model = mnv4.create_model("mnv4_conv_small")
    before = model.stem.conv.weight.clone()
    profile(model, resolution=96)
    assert model.stem.conv.weight.device.type == "cpu" and torch.equal(model.stem.conv.weight, before)


def test_counts_of_a_hand_built_net():
    """Every number worked out by hand for conv3x3 (3->8, no bias) + BN + ReLU + conv1x1 (8->4, bias) at 10x10."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)
    )
    fp32 = profile(net, resolution=10)
    # conv3x3: out 8x8x8; MACs 8*8*8 * 3*9 = 13,824; weights 8*3*9 = 216; activations 3*10*10 + 8*8*8 = 812
    # conv1x1: out 4x8x8; MACs 8*8*4 * 8 = 2,048; weights 32 + 4 bias = 36; activations 8*8*8 + 4*8*8 = 768
    rows = [(layer.kind, layer.out_shape, layer.macs, layer.params) for layer in fp32.layers]
    assert rows == [("conv", (1, 8, 8, 8), 13_824, 216), ("pwconv", (1, 4, 8, 8), 2_048, 36)]
    assert fp32.params == 216 + 16 + 36  # BatchNorm's weight and bias count as parameters, not as a layer
    assert (fp32.weight_bytes, fp32.activation_bytes) == (4 * 252, 4 * (812 + 768))
    assert [layer.intensity for layer in fp32.layers] == pytest.approx([13_824 / 4_112, 2_048 / 3_216])  # 4*(216+812)
    int8 = profile(net, resolution=10, dtype="int8")
    assert (int8.weight_bytes, int8.activation_bytes) == (252, 1_580)
    assert profile(net, resolution=10, dtype="float16").bytes == 2 * (252 + 1_580)
    batch4 = profile(net, resolution=10, batch_size=4)  # activations and MACs per image, weights once
    assert (batch4.macs, batch4.weight_bytes, batch4.activation_bytes) == (4 * 15_872, 4 * 252, 4 * 4 * 1_580)
    with pytest.raises(ValueError, match="dtype"):
        profile(net, dtype="float64")


def test_per_layer_numbers_for_a_known_conv():
    stem = profile("mnv4_conv_small", resolution=224).layers[0]  # conv3x3 s2, 3 -> 32, no bias
    assert stem.name == "stem.conv" and stem.out_shape == (1, 32, 112, 112)
    assert stem.macs == 112 * 112 * 32 * 3 * 9 == 10_838_016
    assert (stem.weight_bytes, stem.activation_bytes) == (4 * 864, 4 * (3 * 224 * 224 + 32 * 112 * 112))
    assert stem.intensity == pytest.approx(10_838_016 / 2_211_200)  # about 4.9 MACs per byte


def test_mobile_mqa_worked_example():
    """docs/architecture.md §4: Hybrid-M's stage-4 Mobile MQA at 16x16x160 (4 heads x 64, K/V stride 2)."""
    from mnv4.models.blocks import MobileMQA

    prof = profile(MobileMQA(160, heads=4, key_dim=64, value_dim=64, kv_stride=2), resolution=16)
    assert [layer.macs for layer in prof.layers] == [
        256 * 160 * 256,  # query projection: 10.49M
        8 * 8 * 160 * 9,  # key down-sampling, a DW3x3 s2
        64 * 160 * 64,  # key projection on the 8x8 map
        8 * 8 * 160 * 9,  # value down-sampling
        64 * 160 * 64,  # value projection
        256 * 4 * 64 * (64 + 64),  # attention: scores and weighted sum
        256 * 256 * 160,  # output projection
    ]
    assert prof.macs == 30_855_168  # the 30.9 MMACs the docs quote


def test_macs_grow_with_resolution():
    # docs/architecture.md §4: Conv-M is 0.828 GMACs at 224 and 1.080 at 256
    assert round(profile("mnv4_conv_medium", resolution=224).macs / 1e9, 3) == 0.828


def test_alternating_medians_times_every_candidate_each_round():
    from mnv4.perf.latency import alternating_medians

    calls = {"a": 0, "b": 0}

    def make(key, sleep_s):
        def fn(_x):
            calls[key] += 1
            time.sleep(sleep_s)

        return fn

    out = alternating_medians({"a": make("a", 0.0), "b": make("b", 0.004)}, None, rounds=3, iters=2)
    assert set(out) == {"a", "b"} and calls == {"a": 2 + 3 * 2, "b": 2 + 3 * 2}
    assert out["b"] > out["a"] and out["b"] >= 4.0  # ms per call


def test_alternating_rounds_thread_clock_leaves_out_waiting():
    from mnv4.perf.latency import alternating_rounds

    def busy(_x):
        end = time.thread_time() + 0.003
        while time.thread_time() < end:
            pass

    fns = {"sleep": lambda _x: time.sleep(0.003), "busy": busy}
    wall = alternating_rounds(fns, None, rounds=2, iters=2)
    cpu = alternating_rounds(fns, None, rounds=2, iters=2, clock="thread")
    assert min(wall["sleep"]) >= 3.0 and max(cpu["sleep"]) < 1.0  # a sleep waits: no CPU time
    assert min(cpu["busy"]) >= 3.0
    with pytest.raises(ValueError, match="clock"):
        alternating_rounds(fns, None, clock="cpu")


def test_paired_ratio_sign_test_against_the_binomial_distribution():
    from scipy.stats import binomtest

    from mnv4.perf.latency import paired_ratio

    a = [1.0, 0.9, 0.95, 1.1, 0.8, 0.7, 0.9, 0.85, 0.99, 1.2]  # 8 of 10 rounds faster
    b = [1.0 if i != 0 else 1.05 for i in range(10)]
    out = paired_ratio(a, b)
    faster = sum(x < y for x, y in zip(a, b))
    assert out["a_faster"] == faster == 8 and out["rounds"] == 10
    assert math.isclose(out["sign_p"], binomtest(faster, 10, 0.5).pvalue, rel_tol=1e-9)
    assert out["median"] == statistics.median(x / y for x, y in zip(a, b))
    assert out["min"] == 0.7 and math.isclose(out["max"], 1.2)
    even = paired_ratio([1.0, 2.0, 1.0, 2.0], [1.5] * 4)  # two faster, two slower: no evidence either way
    assert even["sign_p"] == 1.0 and even["a_faster"] == 2
