"""The hooks timm-based training code calls: set_grad_checkpointing, group_matcher (layer-wise LR decay)
and forward_intermediates; timm is the oracle where it has the same thing."""

import copy

import pytest
import torch

import mnv4
from mnv4.models.registry import MODELS
from mnv4.train.optim import build_optimizer, layer_decay_groups, layer_ids

from .conftest import randomize_

timm = pytest.importorskip("timm")


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()
    return total


@pytest.mark.parametrize("name", ["mnv4_conv_small", "mnv4_hybrid_medium", "mnv4_conv_aa_medium"])
def test_grad_checkpointing_gives_identical_gradients_and_bn_statistics(name):
    torch.manual_seed(0)
    plain = mnv4.create_model(name, num_classes=10, drop_path_rate=0.2, drop_rate=0.1).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    x = torch.randn(4, 3, 64, 64)
    losses = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # the same dropout / stochastic-depth draws
        loss = model(x).logsumexp(1).mean()
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(a.grad, b.grad), n
    # The recomputation in backward must not update BN running statistics a second time.
    for (n, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.equal(a, b), n


def test_grad_checkpointing_keeps_fewer_activations_and_can_be_turned_off():
    model = mnv4.create_model("mnv4_conv_small", num_classes=10).train()
    x = torch.randn(2, 3, 96, 96)
    full = _saved_bytes(model, x)
    model.set_grad_checkpointing(True)
    assert _saved_bytes(model, x) < 0.6 * full  # 0.45x for this model and input
    model.set_grad_checkpointing(False)
    assert _saved_bytes(model, x) == full


def test_group_matcher_layers_are_timms():
    """timm's own grouping of its MNv4 and of ours (same matcher format) give the same layers, and our
    layer-decay scales equal timm's param_groups_layer_decay on our model."""
    from timm.models import group_parameters
    from timm.optim._param_groups import param_groups_layer_decay

    for name in ("mnv4_conv_small", "mnv4_hybrid_medium"):
        ours = mnv4.create_model(name)
        ref = timm.create_model(MODELS[name].timm_name)
        assert len(group_parameters(ours, ours.group_matcher())) == len(group_parameters(ref, ref.group_matcher()))
        assert len(set(layer_ids(ours).values())) == len(group_parameters(ref, ref.group_matcher()))
        names = {id(p): n for n, p in ours.named_parameters()}
        mine = {names[id(p)]: g["lr_scale"] for g in layer_decay_groups(ours, 1.0, 0.05, 0.8) for p in g["params"]}
        theirs = {names[id(p)]: g["lr_scale"] for g in param_groups_layer_decay(ours, 0.05, layer_decay=0.8)
                  for p in g["params"]}  # fmt: skip
        assert mine == pytest.approx(theirs, rel=1e-12)
    coarse = ours.group_matcher(coarse=True)
    assert len(group_parameters(ours, coarse)) == 1 + 4 + 1 + 1  # stem, stages, 960 conv, head


def test_layer_decay_optimizer_lrs():
    model = mnv4.create_model("mnv4_conv_small", num_classes=10)
    opt = build_optimizer(model, 1e-3, 0.05, (0.9, 0.999), 1e-8, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert opt.param_groups[0]["lr"] == 1e-3  # head first: the LR the trainer logs is the peak
    assert lr_of[id(model.classifier.weight)] == 1e-3 and lr_of[id(model.head_conv.conv.weight)] == 1e-3
    assert lr_of[id(model.final_conv.conv.weight)] == 5e-4
    assert lr_of[id(model.stem.conv.weight)] == pytest.approx(1e-3 * 0.5**18)  # 19 layers
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd[id(model.stem.bn.weight)] == 0.0 and wd[id(model.stem.conv.weight)] == 0.05
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    plain = build_optimizer(model, 1e-3, 0.05, (0.9, 0.999), 1e-8)
    assert len(plain.param_groups) == 2  # layer_decay 1.0: the recipe's two groups, unchanged


def test_finetune_recipe_uses_layer_decay_and_the_config_checks_it():
    from mnv4.train.config import resolve_config

    assert resolve_config("finetune", data="digits", model="mnv4_conv_small").layer_decay == 0.9
    with pytest.raises(mnv4.MNv4Error, match="layer_decay"):
        resolve_config("finetune", data="digits", model="mnv4_conv_small", layer_decay=1.5)


@pytest.mark.parametrize("name", ["mnv4_conv_small", "mnv4_hybrid_medium", "mnv4_conv_aa_medium"])
def test_forward_intermediates_match_timm(name, tmp_path):
    ref = randomize_(timm.create_model(MODELS[name].timm_name).eval())
    model = mnv4.create_model(name).eval()
    mnv4.load_weights(model, ref.state_dict())
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        final_t, levels_t = ref.forward_intermediates(x)
        final, levels = model.forward_intermediates(x)
        assert torch.allclose(final, final_t, atol=1e-4 * final_t.abs().max())
        assert len(levels) == len(levels_t) == 5
        for ours, theirs in zip(levels[:4], levels_t[:4]):  # stem and the stride 4 / 8 / 16 stage ends
            assert torch.allclose(ours, theirs, atol=1e-4 * theirs.abs().max())
        # Level 4: ours is the last stage (TF endpoint); timm's is the 960 conv applied to it.
        assert torch.allclose(model.final_conv(levels[4]), levels_t[4], atol=1e-4 * levels_t[4].abs().max())
        assert [t.shape[1] for t in levels] == [f["num_chs"] for f in model.feature_info]
        # indices: last n, negative, and early stopping, as in timm
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape for t in last2] == [levels[3].shape, levels[4].shape]
        picked = model.forward_intermediates(x, indices=[0, -2], intermediates_only=True, stop_early=True)
        picked_t = ref.forward_intermediates(x, indices=[0, -2], intermediates_only=True, stop_early=True)
        assert [t.shape for t in picked] == [t.shape for t in picked_t]
        assert torch.equal(picked[1], levels[3])


def test_forward_intermediates_refuses_what_timm_refuses():
    model = mnv4.create_model("mnv4_conv_small").eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="stop_early"):
        model.forward_intermediates(x, stop_early=True)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[5])
    with pytest.raises(ValueError, match="last 6"):
        model.forward_intermediates(x, indices=6)
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")
