"""The labelling fast path: the teacher on ONNX Runtime gives the records eager PyTorch gives."""

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
def test_onnxruntime_labels_equal_eager_labels(tmp_path, tiny_teacher):
    pytest.importorskip("onnxruntime")
    photos = make_folder(tmp_path / "photos", per_class=4)
    said: list[str] = []
    shards = {}
    for engine in ("eager", "onnxruntime"):
        out = str(tmp_path / engine)
        cfg = LabelConfig(tiny_teacher, str(photos), out, replicas=2, shard_size=10, batch_size=8, engine=engine)
        res = label(cfg, progress=False, log=said.append)
        assert res.manifest["records"] == 24
        assert res.manifest["teacher"].get("engine", "eager") == engine
        shards[engine] = ShardIndex(sorted((tmp_path / engine).glob("shard-*.tar")))
    assert any(line.startswith("teacher runs on onnxruntime: probabilities within") for line in said), said
    eager, fast = shards["eager"], shards["onnxruntime"]
    assert eager.keys == fast.keys and len(eager) == 24
    worst = 0.0
    for i in range(len(eager)):
        # the records (the very JPEG bytes the student decodes, and their provenance) are identical
        assert eager.jpeg(i) == fast.jpeg(i) and eager.meta(i) == fast.meta(i)
        worst = max(worst, float(np.abs(decode_probs(eager.probs(i), 3) - decode_probs(fast.probs(i), 3)).max()))
    assert worst <= 1e-3  # float16 storage: at most a unit in the last place apart


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
