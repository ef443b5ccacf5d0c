"""What ``export`` and ``bench`` are asked to do: typed frozen requests, the one home of their defaults.

The CLI generates the commands' flags from these fields (:func:`mnv4.cli.args.add_request_flags`);
the library functions take a request, or keyword arguments that build one. Nothing here imports
torch or a runtime.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MAX_INPUT_SIZE, MIN_INPUT_SIZE, InvalidValue, MNv4Error, check_float, check_input_size, check_int
from ..perf.latency import LatencyProtocol
from ..requests import option
from .formats import FORMATS, PRECISIONS, Format, get_format
from .ptq import (
    BIAS_CORRECTIONS,
    CALIBRATIONS,
    GRANULARITIES,
    NNCF_PRESETS,
    REDUCE_RANGES,
    ROUTE_SETTINGS,
    PTQSettings,
)

__all__ = [
    "ExportRequest",
    "BenchRequest",
    "MIN_INPUT_SIZE",
    "MAX_INPUT_SIZE",
    "DEFAULT_BENCH_THREADS",
    "TORCH_RUNTIMES",
    "ALL_RUNTIMES",
]

# In-process torch runtimes (no artefact): name -> what runs. Exported runtimes come from FORMATS.
TORCH_RUNTIMES: dict[str, str] = {
    "torch": "eager PyTorch, the model as built",
    "torch-fused": "mnv4.deploy.cpu.optimize_for_cpu for MNv4 (fuse + pre-packed oneDNN convs), BN folding for others",
    "torch-compile": "torch.compile (inductor, freezing) of the fused model",
}
ALL_RUNTIMES = (*TORCH_RUNTIMES, *(f.runtime for f in FORMATS.values()))
DEFAULT_BENCH_THREADS = 2  # the protocol fixes threads; bench warns when it had to pick them on a busy machine

LAYOUTS = ("nchw", "nhwc")
INPUT_DTYPES = ("float32", "uint8")


def parse_batch(value: str | int | None) -> int | None:
    """``--batch``: None or ``"dynamic"`` -> None (dynamic), ``N`` -> N; anything else -> ValueError."""
    if value is None or value == "dynamic":
        return None
    n = int(value)  # "abc" raises ValueError, which the request turns into a clear message
    if n < 1:
        raise ValueError(n)
    return n


def _check_folders(*folders: tuple[str, str | os.PathLike | None, str]) -> None:
    """Each given image folder exists and holds an image, before any work (a bench would otherwise build and
    time every runtime before finding its calibration folder empty)."""
    from ..data.images import IMAGE_SUFFIXES

    for name, folder, role in folders:
        if folder is None:
            continue
        path = Path(folder)
        if path.is_file():
            raise MNv4Error(f"`{name}` {folder} is a file; pass the {role} folder that holds the images")
        if not path.is_dir():
            raise MNv4Error(f"{role} folder not found: {folder} (`{name}`)")
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
            raise MNv4Error(
                f"no images in the {role} folder {folder} (`{name}`; looked for {', '.join(IMAGE_SUFFIXES)} files)"
            )


def _folder(flag: str, help: str):
    """An optional folder field and its flag."""
    return option(None, help, kind=str, flag=flag, metavar="DIR")


@dataclass(frozen=True)
class ExportRequest:
    """One export: the artefact's format and precision, where its check's inputs come from, its bars."""

    format: str = option(help="artefact format / runtime", choices=tuple(FORMATS))
    output: str | os.PathLike | None = None  # a file, or a folder for the default name (CLI: -o)
    input_size: int | None = None  # default: the model's (CLI: --input-size)
    precision: str = option("fp32", "fp32, fp16, bf16 or post-training int8 (int8 needs --calib)", choices=PRECISIONS)
    calib_dir: str | os.PathLike | None = _folder(
        "--calib", "calibration image folder for int8 (flat or one folder per class)"
    )
    eval_dir: str | os.PathLike | None = _folder(
        "--eval",
        "labelled image folder to compare on and report the accuracy delta (a detector: a COCO/VOC/YOLO "
        "folder or digits, scored for AP before -> after)",
    )
    samples: int = option(16, "inputs used for the parity check")
    calib_samples: int = option(128, "calibration images for int8")
    min_top1: float | None = option(None, "top-1 agreement to require (0-1; default: the precision's bar)", kind=float)
    threads: int | None = None  # CLI: --threads
    int8_all_layers: bool = option(
        False,
        f"{', '.join(f.name for f in FORMATS.values() if f.float_ends)}: quantize the stem conv and head too "
        "(default: kept float; other formats: always int8)",
    )
    recalibrate_bn: bool | None = option(
        None,
        "re-estimate BatchNorm statistics before export (the artefact then differs from the checkpoint; "
        "default: only for random init, i.e. no --checkpoint/--pretrained)",
        kind=bool,
    )

    input_layout: str = option("nchw", "the artefact's input layout (nhwc: what cameras hand over)", choices=LAYOUTS)
    input_dtype: str = option(
        "float32",
        "the artefact's input: normalised float32, or uint8 pixels 0-255 with the weights' normalisation in the graph",
        choices=INPUT_DTYPES,
    )
    batch: str | None = option(
        None,
        "N (fixed batch) or dynamic (default: dynamic where the format can hold it, else 1)",
        kind=str,
        metavar="N|dynamic",
    )

    keep_float: int = option(
        0,
        "int8: keep the N layers most sensitive to INT8 float, ranked on the calibration images as `mnv4 quantize "
        f"analyze` does ({', '.join(f.name for f in FORMATS.values() if f.float_ends)}); the report gives the "
        "agreement and the latency cost",
    )
    keep_float_layers: tuple[str, ...] = option(
        (), "int8: comma list of layers (module paths, see `mnv4 quantize analyze`) kept float", kind=tuple
    )

    # PTQ settings (mnv4.deploy.ptq): None = the route's default; docs/deploy.md says how to choose.
    calibration: str | None = option(
        None, "int8 activation ranges: minmax, percentile, entropy (onnx: all; openvino: minmax, percentile)",
        kind=str, choices=CALIBRATIONS,
    )  # fmt: skip
    weight_granularity: str | None = option(
        None, "int8 weight scales per-channel or per-tensor (default: per-channel)", kind=str, choices=GRANULARITIES
    )
    nncf_preset: str | None = option(
        None, "openvino int8: NNCF preset, performance (symmetric) or mixed (asymmetric activations)",
        kind=str, choices=NNCF_PRESETS,
    )  # fmt: skip
    bias_correction: str | None = option(
        None, "openvino int8: NNCF bias correction, fast (NNCF's default), full or none", kind=str,
        choices=BIAS_CORRECTIONS,
    )  # fmt: skip
    max_accuracy_drop: float | None = option(
        None, "openvino int8: NNCF accuracy-controlled quantization on the labelled --eval images, keeping "
        "the top-1 drop under this (e.g. 0.01) by reverting layers to float", kind=float,
    )  # fmt: skip

    reduce_range: str | None = option(
        None, "onnx int8: 7-bit weights (on) or 8-bit (off); default: on where the CPU has no VNNI, whose "
        "ONNX Runtime int8 kernels saturate with 8-bit weights", kind=str, choices=REDUCE_RANGES,
    )  # fmt: skip

    def ptq(self) -> PTQSettings:
        return PTQSettings(
            self.calibration,
            self.weight_granularity,
            self.nncf_preset,
            self.bias_correction,
            self.max_accuracy_drop,
            self.reduce_range,
        )

    @property
    def fixed_batch(self) -> int | None:
        """The fixed batch asked for, None for a dynamic one (call after :meth:`validated`)."""
        return parse_batch(self.batch)

    def batch_for(self, info: Format) -> int | None:
        """The artefact's batch: N, or None for dynamic (the format's default when not asked)."""
        if self.batch is None:
            return None if info.dynamic_batch else 1
        return self.fixed_batch

    def _check_inputs(self, info: Format) -> None:
        """The mobile-input fields, against what the format can hold (its record says)."""
        if self.input_layout not in LAYOUTS:
            raise InvalidValue("input_layout", self.input_layout, f"choose one of {', '.join(LAYOUTS)}")
        if self.input_dtype not in INPUT_DTYPES:
            raise InvalidValue("input_dtype", self.input_dtype, f"choose one of {', '.join(INPUT_DTYPES)}")
        if self.input_dtype == "uint8" and not info.uint8_input:
            others = ", ".join(f.name for f in FORMATS.values() if f.uint8_input)
            raise MNv4Error(f"{info.name} cannot take uint8 pixels in mnv4 (`input_dtype`); formats that can: {others}")
        try:
            n = parse_batch(self.batch)
        except (TypeError, ValueError):
            raise InvalidValue("batch", self.batch, "give a whole number >= 1 or 'dynamic'") from None
        if n is None and self.batch is not None and not info.dynamic_batch:
            others = ", ".join(f.name for f in FORMATS.values() if f.dynamic_batch)
            raise MNv4Error(f"{info.name} artefacts have a fixed batch (`batch`); dynamic batch: {others}")
        if n is not None and not info.fixed_batch:
            raise MNv4Error(f"{info.name} artefacts always take any batch; leave `batch` out")

    def _check_ptq(self, info: Format) -> None:
        settings = self.ptq()
        if not settings.chosen():
            return
        if self.precision != "int8":
            names = ", ".join(f"`{k}`" for k in settings.chosen())
            verb, them = ("applies", "it") if len(settings.chosen()) == 1 else ("apply", "them")
            raise MNv4Error(f"{names} {verb} to int8 exports only; drop {them} or set `precision` int8")
        bad = settings.unsupported(info.name)
        if bad:
            offered = ", ".join(f"{f}: {', '.join(s) or 'none'}" for f, s in ROUTE_SETTINGS.items())
            raise MNv4Error(f"{info.name} int8 cannot honour {', '.join(bad)} (settings per route: {offered})")
        if self.max_accuracy_drop is not None:
            check_float("max_accuracy_drop", self.max_accuracy_drop, 0.0, 1.0)
            if self.eval_dir is None:
                raise MNv4Error("`max_accuracy_drop` needs labelled evaluation images (`eval_dir`)")

    def validated(self, has_calib_data: bool = False) -> Format:
        """Check the request in one place, before any work; returns the format's record."""
        info = get_format(self.format)
        if self.precision not in PRECISIONS:
            raise InvalidValue("precision", self.precision, f"choose one of {', '.join(PRECISIONS)}")
        info.require(self.precision)
        self._check_inputs(info)
        if self.input_size is not None:
            check_input_size(self.input_size)
        check_int("samples", self.samples, 1)
        check_int("calib_samples", self.calib_samples, 1)
        if self.min_top1 is not None:
            check_float("min_top1", self.min_top1, 0.0, 1.0)
        if self.threads is not None:
            check_int("threads", self.threads, 1)
        _check_folders(("calib_dir", self.calib_dir, "calibration"), ("eval_dir", self.eval_dir, "evaluation"))
        check_int("keep_float", self.keep_float, 0)
        if (self.keep_float or self.keep_float_layers) and not (self.precision == "int8" and info.float_ends):
            can = ", ".join(f.name for f in FORMATS.values() if f.float_ends)
            raise MNv4Error(f"`keep_float`/`keep_float_layers` apply to int8 on {can} only (format {info.name})")
        self._check_ptq(info)
        if self.precision == "int8" and self.calib_dir is None and not has_calib_data:
            raise MNv4Error("INT8 export needs calibration images: pass an image folder as `calib_dir`")
        return info


@dataclass(frozen=True)
class BenchRequest:
    """A benchmark: every (model, runtime, precision) the runtimes support, timed with ``protocol``."""

    models: tuple[str, ...] = ()  # CLI: -m (default: mnv4.deploy.zoo.default_models())
    runtimes: tuple[str, ...] | None = option(
        None, f"comma list of {','.join(ALL_RUNTIMES)} (default: the installed ones)", kind=tuple
    )
    precisions: tuple[str, ...] = option(("fp32",), f"comma list of {', '.join(PRECISIONS)}")
    input_size: int | None = None  # default: each model's (CLI: --input-size)
    threads: int | None = None  # None: DEFAULT_BENCH_THREADS, with a warning on a busy machine (CLI: --threads)
    protocol: LatencyProtocol = field(default_factory=LatencyProtocol)
    calib_dir: str | None = _folder("--calib", "calibration images for int8 routes (default: noise)")
    artefact_dir: str | None = None  # where exported runtimes' artefacts go (default: a temporary folder)
    timeout: float = 900.0  # seconds one measurement process may take

    @property
    def thread_count(self) -> int:
        return DEFAULT_BENCH_THREADS if self.threads is None else self.threads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchRequest:
        d = dict(d)
        d["protocol"] = LatencyProtocol(**d.get("protocol", {}))
        for key in ("models", "runtimes", "precisions"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    def checked_numbers(self) -> None:
        """The numeric fields and folders (the names are checked against the runtimes in mnv4.deploy.bench)."""
        if self.input_size is not None:
            check_input_size(self.input_size)
        if self.threads is not None:
            check_int("threads", self.threads, 1)
        self.protocol.validated()
        check_float("timeout", self.timeout, 0.0, lo_open=True)
        _check_folders(("calib_dir", self.calib_dir, "calibration"))
