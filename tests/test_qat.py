"""Quantization-aware training (the ``qat`` recipe, mnv4.models.fake_quant): the fake quantization is the
INT8 routes' arithmetic, a QAT run resumes bit-exactly, and QAT beats default PTQ on a trained fixture."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch

import mnv4
from mnv4.models.fake_quant import attach_fake_quant, detach_fake_quant, has_fake_quant
from mnv4.train import resolve_config, train

from .conftest import require
from .outlier_channel import add_outlier_channel
from .test_train import TINY, tiny_digits


def test_fake_quant_is_int8_arithmetic_and_keeps_the_state_dict():
    model = mnv4.create_model(TINY, num_classes=4).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x)
    assert attach_fake_quant(model) == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    assert list(model.state_dict()) == keys and has_fake_quant(copy.deepcopy(model))  # EMA copies quantize too
    conv = model.classifier
    with torch.no_grad():
        q = model(x)
        # the classifier's weight as it computes: at most 255 distinct levels per output row, on a 1/127 grid
        w = conv.weight
        scale = w.abs().amax(1, keepdim=True) / 127
        from mnv4.models.fake_quant import fake_quant_weight

        levels = fake_quant_weight(w) / scale
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert not torch.equal(q, ref) and torch.nn.functional.cosine_similarity(q.flatten(), ref.flatten(), 0) > 0.9
    detach_fake_quant(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def _base_checkpoint(tmp_path, data, epochs: int = 16) -> str:
    torch.set_num_threads(1)
    cfg = resolve_config(
        "quick", model=TINY.to_dict(), epochs=epochs, batch_size=64, lr=4e-3, dropout=0.0, output=str(tmp_path / "base")
    )
    return train(cfg, data=data, progress=False).summary["best_checkpoint"]


def test_qat_run_resumes_bit_exactly(tmp_path):
    data = tiny_digits(n_train=128, n_val=32)
    ckpt = _base_checkpoint(tmp_path, data, epochs=1)
    kw = dict(checkpoint=ckpt, epochs=2, batch_size=32, save_every_steps=3, hflip=0.0, ema_decay=0.9)
    full = train(resolve_config("qat", output=str(tmp_path / "a"), **kw), data=data, progress=False)
    assert has_fake_quant(full.model)
    cfg = resolve_config("qat", output=str(tmp_path / "b"), **kw)
    stopped = train(cfg, data=data, max_steps=5, progress=False)
    assert stopped.stopped_early
    resumed = train(cfg, resume=stopped.run_dir / "last.pt", data=data, progress=False)
    for name, ref in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], ref), name
    assert resumed.summary["val_top1"] == full.summary["val_top1"]


# The outlier channel's scales to try, mildest first: the first that costs default PTQ >= 1 point of top-1 is
# used. How much a scale costs varies with the trained weights (seed, optimizer kernel, layout); a much
# larger scale than needed leaves the other channels too few INT8 levels for a short QAT to win back.
OUTLIER_SCALES = (30.0, 50.0, 70.0, 100.0, 150.0, 200.0)


@pytest.mark.slow
def test_qat_beats_default_ptq_on_a_trained_fixture(tmp_path):
    """A tiny model trained on digits at 16 px, given an activation outlier channel that keeps its
    function, quantized fully (every layer INT8 on ONNX Runtime), loses accuracy to default PTQ; a short
    QAT fine-tune of it, quantized the same way, recovers more. The outlier makes the loss a property
    of the fixture rather than of the training trajectory (which optimizer kernels and seeds move)."""
    require("onnxruntime")
    from mnv4.data.transforms import eval_transform
    from mnv4.deploy.export import export
    from mnv4.deploy.formats import load_runner
    from mnv4.deploy.parity import ParityError

    data = tiny_digits(n_train=1000, n_val=359)
    model = mnv4.create_model(checkpoint=_base_checkpoint(tmp_path, data)).eval()
    tf = eval_transform(model.preprocess)
    xs = torch.stack([tf(data.val[i][0]) for i in range(len(data.val))])
    ys = np.array([data.val[i][1] for i in range(len(data.val))])
    calib = torch.stack([tf(data.train[i][0]) for i in range(128)])

    def accuracies(model) -> tuple[float, float]:
        with torch.no_grad():
            fp32 = float((model(xs).argmax(1).numpy() == ys).mean())
        out = tmp_path / "q.onnx"
        # 8-bit weights, the grid QAT trains on, on every CPU: without VNNI the export's default is 7-bit
        # (docs/deploy.md, "INT8 on CPUs without VNNI"), which would judge QAT on a grid it never saw.
        with contextlib.suppress(ParityError):  # the cosine bar is not the question: top-1 is, measured below
            export(model, "onnx", out, precision="int8", calib_data=calib, int8_all_layers=True, min_top1=0.0,
                   samples=8, verbose=False, reduce_range="off")  # fmt: skip
        return fp32, float((load_runner(out)(xs.numpy()).argmax(1) == ys).mean())

    with torch.no_grad():
        before = model(xs)
    for scale in OUTLIER_SCALES:
        fixture = copy.deepcopy(model)
        add_outlier_channel(fixture, fixture.stages[3][0].bn, fixture.final_conv.conv, calib, scale)
        with torch.no_grad():  # the float function is unchanged: the fixture is fair
            torch.testing.assert_close(fixture(xs), before, rtol=1e-4, atol=1e-4)
        fp32, ptq = accuracies(fixture)
        if fp32 - ptq >= 0.01:
            break
    model = fixture
    assert fp32 >= 0.8, f"the fixture did not learn ({fp32:.1%})"
    mnv4.save_model(model, tmp_path / "outlier.safetensors")
    # 8 epochs at 1e-3 (the recipe: 3 at 1e-4, for real datasets) give the 120-step fine-tune room to win back
    # what rounding costs; checked with both AdamW kernels and seeds 0-3 (7 of 8 combinations pass, seed 0 both).
    cfg = resolve_config(
        "qat", checkpoint=str(tmp_path / "outlier.safetensors"), epochs=8, batch_size=64, hflip=0.0, lr=1e-3,
        output=str(tmp_path / "q"),
    )  # fmt: skip
    qat_model = mnv4.create_model(checkpoint=train(cfg, data=data, progress=False).summary["best_checkpoint"]).eval()
    qat_fp32, qat_int8 = accuracies(qat_model)
    assert ptq < fp32, f"default PTQ lost nothing ({ptq:.1%} vs {fp32:.1%}): not a fixture where PTQ loses"
    assert qat_int8 > ptq, f"QAT INT8 {qat_int8:.1%} vs default PTQ {ptq:.1%}"
    assert qat_fp32 - qat_int8 < fp32 - ptq  # and its own INT8 loss is smaller
