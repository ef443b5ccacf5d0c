"""BatchNorm recalibration: random-weight models get a trained model's activation scale back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mnv4
from mnv4.errors import MNv4Error
from mnv4.models import has_default_bn_stats, noise_batches, recalibrate_batchnorm
from mnv4.models.meta import weights_meta


def _bn_output_stds(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, float], float]:
    """(std of every BatchNorm's eval-mode output, std of the logits) on ``x``."""
    stds: dict[str, float] = {}
    hooks = [
        bn.register_forward_hook(lambda mod, args, out, n=n: stds.__setitem__(n, out.std().item()))
        for n, bn in model.named_modules()
        if isinstance(bn, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    return stds, logits.std().item()


# (model, every BN output's std before is below, after is above): the hybrid's layer scale (1e-5)
# keeps its stride-32 trunk at ~1e-5, where BN's eps (1e-5) bounds what renormalising can restore.
@pytest.mark.parametrize(
    "name, before, after",
    [("mnv4_conv_small", 1e-6, 0.5), pytest.param("mnv4_hybrid_medium", 1e-20, 1e-5, marks=pytest.mark.slow)],
)
def test_random_model_activations_get_their_scale_back(name, before, after):
    res = 64
    model = mnv4.create_model(name).eval()
    x = torch.randn(4, 3, res, res, generator=torch.Generator().manual_seed(123))
    assert has_default_bn_stats(model)
    torch.set_flush_denormal(True)  # the denormal slow path would take a minute (it is the problem)
    try:
        stds, logits = _bn_output_stds(model, x)
    finally:
        torch.set_flush_denormal(False)
    assert min(stds.values()) < before  # eval-mode activations sink towards (or into) denormals
    recalibrate_batchnorm(model, noise_batches(res, batches=2, batch_size=8))
    stds, logits = _bn_output_stds(model, x)
    assert min(stds.values()) > after and max(stds.values()) < 10
    # classifier weights are N(0, 0.01): unit-scale pre-logits give logits of ~0.1-1
    assert 0.02 < logits < 10, logits
    assert not has_default_bn_stats(model) and not model.training
    meta = weights_meta(model)
    assert (meta.bn_batches, meta.bn_images) == (2, 16)


def test_statistics_are_the_plain_average_of_the_batches():
    bn = nn.BatchNorm2d(3, momentum=0.1)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), bn, nn.Dropout(0.9)).train()
    batches = [torch.randn(4, 3, 5, 5) * (i + 1) + i for i in range(3)]
    recalibrate_batchnorm(model, batches)
    with torch.no_grad():
        acts = [model[0](b) for b in batches]
    mean = torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0)
    var = torch.stack([a.var((0, 2, 3), unbiased=True) for a in acts]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5) and torch.allclose(bn.running_var, var, rtol=1e-4)
    assert bn.momentum == 0.1 and model.training  # settings and mode restored
    assert int(bn.num_batches_tracked) == 3


def test_inputs_as_one_tensor_or_loader_and_steps():
    model = mnv4.create_model("mnv4_conv_small_035").eval()
    x = torch.randn(10, 3, 64, 64)
    recalibrate_batchnorm(model, x, batch_size=4)  # 4 + 4 + a 2-image remainder
    assert (weights_meta(model).bn_batches, weights_meta(model).bn_images) == (3, 10)
    pairs = [(x[:4], torch.zeros(4)), (x[4:8], torch.zeros(4)), (x[8:], torch.zeros(2))]
    recalibrate_batchnorm(model, pairs, steps=2)
    assert (weights_meta(model).bn_batches, weights_meta(model).bn_images) == (2, 8)


def test_bad_inputs():
    model = mnv4.create_model("mnv4_conv_small_035")
    with pytest.raises(MNv4Error, match="`batch_size` 1 is invalid"):
        recalibrate_batchnorm(model, torch.randn(4, 3, 32, 32), batch_size=1)
    with pytest.raises(MNv4Error, match="no batch of 2 or more images"):
        recalibrate_batchnorm(model, [torch.randn(1, 3, 32, 32)])
    with pytest.raises(MNv4Error, match=r"must be \[N, C, H, W\]"):
        recalibrate_batchnorm(model, torch.randn(3, 32, 32))


def test_default_statistics_are_detected_only_when_untouched(tmp_path):
    model = mnv4.create_model("mnv4_conv_small_035")
    assert has_default_bn_stats(model)
    path = mnv4.save_model(model, tmp_path / "m.safetensors")
    assert has_default_bn_stats(mnv4.create_model(checkpoint=path))  # saved untrained: still untrained
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))  # one training-mode batch
    assert not has_default_bn_stats(model)
    assert not has_default_bn_stats(nn.Sequential(nn.Conv2d(3, 3, 1)))  # no BN at all


def test_running_stats_are_an_unbiased_average_from_the_first_batch():
    from mnv4.models import debias_running_stats

    m = 0.25
    fresh, seasoned = nn.BatchNorm2d(1, momentum=m), nn.BatchNorm2d(1, momentum=m)
    seasoned.num_batches_tracked.fill_(100)  # as after pretraining: its own average is kept as it is
    assert len(debias_running_stats(nn.Sequential(fresh, seasoned))) == 2
    means = [10.0, 20.0, 60.0, -40.0, 8.0, 4.0]
    want_fresh = want_seasoned = 0.0
    for i, mu in enumerate(means):
        x = torch.tensor([mu - 1.0, mu + 1.0]).view(2, 1, 1, 1)
        fresh(x), seasoned(x)
        # fresh: the plain mean of the first 1/m = 4 batches, then the exponential average with momentum m
        want_fresh = sum(means[: i + 1]) / (i + 1) if i < 4 else (1 - m) * want_fresh + m * mu
        want_seasoned = (1 - m) * want_seasoned + m * mu
        assert fresh.running_mean.item() == pytest.approx(want_fresh, rel=1e-6)
        assert seasoned.running_mean.item() == pytest.approx(want_seasoned, rel=1e-6)
    assert fresh.running_var.item() == pytest.approx(2.0, rel=1e-6)  # unbiased variance of (mu - 1, mu + 1)
    fresh.eval()(torch.zeros(2, 1, 1, 1))  # eval forwards leave the statistics alone
    assert fresh.running_mean.item() == pytest.approx(want_fresh, rel=1e-6)
