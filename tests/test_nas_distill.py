"""`search --distill`: the super-network learns from soft-label datasets, resumably."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import mnv4.nas.space as space_module
from mnv4.distill.labelling import LabelConfig, label
from mnv4.distill.teachers import Teacher
from mnv4.errors import MNv4Error
from mnv4.models.registry import Preprocess
from mnv4.nas.run import search
from mnv4.nas.search import STATE, SearchStopped

from .nas_common import tiny_digits, tiny_space
from .test_nas_search import _cfg as search_cfg

QUIET = dict(progress=False, log=lambda m: None)


@pytest.fixture(autouse=True)
def _tiny_preset(monkeypatch):
    monkeypatch.setitem(space_module.SPACES, "tiny", tiny_space())


def _soft_labels(tmp_path, name: str, scale: float) -> str:
    """Soft labels of the built-in digits by a fixed linear teacher (scale 0: uniform probabilities)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    with torch.no_grad():
        net[1].weight.mul_(scale)
        net[1].bias.mul_(scale)
    names = list(tiny_digits().class_names)
    teacher = Teacher(net, Preprocess(16, 1.0, "bilinear"), names, {"spec": f"linear{scale}", "num_classes": 10})
    out = tmp_path / name
    cfg = LabelConfig("linear", "digits", str(out), aug="inception-randaug-l2m5", record_size=16, check_images=0)
    label(cfg, progress=False, log=lambda m: None, teacher=teacher)
    return str(out)


def _cfg(tmp_path, name, distill, **kw):
    """The plain search tests' settings, shorter (soft-label epochs are large), on ``distill``."""
    base = dict(epochs=0.5, warmup_epochs=0.1, eval_subnets=0, distill=tuple(distill))
    return search_cfg(tmp_path, name, **{**base, **kw})


@pytest.mark.slow
def test_search_on_soft_labels_resumes_to_the_uninterrupted_result(tmp_path):
    sets = [_soft_labels(tmp_path, "d1", 0.05), _soft_labels(tmp_path, "d3", 0.02)]
    full = search(_cfg(tmp_path, "a", sets, mix="1:2"), data=tiny_digits(), **QUIET)
    cfg = _cfg(tmp_path, "b", sets, mix="1:2")
    stopped = search(cfg, data=tiny_digits(), max_steps=9, **QUIET)
    assert isinstance(stopped, SearchStopped) and stopped.step == 9
    with pytest.raises(MNv4Error, match="other settings"):
        search(_cfg(tmp_path, "b", sets, mix="1:1"), resume=True, data=tiny_digits(), **QUIET)
    resumed = search(cfg, resume=True, data=tiny_digits(), **QUIET)
    assert resumed.arch == full.arch
    ha = [json.loads(x) for x in (tmp_path / "a" / "history.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (tmp_path / "b" / "history.jsonl").read_text().splitlines()]
    assert ha == hb and len(ha) == full.report["steps"] > 9
    sa = torch.load(tmp_path / "a" / STATE, weights_only=True)
    sb = torch.load(tmp_path / "b" / STATE, weights_only=True)
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    assert sa["extra"]["soft_label_manifests"] == sb["extra"]["soft_label_manifests"]


@pytest.mark.slow
def test_search_trains_on_the_soft_labels(tmp_path):
    # a uniform teacher: cross-entropy against its targets can never fall below log(10), hard labels' can
    uniform = _soft_labels(tmp_path, "uniform", 0.0)
    search(_cfg(tmp_path, "u", [uniform], epochs=1.0), data=tiny_digits(), **QUIET)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "u" / "history.jsonl").read_text().splitlines()]
    assert losses and min(losses) >= math.log(10) - 1e-4


def test_soft_label_settings_are_checked_before_any_work(tmp_path):
    with pytest.raises(MNv4Error, match="mix"):
        _cfg(tmp_path, "x", [], mix="1:2").validated()
    with pytest.raises(MNv4Error, match="mix"):
        _cfg(tmp_path, "x", ["a", "b"], mix="1:2:3").validated()
    with pytest.raises(MNv4Error, match="soft-label"):
        search(_cfg(tmp_path, "x", [str(tmp_path / "nothing")]), data=tiny_digits(), **QUIET)
