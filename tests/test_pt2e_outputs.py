"""pt2e INT8 (litert, executorch; mnv4.deploy.quantize.pt2e_quantize): every call of a layer used several times
is quantized, and a concat joining the outputs is cut into separate outputs, each with its own scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mnv4.deploy.runners import join_outputs

from .conftest import require


class _SharedHeadJoin(nn.Module):
    """One conv applied to two inputs (a detector head over two levels), then two parts of unrelated ranges
    joined on the last axis: logits of about +-30 and deltas of about +-0.3."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.stem(x)
        levels = [self.head(a), self.head(nn.functional.max_pool2d(a, 2))]
        flat = torch.cat([f.flatten(2).transpose(1, 2) for f in levels], dim=1)  # [B, A, 4]
        return torch.cat([flat[..., :2] * 30.0, flat[..., 2:] * 0.3], dim=-1)


def _quantized():
    require("torchao")
    require("executorch")
    from mnv4.deploy.quantize import pt2e_quantize, xnnpack_quantizer

    torch.manual_seed(0)
    model, calib = _SharedHeadJoin().eval(), torch.randn(8, 3, 16, 16)
    return model, calib, pt2e_quantize(model, calib[:1], calib, xnnpack_quantizer())


def test_output_join_becomes_two_outputs_each_with_its_own_scale():
    model, calib, q = _quantized()
    with torch.no_grad():  # the graph's batch is the example's: 1
        ref, rows = model(calib), [q(calib[i : i + 1]) for i in range(len(calib))]
    assert all(isinstance(r, tuple) and [p.shape[-1] for p in r] == [2, 2] for r in rows)
    joined = np.concatenate([join_outputs([p.numpy() for p in r]) for r in rows])
    assert joined.shape == ref.shape
    # one shared int8 scale over +-30 would be a step of ~0.25, near the deltas' whole range: they would come out
    # mostly 0; with their own scale they keep ~1% of it
    deltas, got = ref[..., 2:].numpy(), joined[..., 2:]
    assert np.abs(got - deltas).max() < 0.05 * np.abs(deltas).max()
    assert np.corrcoef(got.ravel(), deltas.ravel())[0, 1] > 0.99


def test_every_call_of_a_shared_layer_is_quantized():
    _, _, q = _quantized()
    convs = [n for n in q.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert len(convs) == 3  # stem + the head twice
    for conv in convs:  # each reads a dequantized int8 input and int8 weights
        assert all("dequantize" in str(a.target) for a in conv.args[:2]), conv.format_node()


def test_join_outputs_keeps_one_output_as_it_is():
    y = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    assert join_outputs([y]) is y
    assert join_outputs([y[..., :1], y[..., 1:]]).tolist() == y.tolist()


@pytest.mark.parametrize("dim", [1, -1])
def test_only_a_join_on_the_last_axis_is_cut(dim):
    from mnv4.deploy.quantize import split_output_joins

    class Join(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x * 2, x + 1], dim=dim)

    x = torch.randn(2, 3, 4)
    gm = torch.export.export(Join(), (x,)).module()
    n = split_output_joins(gm)
    out = gm(x)
    if dim == -1:
        assert n == 2 and torch.equal(torch.cat(out, dim=-1), Join()(x))
    else:
        assert n == 1 and torch.equal(out, Join()(x))


class _FoldedLayerScale(nn.Module):
    """A hybrid block's shape after fusion: a projection conv carrying a folded layer scale (outputs ~1e-3,
    weights ~1e-4), then a conv that carries the next BatchNorm's rescaling back to unit range."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.project = nn.Conv2d(3, 16, 1)
        self.next = nn.Conv2d(16, 8, 1)
        with torch.no_grad():
            self.project.weight.mul_(1e-3)
            self.project.bias.mul_(1e-3)
            self.next.weight.mul_(1e3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.next(self.project(x))


@pytest.mark.parametrize("route", ["executorch", "litert"])
def test_tiny_scales_of_a_folded_layer_scale_survive_int8(route):
    """The quantizers' default scale floor (2**-12) rounds such weights to a handful of levels (here: min
    cosine 0.977; hybrid_medium's artefacts: 0.73, agreement 22%); mnv4's configs follow the calibrated range."""
    require("torchao")
    require("executorch" if route == "executorch" else "litert_torch")
    from mnv4.deploy.quantize import FINE_EPS, litert_quantizer, pt2e_quantize, xnnpack_quantizer

    make = xnnpack_quantizer if route == "executorch" else litert_quantizer
    model, calib = _FoldedLayerScale().eval(), torch.randn(16, 3, 8, 8)
    spec = make().global_config.weight.observer_or_fake_quant_ctr
    assert spec.p.keywords["eps"] == FINE_EPS
    q = pt2e_quantize(model, calib[:1], calib, make())
    with torch.no_grad():
        ref = model(calib)
        got = torch.cat([q(calib[i : i + 1]) for i in range(len(calib))])
    cos = nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1)).min().item()
    assert cos > 0.995, cos
