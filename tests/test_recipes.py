"""Recipes hold the paper / TF-config numbers (docs/training.md, Recipes) and resolve with file and CLI overrides."""

from __future__ import annotations

import json

import pytest

from mnv4.cli import main
from mnv4.errors import MNv4Error
from mnv4.train import RECIPES, resolve_config
from mnv4.train.recipes import get_recipe

PAPER = ("paper-conv-small", "paper-conv-medium", "paper-hybrid-medium", "paper-conv-large", "paper-hybrid-large")


def test_all_named_recipes_exist_with_their_models():
    assert set(PAPER) | {"finetune", "quick"} <= set(RECIPES)
    assert [get_recipe(n).model for n in PAPER] == [
        "mnv4_conv_small",
        "mnv4_conv_medium",
        "mnv4_hybrid_medium",
        "mnv4_conv_large",
        "mnv4_hybrid_large",
    ]
    assert get_recipe("quick").data == "digits" and RECIPES["quick"].hflip == 0.0


@pytest.mark.parametrize(
    "name, batch, lr, wd, warmup, dropout, sd, ra, mix",
    [
        ("paper-conv-small", 4096, 0.002, 0.01, 5, 0.3, 0.0, (0.5, 2, 9), 0.0),
        ("paper-conv-medium", 4096, 0.004, 0.1, 5, 0.2, 0.075, (0.7, 2, 15), 0.0),
        ("paper-hybrid-medium", 16384, 0.016, 0.1, 20, 0.2, 0.075, (0.7, 2, 15), 0.0),
        ("paper-conv-large", 16384, 0.004, 0.2, 20, 0.2, 0.2, (1.0, 2, 15), 0.2),
        ("paper-hybrid-large", 16384, 0.01, 0.2, 20, 0.2, 0.35, (1.0, 2, 15), 0.3),
    ],
)
def test_paper_recipes_match_table_10_and_tf_configs(name, batch, lr, wd, warmup, dropout, sd, ra, mix):
    r = get_recipe(name)
    assert (r.batch_size, r.lr, r.weight_decay, r.warmup_epochs) == (batch, lr, wd, warmup)
    assert (r.dropout, r.drop_path, r.label_smoothing) == (dropout, sd, 0.1)
    assert (r.randaug_prob, r.randaug_layers, r.randaug_magnitude) == ra
    assert r.mix_prob == mix and r.lr_ref_batch == batch


def test_tf_config_choices_where_paper_and_tf_disagree():
    large = get_recipe("paper-conv-large")
    assert large.drop_path_schedule == "flat" and large.drop_path == 0.2 and large.mix_prob == 0.2
    assert "0.35" in large.note and "0.3" in large.note  # the paper's values are named in the note
    small = get_recipe("paper-conv-small")
    assert (small.bn_momentum, small.bn_eps) == pytest.approx((0.05, 1e-6))  # Keras 0.95 -> PyTorch 0.05
    assert small.ema_decay == 0.9999 and small.betas == (0.6, 0.999) and small.l2 == 1e-5
    for n in PAPER[1:]:
        assert (get_recipe(n).bn_momentum, get_recipe(n).bn_eps) == pytest.approx((0.003, 1e-3))
    assert get_recipe("paper-hybrid-large").min_lr_ratio == 0.001
    assert all(get_recipe(n).drop_path_schedule == "tf" for n in ("paper-conv-medium", "paper-hybrid-medium"))


def test_file_then_cli_overrides_and_lr_scaling(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("recipe: paper-conv-medium\nbatch-size: 1024\nbetas: [0.8, 0.99]\nepochs: 3\n")
    cfg = resolve_config(None, f, epochs=7, seed=None)
    assert cfg.recipe == "paper-conv-medium" and cfg.batch_size == 1024 and cfg.epochs == 7
    assert cfg.betas == (0.8, 0.99) and cfg.weight_decay == 0.1
    assert cfg.scaled_lr() == pytest.approx(0.004 / 4)  # linear in the effective batch
    assert resolve_config("paper-conv-medium", batch_size=1024, lr_scaling="sqrt").scaled_lr() == pytest.approx(0.002)
    j = tmp_path / "my.json"
    j.write_text(json.dumps({"lr": 0.5}))
    assert resolve_config("quick", j).lr == 0.5
    with pytest.raises(MNv4Error, match="unknown config field"):
        resolve_config("quick", learning_rate=1)
    with pytest.raises(MNv4Error, match="unknown recipe"):
        resolve_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(MNv4Error, match="not valid YAML"):
        resolve_config("quick", bad)


def test_recipes_command_lists_and_shows(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in (*PAPER, "finetune", "quick"))
    assert main(["recipes", "--show", "paper-conv-large"]) == 0
    shown = capsys.readouterr().out
    assert "drop_path_schedule: flat" in shown and "mix_prob: 0.2" in shown
    # every config field --set takes is shown (run fields too: teacher_temperature, eval_every...), as YAML
    # that resolves back to the recipe's config
    import dataclasses

    import yaml

    from mnv4.train.config import TrainConfig

    fields = yaml.safe_load(shown)
    assert set(fields) == {f.name for f in dataclasses.fields(TrainConfig)} - {"recipe"}
    assert fields["teacher_temperature"] == 1.0 and fields["eval_every"] == 1
    cfg = resolve_config("paper-conv-large", **fields)
    assert cfg == resolve_config("paper-conv-large")
