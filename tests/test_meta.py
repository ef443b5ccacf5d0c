"""Weights carry their record (mnv4.models.meta): made once by create_model, read by everyone through it."""

from __future__ import annotations

import dataclasses

import mnv4
from mnv4.models.meta import WeightsMeta, set_weights_meta, weights_meta
from mnv4.models.registry import Preprocess
from mnv4.weights.checkpoint import save_model


def test_random_init_is_recorded_as_such():
    meta = weights_meta(mnv4.create_model("mnv4_conv_small_035"))
    assert meta.random and meta.source is None and meta.tag is None and meta.training is None
    assert meta.describe() == "random init"


def test_a_checkpoint_brings_its_preprocessing_classes_and_run_summary(tmp_path):
    model = mnv4.create_model("mnv4_conv_small_035", num_classes=3)
    pp = Preprocess(input_size=96, crop_pct=1.0, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
    model.preprocess, model.class_names = pp, ["cat", "dog", "eel"]  # the README's attributes write the record
    assert weights_meta(model).preprocess == pp and weights_meta(model).class_names == ("cat", "dog", "eel")
    path = save_model(model, tmp_path / "w.safetensors", extra={"epoch": 7, "val_top1": 81.5})
    back = weights_meta(mnv4.create_model(checkpoint=path))
    assert back == WeightsMeta(pp, ("cat", "dog", "eel"), str(path), training={"epoch": 7, "val_top1": 81.5})
    assert not back.random and back.describe() == f"from {path}"


def test_batchnorm_estimation_is_recorded():
    from mnv4.models import noise_batches, recalibrate_batchnorm

    model = mnv4.create_model("mnv4_conv_small_035")
    recalibrate_batchnorm(model, noise_batches(32, batches=2, batch_size=4), inputs_kind="noise")
    assert weights_meta(model).describe() == "random init; BatchNorm statistics re-estimated on 8 inputs (noise)"


def test_any_module_can_carry_a_record_and_one_without_is_taken_as_given():
    from torch import nn

    net = nn.Linear(2, 2)
    assert weights_meta(net) == WeightsMeta() and weights_meta(net).describe() == "as given"
    set_weights_meta(net, dataclasses.replace(WeightsMeta(), random=True))
    assert weights_meta(net).random


def test_inference_and_export_read_the_record(tmp_path):
    from mnv4.inference import class_names_of

    model = mnv4.create_model("mnv4_conv_small_035", num_classes=2)
    set_weights_meta(model, WeightsMeta(class_names=("no", "yes")))
    assert class_names_of(model) == ["no", "yes"] and model.class_names == ["no", "yes"]
