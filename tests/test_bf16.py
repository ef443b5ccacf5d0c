"""bf16 precision where the route supports it (OpenVINO, torch artefacts, eager torch in bench)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mnv4.deploy.cpu import bf16_support
from mnv4.deploy.export import export
from mnv4.deploy.formats import FORMATS
from mnv4.errors import MNv4Error

from .conftest import require
from .test_export import RES, _tiny


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def test_bf16_routes_are_the_ones_that_can():
    assert {f.name for f in FORMATS.values() if f.bf16} == {"openvino", "torchscript", "pt2"}
    from mnv4.deploy.bench import runtime_precisions

    assert "bf16" in runtime_precisions("torch") and "bf16" not in runtime_precisions("onnxruntime")


def test_bf16_on_a_route_without_it_names_those_with_it(tiny, tmp_path):
    with pytest.raises(MNv4Error, match="no bf16 route.*openvino"):
        export(tiny, "onnx", tmp_path / "x.onnx", precision="bf16", verbose=False)


def test_pt2_bf16_holds_bfloat16_weights_and_agrees(tiny, tmp_path):
    r = export(tiny, "pt2", tmp_path / "m.pt2", precision="bf16", input_size=RES, samples=6, verbose=False)
    module = torch.export.load(str(tmp_path / "m.pt2")).module()
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert r.report.passed and r.report.top1_agreement is not None
    assert any(n.startswith("bf16:") for n in r.report.notes)  # says whether the CPU has it


def test_openvino_bf16_really_runs_bf16_where_the_cpu_has_it(tiny, tmp_path):
    require("openvino")
    has, line = bf16_support()
    if not has:
        pytest.skip(line)
    import openvino as ov

    export(tiny, "openvino", tmp_path / "m.xml", precision="bf16", input_size=RES, samples=4, verbose=False)
    x = np.random.default_rng(0).standard_normal((2, 3, RES, RES)).astype(np.float32)
    with torch.inference_mode():
        ref = tiny(torch.from_numpy(x)).numpy()
    compiled = ov.Core().compile_model(str(tmp_path / "m.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    got = np.asarray(compiled([x])[compiled.output(0)])
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert 1e-4 < rel < 5e-2  # bf16 rounding, not fp32 (~1e-7) and not garbage


def test_bf16_support_is_one_line():
    has, line = bf16_support()
    assert has in (True, False, None) and line.startswith("bf16:") and "\n" not in line
