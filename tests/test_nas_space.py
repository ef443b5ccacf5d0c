import itertools
import json
import random

import pytest
import torch

from mnv4.errors import MNv4Error
from mnv4.models.mobilenetv4 import MobileNetV4
from mnv4.models.specs import MODEL_SPECS, UIBSpec
from mnv4.nas import SPACES, SearchSpace, get_space, spec_from_string, spec_to_string
from mnv4.nas.space import COARSE_BLOCK

from .nas_common import tiny_space


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_published_specs_round_trip_through_the_compact_string(name):
    spec = MODEL_SPECS[name]
    text = spec_to_string(spec)
    assert "|" in text and len(text) < 250
    assert spec_from_string(text, name=name) == spec


def test_sampled_specs_round_trip_through_string_and_space():
    rng = random.Random(0)
    for space in [*SPACES.values(), tiny_space(True)]:
        for _ in range(25):
            arch = space.sample(rng)
            text = space.to_string(arch)
            assert spec_from_string(text, name=space.to_spec(arch).name) == space.to_spec(arch)
            assert space.from_string(text) == arch


@pytest.mark.parametrize(
    "bad",
    [
        "c3s2o32|u33",
        "x3|a|b|c|d",
        "c3s2o32|u33*x|u33|u33|u33",
        "c3s2o32|f3s2o8|u3|u33|u33",
        "c3s2o8|f3s2|u33|u33|u33@foo=1",
    ],
)
def test_malformed_compact_strings_give_one_line_errors(bad):
    with pytest.raises(MNv4Error) as e:
        spec_from_string(bad)
    assert "\n" not in str(e.value) and "compact spec" in str(e.value)


def test_every_sampled_spec_builds_and_runs():
    rng = random.Random(1)
    x = torch.randn(1, 3, 32, 32)
    for space in (tiny_space(), tiny_space(True), SPACES["s"]):
        for _ in range(3):
            model = MobileNetV4(space.to_spec(space.sample(rng)), num_classes=7).eval()
            with torch.no_grad():
                assert model(x).shape == (1, 7)


@pytest.mark.parametrize("name", ["m", "l", "m_hybrid"])
def test_large_presets_build_on_the_meta_device(name):
    space = SPACES[name]
    rng = random.Random(2)
    for _ in range(3):
        with torch.device("meta"):
            out = MobileNetV4(space.to_spec(space.sample(rng))).eval()(torch.empty(1, 3, 64, 64))
        assert out.shape == (1, 1000)


def test_published_models_are_points_of_the_spaces():
    ext = SPACES["extended"]
    for name in ("mnv4_conv_small", "mnv4_conv_medium", "mnv4_conv_large"):
        arch = ext.locate(MODEL_SPECS[name])
        assert arch is not None, name
        assert ext.to_spec(arch, name) == MODEL_SPECS[name]
    assert ext.locate(MODEL_SPECS["mnv4_conv_small"])["s0.b0.kind"] == "conv2"
    assert SPACES["m"].locate(MODEL_SPECS["mnv4_conv_medium"]) is not None
    assert SPACES["l"].locate(MODEL_SPECS["mnv4_conv_large"]) is not None
    assert SPACES["m_hybrid"].locate(MODEL_SPECS["mnv4_hybrid_medium"]) is not None
    # Outside: GELU (Hybrid-L) and conv pairs (Conv-S) in a FusedIB-only space.
    assert ext.locate(MODEL_SPECS["mnv4_hybrid_large"]) is None
    assert SPACES["s"].locate(MODEL_SPECS["mnv4_conv_small"]) is None
    assert SPACES["m"].locate(MODEL_SPECS["mnv4_hybrid_medium"]) is None


def test_inactive_decisions_do_not_change_the_model():
    space = tiny_space()
    rng = random.Random(3)
    arch = space.sample(rng)
    arch["s2.depth"] = 1
    other = dict(arch)
    other["s2.b2.start"] = 5 if arch["s2.b2.start"] != 5 else 3
    other["s2.b1.expand"] = 2.0 if arch["s2.b1.expand"] != 2.0 else 4.0
    assert space.to_spec(arch) == space.to_spec(other)
    assert space.canonical(arch) == space.canonical(other)
    assert "s2.b1.expand" not in space.active(arch) and "s2.b0.expand" in space.active(arch)


def test_num_architectures_counts_distinct_models():
    space = SearchSpace.from_dict(
        {
            "name": "count",
            "stem": [8],
            "stages": [
                {"stride": 4, "depths": [1, 2], "filters": [8], "first": ["fused_ib"], "mid_dw": [0, 3]},
                {"stride": 8, "depths": [1], "filters": [8, 16], "start_dw": [0], "mid_dw": [3]},
                {"stride": 16, "depths": [1], "filters": [16], "start_dw": [0], "mid_dw": [3]},
                {"stride": 32, "depths": [1, 2], "filters": [16], "start_dw": [0, 3], "mid_dw": [3]},
            ],
        }
    )
    names = [d.name for d in space.searchable]
    specs = set()
    for values in itertools.product(*(d.choices for d in space.searchable)):
        arch = {d.name: d.choices[0] for d in space.decisions}
        arch.update(dict(zip(names, values)))
        specs.add(space.to_string(space.canonical(arch)))
    assert space.num_architectures() == len(specs)


def test_coarse_stage_pins_ib_blocks_and_fine_stage_pins_widths():
    space = SPACES["s"]
    fixed = space.coarse_fixed()
    arch = space.sample(random.Random(4), fixed)
    for b in space.to_spec(arch).blocks:
        if isinstance(b, UIBSpec):
            assert (b.start_dw, b.mid_dw, b.expand) == (COARSE_BLOCK["start"], COARSE_BLOCK["mid"], 4.0)
    fine = space.fine_fixed(arch, search_expand=True)
    assert set(fine) == {"stem"} | {f"s{i}.{k}" for i in range(4) for k in ("depth", "filters")}
    again = space.sample(random.Random(5), fine)
    assert [len(s) for s in space.to_spec(again).stages] == [len(s) for s in space.to_spec(arch).stages]
    # By default the fine stage keeps the coarse expansions (4), as the paper does.
    paper = space.sample(random.Random(6), space.fine_fixed(arch))
    assert {b.expand for b in space.to_spec(paper).blocks if isinstance(b, UIBSpec)} == {4.0}
    assert {(b.start_dw, b.mid_dw) for b in space.to_spec(paper).blocks if isinstance(b, UIBSpec)} != {(0, 3)}


def test_space_files_and_errors(tmp_path):
    space = tiny_space(True)
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space.to_dict()))
    assert get_space(str(path)) == space
    yml = tmp_path / "space.yaml"
    import yaml

    yml.write_text(yaml.safe_dump(space.to_dict()))
    assert get_space(str(yml)).decisions == space.decisions
    with pytest.raises(MNv4Error, match="unknown search space"):
        get_space("xl")
    with pytest.raises(MNv4Error, match="not found"):
        get_space(str(tmp_path / "missing.yaml"))
    bad = space.to_dict()
    bad["stages"][1]["mid_dw"] = [0]
    with pytest.raises(MNv4Error, match="middle DW"):
        SearchSpace.from_dict(bad)
    bad = space.to_dict()
    bad["stages"][0]["depths"] = [0, 1]
    with pytest.raises(MNv4Error, match="depths"):
        SearchSpace.from_dict(bad)
    with pytest.raises(MNv4Error, match="misses decision"):
        space.to_spec({"stem": 8})


def test_specs_off_the_space_are_located_as_none():
    import dataclasses

    space = SPACES["m"]
    spec = MODEL_SPECS["mnv4_conv_medium"]
    assert space.locate(spec) is not None
    first = spec.stages[1][0]
    for block in (
        dataclasses.replace(first, out=first.out + 8),  # widths differ inside the stage
        dataclasses.replace(first, expand=3.5),  # an expansion not among the choices
        dataclasses.replace(first, stride=1),  # the stage would not down-sample
    ):
        stages = (spec.stages[0], (block, *spec.stages[1][1:]), *spec.stages[2:])
        try:
            off = dataclasses.replace(spec, stages=stages)
        except ValueError:
            continue  # not even a valid spec
        assert space.locate(off) is None, block
