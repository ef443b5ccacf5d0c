"""Per-layer INT8 sensitivity: what quantizing each conv / linear layer *alone* costs.

The mechanism is torch fake quantization (mnv4.models.fake_quant) of one layer at a time on the
fused model (the graph every INT8 route quantizes): its weights per output channel, symmetric int8
(absmax / 127), and its input per tensor, asymmetric uint8 over the calibration set's min-max
range widened to hold 0. That is the scheme of the ONNX Runtime and NNCF routes
(``mnv4.deploy.quantize``: S8 per-channel weights, U8 activations), so a layer that ranks high here
is one those routes lose accuracy on. Every other layer stays float, so the loss is the layer's
own, not an interaction. Each layer costs one forward pass over the calibration images; outputs
are compared with the float model's: output SNR in dB (the logits' power over the error's), top-1
agreement and, with labels, accuracy.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import MNv4Error
from ..models.fake_quant import fake_quant_input, fake_quant_weight
from .fusion import fuse, is_fused

__all__ = [
    "LayerSensitivity",
    "SensitivityReport",
    "analyze",
    "analyze_folders",
    "quantizable_layers",
    "plot_sensitivity",
]

_BATCH = 32


@dataclass
class LayerSensitivity:
    name: str  # module path in the fused model (what --keep-float-layers takes)
    kind: str  # "conv", "depthwise conv" or "linear"
    snr_db: float  # logits' SNR with this layer alone quantized (higher is better; inf: no change)
    top1_agreement: float
    accuracy: float | None = None  # with labels


@dataclass
class SensitivityReport:
    layers: list[LayerSensitivity]  # worst first
    samples: int
    scheme: str = "weights: per-channel symmetric int8; inputs: per-tensor asymmetric uint8, min-max"
    accuracy_fp32: float | None = None
    notes: list[str] = field(default_factory=list)

    def worst(self, n: int) -> list[str]:
        return [layer.name for layer in self.layers[:n]]

    def to_dict(self) -> dict:
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v

        d = asdict(self)
        d["layers"] = [{k: clean(v) for k, v in layer.items()} for layer in d["layers"]]
        return d

    def table(self, limit: int = 10) -> str:
        rows = [f"{'layer':<40} {'kind':<15} {'SNR dB':>7} {'top-1 agr':>9}"]
        for layer in self.layers[:limit]:
            rows.append(f"{layer.name:<40} {layer.kind:<15} {layer.snr_db:7.1f} {layer.top1_agreement:9.1%}")
        return "\n".join(rows)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The fused model's conv and linear layers, by module path, in definition order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    return "depthwise conv" if m.groups > 1 and m.groups == m.in_channels else "conv"


def _input_ranges(model: nn.Module, layers: dict[str, nn.Module], x: torch.Tensor) -> dict[str, tuple]:
    """Each layer's input min and max over the calibration set (0 included, as the runtimes do)."""
    ranges: dict[str, list[float]] = {n: [0.0, 0.0] for n in layers}

    def observe(name):
        def hook(_m, args):
            r = ranges[name]
            r[0], r[1] = min(r[0], float(args[0].min())), max(r[1], float(args[0].max()))

        return hook

    handles = [m.register_forward_pre_hook(observe(n)) for n, m in layers.items()]
    try:
        _logits(model, x)
    finally:
        for h in handles:
            h.remove()
    return {n: tuple(r) for n, r in ranges.items()}


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(x[i : i + _BATCH]) for i in range(0, len(x), _BATCH)]).float()


def _with_layer_quantized(model: nn.Module, layer: nn.Module, lo: float, hi: float, x: torch.Tensor) -> torch.Tensor:
    def quantize_input(_m, args):
        return (fake_quant_input(args[0], lo, hi), *args[1:])

    original = layer.weight.data
    layer.weight.data = fake_quant_weight(original)
    handle = layer.register_forward_pre_hook(quantize_input)
    try:
        return _logits(model, x)
    finally:
        handle.remove()
        layer.weight.data = original


def _snr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = float(((ref - out) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((ref**2).sum()) / noise)


def analyze(
    model: nn.Module,
    calib: torch.Tensor,
    eval_x: torch.Tensor | None = None,
    labels: np.ndarray | None = None,
    layers: list[str] | None = None,
    progress: bool | None = False,
) -> SensitivityReport:
    """Quantize each conv/linear layer of ``model`` (fused first if it is not) alone and measure what
    it costs; the report lists the layers worst first (lowest SNR, then lowest agreement).

    ``calib`` (preprocessed images [N, C, R, R]) sets the input ranges and is what is measured on,
    unless ``eval_x`` is given (with ``labels``, its class indices, for accuracy). ``layers`` limits
    the analysis to those module paths."""
    from tqdm import tqdm

    if len(calib) < 2:
        raise MNv4Error("the sensitivity analysis needs at least 2 calibration images")
    model = (model if is_fused(model) else fuse(model)).eval()
    found = quantizable_layers(model)
    if layers is not None:
        unknown = [n for n in layers if n not in found]
        if unknown:
            raise MNv4Error(f"no conv/linear layer named {', '.join(unknown)}; see `mnv4 quantize analyze`'s list")
        found = {n: found[n] for n in layers}
    ranges = _input_ranges(model, found, calib.float())
    x = (calib if eval_x is None else eval_x).float()
    if labels is not None and len(labels) != len(x):
        raise MNv4Error(f"{len(labels)} labels for {len(x)} evaluation images")
    ref = _logits(model, x)
    ref_top1 = ref.argmax(1).numpy()
    rows = []
    disable = None if progress is None else not progress
    for name, layer in tqdm(found.items(), "layers", disable=disable):
        out = _with_layer_quantized(model, layer, *ranges[name], x)
        top1 = out.argmax(1).numpy()
        acc = float((top1 == labels).mean()) if labels is not None else None
        rows.append(LayerSensitivity(name, _kind(layer), _snr_db(ref, out), float((top1 == ref_top1).mean()), acc))
    rows.sort(key=lambda r: (r.snr_db, r.top1_agreement))
    fp32_acc = float((ref_top1 == labels).mean()) if labels is not None else None
    return SensitivityReport(rows, len(x), accuracy_fp32=fp32_acc)


def plot_sensitivity(report: SensitivityReport, path: str | os.PathLike, limit: int = 30) -> Path:
    """A horizontal bar plot of the worst ``limit`` layers' SNR (worst at the top), saved as PNG."""
    from ..plotting import pyplot, save_figure

    plt = pyplot()
    rows = report.layers[:limit]
    finite = [r.snr_db for r in rows if math.isfinite(r.snr_db)]
    cap = (max(finite) if finite else 0.0) + 10.0  # an unchanged layer (inf dB) gets a bar past the rest
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
    names = [f"{r.name} ({r.top1_agreement:.0%})" for r in rows][::-1]
    ax.barh(names, [r.snr_db if math.isfinite(r.snr_db) else cap for r in rows][::-1], color="tab:red")
    ax.set_xlabel("output SNR with only this layer INT8 (dB; lower = more sensitive); top-1 agreement in ()")
    ax.set_title(f"INT8 sensitivity per layer, {report.samples} calibration images")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def analyze_folders(
    model: nn.Module,
    calib_dir: str | os.PathLike,
    output: str | os.PathLike,
    eval_dir: str | os.PathLike | None = None,
    samples: int = 64,
    input_size: int | None = None,
    progress: bool | None = False,
) -> tuple[SensitivityReport, Path, Path]:
    """:func:`analyze` on image folders (``samples`` calibration images; ``eval_dir``: labelled images
    to measure on, up to ``samples`` of them), saved as ``output/sensitivity.json`` and ``.png``."""
    from ..data.images import BadImageLog
    from ..errors import check_input_size, check_int
    from ..files import atomic_write_json, check_output_path
    from ..models.meta import weights_meta
    from .inputs import load_images

    check_int("calib_samples", samples, 2)  # named as the CLI's --calib-samples
    if input_size is not None:
        check_input_size(input_size)
    check_output_path(output, "output", folder=True)
    meta = weights_meta(model)
    classes = list(meta.class_names) if meta.class_names else None
    bad = BadImageLog()  # each unreadable file named once, as every command that reads images does
    calib = load_images(
        calib_dir, meta.preprocess, input_size, samples, 0, classes, bad, progress=progress, what="calibration"
    )
    eval_x = labels = None
    if eval_dir is not None:
        ev = load_images(
            eval_dir, meta.preprocess, input_size, samples, 0, classes, bad, progress=progress, what="evaluation"
        )
        eval_x, labels = ev.images, ev.labels
    report = analyze(model.eval(), calib.images, eval_x, labels, progress=progress)
    report.notes.append(f"input ranges from {len(calib.images)} images of {calib_dir}")
    if eval_dir is not None:
        report.notes.append(
            f"measured on {len(eval_x)} images of {eval_dir}" + ("" if labels is not None else " (unlabelled)")
        )
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    js = atomic_write_json(out / "sensitivity.json", report.to_dict())
    return report, js, plot_sensitivity(report, out / "sensitivity.png")
