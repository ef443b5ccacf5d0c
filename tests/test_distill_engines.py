"""The labelling fast path (a runtime, worker processes, its own batch size) gives the records eager PyTorch gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mnv4
from mnv4.distill import engines
from mnv4.distill.engines import accelerate
from mnv4.distill.labelling import LabelConfig, label
from mnv4.distill.shards import ShardIndex, decode_probs
from mnv4.distill.teachers import Teacher, load_teacher
from mnv4.errors import MNv4Error

from .distill_helpers import COLORS, PP, TINY, make_folder


@pytest.fixture
def tiny_teacher(tmp_path):
    torch.manual_seed(0)
    model = mnv4.create_model(TINY, num_classes=3)
    model.class_names, model.preprocess = list(COLORS), PP
    return str(mnv4.save_model(model, tmp_path / "teacher.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_the_fast_path_labels_as_the_slow_path(tmp_path, tiny_teacher, engine):
    """The fast path (a runtime, records made in a worker process, another batch size) against today's
    slow path (eager PyTorch in-process): the same records, probabilities within float rounding."""
    pytest.importorskip(engine)
    photos = make_folder(tmp_path / "photos", per_class=4, bad=True)  # a broken file: a batch with a hole
    said: list[str] = []
    shards, checks = {}, []
    runs = {"slow": dict(engine="eager", workers=0, batch_size=8), "fast": dict(engine=engine, workers=1, batch_size=5)}
    for name, how in runs.items():
        out = str(tmp_path / name)
        cfg = LabelConfig(tiny_teacher, str(photos), out, replicas=2, shard_size=10, check_images=4, **how)
        res = label(cfg, progress=False, log=said.append)
        assert res.manifest["records"] == 24 and res.manifest["skipped_records"] == 2
        assert res.manifest["teacher"].get("engine", "eager") == how["engine"]
        checks.append(res.manifest["teacher_check"])  # the top-1 check runs through the same loader and route
        shards[name] = ShardIndex(sorted((tmp_path / name).glob("shard-*.tar")))
    assert checks[0] == checks[1] and checks[0]["images"] == 3  # 4 chosen, 1 of them the broken file
    assert any(line.startswith(f"teacher runs on {engine}: probabilities within") for line in said), said
    slow, fast = shards["slow"], shards["fast"]
    assert slow.keys == fast.keys and len(slow) == 24
    worst = 0.0
    for i in range(len(slow)):
        # the records (the very JPEG bytes the student decodes, and their provenance) are identical
        assert slow.jpeg(i) == fast.jpeg(i) and slow.meta(i) == fast.meta(i)
        worst = max(worst, float(np.abs(decode_probs(slow.probs(i), 3) - decode_probs(fast.probs(i), 3)).max()))
    assert worst <= 1e-3  # float16 storage: at most a unit in the last place apart


class _Seen(torch.nn.Module):
    """The teacher's network, noting the batch sizes it runs."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.batches = net, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return self.net(x)


def test_the_runtime_runs_the_labelling_batch_size_with_the_export(tmp_path, tiny_teacher, monkeypatch):
    teacher = load_teacher(tiny_teacher)
    seen = _Seen(teacher.model)
    monkeypatch.setattr(engines, "available_engines", lambda: ["openvino"])
    monkeypatch.setattr(
        engines, "_converted", lambda t, name, x: Teacher(seen, t.preprocess, t.class_names, t.identity)
    )
    sample = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    used, name = accelerate(teacher, "auto", sample, lambda line: None, batch=16)
    # the parity check on the sample, then one batch of the size labelling runs (OpenVINO compiles per shape)
    assert name == "openvino" and used.model is seen and seen.batches == [3, 16]
    seen.batches.clear()
    accelerate(teacher, "auto", sample, lambda line: None, batch=3)
    assert seen.batches == [3]


class _Off(torch.nn.Module):
    """A 'runtime' that gets the answer wrong: the parity check must catch it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 3)


def test_a_runtime_that_disagrees_is_not_used(tmp_path, tiny_teacher, monkeypatch):
    teacher = load_teacher(tiny_teacher)
    teacher.model.get_classifier().weight.data.mul_(50)  # confident: wrong uniform outputs are far off
    wrong = Teacher(_Off(), teacher.preprocess, teacher.class_names, teacher.identity)
    monkeypatch.setattr(engines, "available_engines", lambda: ["onnxruntime"])
    monkeypatch.setattr(engines, "_converted", lambda t, name, x: wrong)
    sample = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    said: list[str] = []
    used, name = accelerate(teacher, "auto", sample, said.append)
    assert used is teacher and name == "eager"
    assert "onnxruntime: probabilities differ from eager PyTorch" in said[0] and said[-1].endswith("eager PyTorch")
    with pytest.raises(MNv4Error, match="use --engine eager"):
        accelerate(teacher, "onnxruntime", sample, said.append)
    assert accelerate(teacher, "eager", sample, said.append) == (teacher, "eager")
    with pytest.raises(MNv4Error, match="engine"):
        accelerate(teacher, "tensorrt", sample)
    assert json.dumps(teacher.identity)  # untouched: the eager teacher's identity has no engine
    assert "engine" not in teacher.identity
