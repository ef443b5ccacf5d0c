"""PTQ settings (mnv4.deploy.ptq): each reaches its runtime's quantizer, and a route that cannot honour
one says so before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mnv4.deploy.export import export
from mnv4.deploy.ptq import ROUTE_SETTINGS, PTQSettings
from mnv4.errors import MNv4Error

from .conftest import require
from .test_export import RES, _tiny, digits  # noqa: F401  (digits: the trained fixture)


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _calib(n: int = 16) -> torch.Tensor:
    x = torch.randn(n, 3, RES, RES, generator=torch.Generator().manual_seed(2))
    x[0, 0, 0, 0] = 40.0  # one far outlier value: min-max covers it, the 99.999th percentile does not
    return x


def _initializers(path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _dequantize_scales(path, weights: bool) -> list[np.ndarray]:
    """Scales of DequantizeLinear nodes on weights (int8 initializers) or on activations (computed
    tensors; bias initializers are neither), in graph order."""
    import onnx

    graph, init = onnx.load(str(path)).graph, _initializers(path)
    out = []
    for n in graph.node:
        if n.op_type == "DequantizeLinear":
            if (n.input[0] in init and init[n.input[0]].dtype == np.int8) if weights else n.input[0] not in init:
                out.append(init[n.input[1]])
    return out


def test_onnx_weight_granularity_reaches_the_graph(tiny, tmp_path):
    require("onnxruntime")
    kw = dict(precision="int8", calib_data=_calib(), input_size=RES, samples=4, min_top1=0.0, verbose=False)
    export(tiny, "onnx", tmp_path / "pc.onnx", **kw)
    r = export(tiny, "onnx", tmp_path / "pt.onnx", weight_granularity="per-tensor", **kw)
    assert any(s.size > 1 for s in _dequantize_scales(tmp_path / "pc.onnx", weights=True))
    assert all(s.size == 1 for s in _dequantize_scales(tmp_path / "pt.onnx", weights=True))
    assert r.report.ptq == {"weight_granularity": "per-tensor"}


def test_onnx_percentile_clips_the_outlier_minmax_keeps(tiny, tmp_path):
    require("onnxruntime")
    kw = dict(precision="int8", calib_data=_calib(), input_size=RES, samples=4, min_top1=0.0, verbose=False)
    kw["int8_all_layers"] = True  # so the input itself is quantized (the stem's input)
    export(tiny, "onnx", tmp_path / "mm.onnx", calibration="minmax", **kw)
    export(tiny, "onnx", tmp_path / "pc.onnx", calibration="percentile", **kw)
    first_minmax = float(_dequantize_scales(tmp_path / "mm.onnx", weights=False)[0])
    first_pct = float(_dequantize_scales(tmp_path / "pc.onnx", weights=False)[0])
    assert first_minmax * 255 >= 40  # the range holds the 40.0 pixel
    assert first_pct < first_minmax / 3


@pytest.mark.parametrize("setting, most", [("on", 64), ("off", 127)])
def test_onnx_reduce_range_stores_7_bit_weights(tiny, tmp_path, setting, most):
    """ORT's uint8 x int8 kernels on x86 without VNNI add product pairs in int16 with saturation;
    7-bit weights keep every pair in range (docs/deploy.md, "INT8 on CPUs without VNNI")."""
    require("onnxruntime")
    kw = dict(precision="int8", calib_data=_calib(), input_size=RES, samples=4, min_top1=0.0, verbose=False)
    r = export(tiny, "onnx", tmp_path / "q.onnx", reduce_range=setting, **kw)
    weights = [w for w in _initializers(tmp_path / "q.onnx").values() if w.dtype == np.int8 and w.ndim == 4]
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == most
    assert r.report.ptq == {"reduce_range": setting}
    assert f"int8: {7 if setting == 'on' else 8}-bit weights (reduce_range {setting})" in r.report.notes


def test_onnx_reduce_range_defaults_to_the_cpu(monkeypatch):
    import mnv4.deploy.ptq as ptq

    for saturates in (True, False):
        monkeypatch.setattr(ptq, "ort_u8s8_saturates", lambda s=saturates: s)
        assert PTQSettings().onnx_reduce_range is saturates
        assert PTQSettings(reduce_range="off").onnx_reduce_range is False
        assert PTQSettings(reduce_range="on").onnx_reduce_range is True


@pytest.mark.parametrize(
    "fmt, kwargs, message",
    [
        ("litert", {"calibration": "entropy"}, "litert int8 cannot honour calibration=entropy"),
        ("openvino", {"calibration": "entropy"}, "cannot honour calibration=entropy"),
        ("onnx", {"bias_correction": "full"}, "cannot honour bias_correction=full"),
        ("openvino", {"reduce_range": "on"}, "cannot honour reduce_range=on"),
        ("openvino", {"max_accuracy_drop": 0.01}, "needs labelled evaluation images"),
    ],
)
def test_settings_a_route_cannot_honour_fail_first(tiny, tmp_path, fmt, kwargs, message):
    with pytest.raises(MNv4Error, match=message):
        export(tiny, fmt, tmp_path / "x", precision="int8", calib_data=_calib(), verbose=False, **kwargs)
    assert not list(tmp_path.iterdir())


def test_settings_need_int8(tiny, tmp_path):
    with pytest.raises(MNv4Error, match="int8 exports only"):
        export(tiny, "onnx", tmp_path / "x.onnx", calibration="percentile", verbose=False)


def test_every_int8_route_says_what_it_offers():
    from mnv4.deploy.formats import FORMATS

    assert set(ROUTE_SETTINGS) == {f.name for f in FORMATS.values() if f.int8}
    assert PTQSettings().chosen() == {}
    assert PTQSettings(calibration="percentile").unsupported("litert") == ["calibration=percentile"]


@pytest.mark.slow
def test_openvino_accuracy_control_and_bias_correction_on_digits(digits, tmp_path):  # noqa: F811
    require("nncf")
    model, train_dir, val_dir = digits
    kw = dict(precision="int8", calib_dir=train_dir, eval_dir=val_dir, calib_samples=64, samples=120, verbose=False)
    r = export(model, "openvino", tmp_path / "ac.xml", max_accuracy_drop=0.01, bias_correction="full", **kw)
    rep = r.report
    assert rep.ptq == {"bias_correction": "full", "max_accuracy_drop": 0.01}
    assert rep.accuracy_reference is not None and rep.accuracy_exported is not None
    # NNCF validates on these same images: the drop it allowed is what the report measures
    assert rep.accuracy_delta >= -0.01 - 1e-9
