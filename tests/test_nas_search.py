import json

import pytest
import torch

import mnv4.nas.space as space_module
from mnv4 import create_model
from mnv4.errors import MNv4Error
from mnv4.models.specs import ModelSpec, UIBSpec
from mnv4.nas import spec_from_string
from mnv4.nas.run import search
from mnv4.nas.search import STATE, SearchConfig, SearchStopped

from .nas_common import tiny_digits, tiny_space


@pytest.fixture(autouse=True)
def _tiny_preset(monkeypatch):
    monkeypatch.setitem(space_module.SPACES, "tiny", tiny_space())


def _cfg(tmp_path, name="run", **kw):
    base = dict(
        data="digits",
        output=str(tmp_path / name),
        space="tiny",
        hardware="pixel6_cpu",
        target_macs=0.15,
        epochs=3,
        batch_size=32,
        lr=5e-3,
        warmup_epochs=0.5,
        eval_subnets=1,
        calib_batches=1,
        save_every_steps=5,
    )
    base.update(kw)
    return SearchConfig(**base)


@pytest.mark.slow
def test_two_stage_search_writes_a_buildable_spec_and_report(tmp_path):
    cfg = _cfg(tmp_path)
    result = search(cfg, data=tiny_digits(), progress=False, log=lambda m: None)
    out = tmp_path / "run"
    files = ("spec.json", "report.json", "report.md", "curves.png", "scatter.png", "history.jsonl", "metrics.csv")
    for name in (*files, STATE, "subnet.safetensors", "supernet.safetensors"):
        assert (out / name).is_file(), name
    spec = ModelSpec.from_dict(json.loads((out / "spec.json").read_text()))
    assert spec == result.spec
    model = create_model(spec, num_classes=10).eval()
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 10)
    warm = create_model(checkpoint=out / "subnet.safetensors")  # the found model with super-network weights
    assert warm.spec == spec and warm.preprocess.input_size == 16 and len(warm.class_names) == 10
    report = json.loads((out / "report.json").read_text())
    assert report["within_tolerance"] and abs(report["cost"] / 0.15 - 1) <= 0.10
    assert set(report["stage_results"]) == {"coarse", "fine"}
    assert {"pixel6_cpu_ms", "s23_cpu_ms", "pixel4_dsp_ms", "pixel8_edgetpu_ms", "macs_M"} <= set(report["predicted"])
    assert report["predicted"]["macs_M"] == pytest.approx(result.cost)
    assert report["measured_here_ms"] > 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(history) == report["steps"] == 24
    # The controller is frozen for the first 25% of each stage: no reward rows, no learning there.
    coarse = [r for r in history if r["stage"] == "coarse"]
    assert all("reward" not in r for r in coarse[:3]) and all("reward" in r for r in coarse[3:])
    assert len({r["entropy"] for r in coarse[:4]}) == 1 and coarse[-1]["entropy"] < coarse[0]["entropy"]
    # Coarse-stage samples are IB e4 3x3 everywhere; the fine stage keeps the coarse widths and depths.
    for r in coarse[3:]:
        uibs = [b for b in spec_from_string(r["arch"]).blocks if isinstance(b, UIBSpec)]
        assert {(b.start_dw, b.mid_dw, b.expand) for b in uibs} == {(0, 3, 4.0)}
    widths = [[b.out for b in st] for st in spec_from_string(report["stage_results"]["coarse"]).stages]
    fine = [r for r in history if r["stage"] == "fine" and "arch" in r]
    assert fine and all([[b.out for b in st] for st in spec_from_string(r["arch"]).stages] == widths for r in fine)
    with pytest.raises(MNv4Error, match="already holds"):
        search(cfg, data=tiny_digits(), progress=False, log=lambda m: None)
    with pytest.raises(MNv4Error, match="already finished"):
        search(cfg, resume=True, data=tiny_digits(), progress=False, log=lambda m: None)


@pytest.mark.slow
def test_interrupted_search_resumes_to_the_same_result(tmp_path):
    quiet = dict(progress=False, log=lambda m: None)
    full = search(_cfg(tmp_path, "a", eval_subnets=0), data=tiny_digits(), **quiet)
    cfg = _cfg(tmp_path, "b", eval_subnets=0)
    stopped = search(cfg, data=tiny_digits(), max_steps=7, **quiet)  # inside the coarse stage
    assert isinstance(stopped, SearchStopped) and stopped.step == 7 and stopped.stop_reason == "max_steps"
    stopped = search(cfg, resume=True, data=tiny_digits(), max_steps=7, **quiet)  # into the fine stage
    assert isinstance(stopped, SearchStopped) and stopped.step == 14
    with pytest.raises(MNv4Error, match="other settings"):
        search(_cfg(tmp_path, "b", eval_subnets=0, beta=-0.2), resume=True, data=tiny_digits(), **quiet)
    resumed = search(cfg, resume=True, data=tiny_digits(), **quiet)
    assert resumed.arch == full.arch
    ha = [json.loads(x) for x in (tmp_path / "a" / "history.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (tmp_path / "b" / "history.jsonl").read_text().splitlines()]
    assert ha == hb
    sa = torch.load(tmp_path / "a" / STATE, weights_only=True)
    sb = torch.load(tmp_path / "b" / STATE, weights_only=True)
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    la, lb = sa["extra"]["controller"]["logits"], sb["extra"]["controller"]["logits"]
    assert all(torch.equal(x, y) for x, y in zip(la, lb))


@pytest.mark.slow
def test_one_stage_search_learns_every_decision_jointly(tmp_path):
    result = search(_cfg(tmp_path, one_stage=True, epochs=2), data=tiny_digits(), progress=False, log=lambda m: None)
    report = result.report
    assert list(report["stage_results"]) == ["joint"]
    history = [json.loads(x) for x in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    archs = {r["arch"] for r in history if "arch" in r}
    assert any(t in a for a in archs for t in ("u00", "u35", "u53", "u05", "u30"))  # not only IB 3x3


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(target_macs=None), "exactly one"),
        (dict(target_ms=1.0), "exactly one"),
        (dict(target_macs=None, target_ms=1.0, hardware="macs"), "no milliseconds"),
        (dict(hardware="pixel9"), "hardware"),
        (dict(beta=0.1), "beta"),
        (dict(epochs=0), "epochs"),
        (dict(reward_split=0.95), "reward_split"),
        (dict(distill=("soft",)), "no such soft-label dataset folder: soft"),
        (dict(mix="1:2"), "mix"),
    ],
)
def test_bad_settings_fail_before_any_work(tmp_path, kw, match):
    with pytest.raises(MNv4Error, match=match):
        search(_cfg(tmp_path, **kw), data=tiny_digits(), progress=False)
    assert not (tmp_path / "run").exists()


def test_held_out_set_leaves_unreadable_images_out(tmp_path):
    from mnv4.data.images import BadImage
    from mnv4.nas.search import HeldOutSet

    class Mixed(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            if i in (0, 3):
                return BadImage(f"/x/{i}.jpg", "truncated"), i
            return torch.full((3, 4, 4), float(i)), i

    for max_bytes in (1 << 20, 0):  # cached in memory, and loaded on demand
        held = HeldOutSet(Mixed(), lambda t: t, max_bytes=max_bytes)
        assert (held.cache is not None) == (max_bytes > 0)
        x, y = held.batch([0, 1, 2, 3, 4])
        assert y.tolist() == [1, 2, 4] and x[:, 0, 0, 0].tolist() == [1.0, 2.0, 4.0]
