"""The profiler's per-layer table: MACs agree with torch's FLOP counter, bytes follow the dtype."""

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


def test_bytes_scale_with_dtype_and_batch():
    fp32 = profile("mnv4_conv_small", resolution=224, dtype="float32")
    fp16 = profile("mnv4_conv_small", resolution=224, dtype="float16")
    int8 = profile("mnv4_conv_small", resolution=224, dtype="int8")
    assert fp32.bytes == 2 * fp16.bytes == 4 * int8.bytes
    assert fp32.weight_bytes == 4 * sum(layer.params for layer in fp32.layers)
    batch4 = profile("mnv4_conv_small", resolution=224, batch_size=4)
    assert batch4.macs == 4 * fp32.macs and batch4.weight_bytes == fp32.weight_bytes
    with pytest.raises(ValueError, match="dtype"):
        profile("mnv4_conv_small", dtype="float64")


def test_per_layer_numbers_for_a_known_conv():
    stem = profile("mnv4_conv_small", resolution=224).layers[0]
    assert stem.name == "stem.conv" and stem.out_shape == (1, 32, 112, 112)
    assert stem.macs == 112 * 112 * 32 * 3 * 9
    assert stem.activation_bytes == 4 * (3 * 224 * 224 + 32 * 112 * 112)
    assert stem.intensity == pytest.approx(stem.macs / stem.bytes)


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
