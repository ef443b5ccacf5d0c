"""One writer per export format: a fused model in, an artefact on disk out.

Every writer has the signature ``write(model, example, target, job)``: ``model`` is the fused,
eval-mode model (already cast to half when the format's fp16 route casts the torch model),
``example`` a small input batch of the model's dtype, ``target`` the path to write (inside a
temporary folder; :func:`write_atomically` moves the result into place) and ``job`` the precision
and INT8 settings. Each writer imports its converter lazily; which writer serves which format is
recorded in :data:`mnv4.deploy.formats.FORMATS`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MNv4Error, missing_extra
from .ptq import DEFAULT_PTQ, PTQSettings

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "WriteJob",
    "export_program",
    "write_atomically",
    "previous_artefact_kept",
    "write_onnx",
    "write_openvino",
    "write_litert",
    "write_executorch",
    "write_coreml",
    "write_torchscript",
    "write_pt2",
    "TORCHSCRIPT_META",
]

TORCHSCRIPT_META = "mnv4.json"  # extra file inside a TorchScript artefact: {"dtype": "torch.float16"}


@dataclass(frozen=True)
class WriteJob:
    precision: str  # fp32 | fp16 | int8
    calib: torch.Tensor | None = None  # preprocessed calibration batch [N, C, R, R] for int8
    float_ends: bool = False  # int8: keep the stem conv and the post-pool head in float
    dynamic_batch: bool = True  # False: the example's batch is the artefact's (fixed) batch
    keep_float: tuple[str, ...] = ()  # int8: module paths (in the fused model) left float
    ptq: PTQSettings = DEFAULT_PTQ  # int8: calibration method, granularity, NNCF options
    validation: tuple | None = None  # int8 accuracy control: (raw inputs, labels)


def export_program(model: nn.Module, example: torch.Tensor, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension, or with the example's batch fixed.

    A batch-1 example would let export specialise the batch to the constant 1, so the example is
    repeated to batch 2 and the batch dim marked ``Dim.AUTO``.
    """
    import torch

    if not dynamic_batch:
        return torch.export.export(model, (example,))
    x = example[:1].expand(2, *example.shape[1:]).contiguous()
    return torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir / path.name)`` then move everything it produced next to ``path``, the main
    artefact last, so a crash never leaves a half-written artefact (OpenVINO writes .xml + .bin,
    Core ML a directory). Converters create their files with ``open()``, so they get the permissions
    the umask allows; only the temporary folder itself is private, and it is not moved. The folder is named
    like ``atomic_write``'s temp files (writer's pid inside), so one left by a killed export is removed by the
    next export to the same path."""
    from ..files import TEMP_SUFFIX, remove_orphan_temps

    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphan_temps(path.parent, name=path.name)
    prefix = f".{path.name}.{os.getpid()}."
    with tempfile.TemporaryDirectory(prefix=prefix, suffix=TEMP_SUFFIX, dir=path.parent) as tmp:
        target = Path(tmp) / path.name
        write(target)
        if not target.exists():
            raise MNv4Error(f"the exporter wrote no {path.name}")
        produced = sorted(Path(tmp).iterdir(), key=lambda p: p == target)
        for item in produced:
            dest = path.parent / item.name
            if dest.is_dir() and item.is_dir():
                shutil.rmtree(dest)
            os.replace(item, dest)
    return path


def _artefact_group(path: Path) -> list[Path]:
    """The files one export leaves at ``path``: the artefact (OpenVINO: .xml + .bin), its parity report and
    a detector's sidecar."""
    group = [path, Path(f"{path}.parity.json"), Path(f"{path}.detector.json")]
    if path.suffix.lower() == ".xml":
        group.insert(1, path.with_suffix(".bin"))
    return group


def _failed_name(member: Path, path: Path) -> Path:
    """``m.onnx`` -> ``m.failed.onnx``, ``m.onnx.parity.json`` -> ``m.failed.onnx.parity.json`` (OpenVINO's
    ``m.bin`` -> ``m.failed.bin``, still beside its .xml)."""
    return member.with_name(f"{path.stem}.failed{member.name[len(path.stem) :]}")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


_BACKUP_PREFIX = ".{name}.previous."  # + the exporting process's pid + a random part


def _restore_interrupted(path: Path) -> list[Path]:
    """Put back the artefact that an export killed midway (SIGKILL, power loss: no ``except`` ran) had moved
    aside: the interrupted export's own files at ``path`` never passed their check, so they give way. Backups
    of a live export (its pid still runs) are left alone. Returns the files put back."""
    from ..files import _pid_alive

    prefix = _BACKUP_PREFIX.format(name=path.name)
    restored: list[Path] = []
    for backup in sorted(path.parent.glob(glob.escape(prefix) + "*")):
        pid = backup.name[len(prefix) :].split(".")[0]
        if not backup.is_dir() or (pid.isdigit() and (int(pid) == os.getpid() or _pid_alive(int(pid)))):
            continue
        items = list(backup.iterdir())
        if items:
            for member in _artefact_group(path):
                _remove(member)
        for item in items:
            os.replace(item, path.parent / item.name)
            restored.append(path.parent / item.name)
        backup.rmdir()
    return restored


@contextlib.contextmanager
def previous_artefact_kept(path: Path) -> Iterator[None]:
    """An export over an existing artefact never loses it: the previous files are moved aside first; a new
    artefact that fails its parity check is moved to ``NAME.failed.EXT`` (with its report, for inspection)
    and the previous one is put back; any other failure removes the new files and puts it back; success
    discards it. With no previous artefact this does nothing (a failed one stays at ``path``). An export killed
    before it could clean up leaves the previous files in ``.NAME.previous.PID.*`` beside ``path``; the next
    export to ``path`` puts them back first (:func:`_restore_interrupted`)."""
    from .parity import ParityError

    path = Path(path)
    _restore_interrupted(path)
    if not (path.exists() or path.is_symlink()):
        yield
        return
    backup = Path(tempfile.mkdtemp(prefix=f"{_BACKUP_PREFIX.format(name=path.name)}{os.getpid()}.", dir=path.parent))
    for member in _artefact_group(path):
        if member.exists() or member.is_symlink():
            os.replace(member, backup / member.name)

    def restore() -> None:
        for item in backup.iterdir():
            os.replace(item, path.parent / item.name)
        backup.rmdir()

    try:
        yield
    except ParityError as e:
        for member in _artefact_group(path):
            if member.exists():
                target = _failed_name(member, path)
                _remove(target)
                os.replace(member, target)
        restore()
        failed = _failed_name(path, path)
        raise ParityError(f"{str(e).replace(str(path), str(failed))}; the previous {path.name} is kept") from None
    except BaseException:
        for member in _artefact_group(path):
            _remove(member)
        restore()
        raise
    shutil.rmtree(backup)


def _onnx_program(model: nn.Module, example: torch.Tensor, target: Path, job: WriteJob) -> None:
    import torch

    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise missing_extra("onnx and onnxscript", "onnx") from None
    ep = export_program(model, example, job.dynamic_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(ep, (example,), dynamo=True, external_data=False, optimize=True, verbose=False)
    program.save(str(target))


def _calib_batch(example: torch.Tensor, job: WriteJob) -> int:
    """Calibration chunks: single images for a dynamic batch, else the artefact's fixed batch."""
    return 1 if job.dynamic_batch else len(example)


def write_onnx(model: nn.Module, example: torch.Tensor, target: Path, job: WriteJob) -> None:
    if job.precision != "int8":
        _onnx_program(model, example, target, job)
        return
    from .quantize import quantize_onnx

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        _onnx_program(model, example, fp32, job)
        batch = _calib_batch(example, job)
        quantize_onnx(fp32, target, job.calib, job.float_ends, batch, job.keep_float, job.ptq)


def write_openvino(model: nn.Module, example: torch.Tensor, target: Path, job: WriteJob) -> None:
    try:
        import openvino as ov
    except ImportError:
        raise missing_extra("openvino", "openvino") from None
    program = export_program(model, example, job.dynamic_batch)
    ov_model = ov.convert_model(program)
    if job.precision == "int8":
        from .quantize import openvino_layer_ops, quantize_openvino

        kept = openvino_layer_ops(program, ov_model, job.keep_float) if job.keep_float else []
        batch = _calib_batch(example, job)
        ov_model = quantize_openvino(ov_model, job.calib, job.float_ends, batch, kept, job.ptq, job.validation)
    # save_model compresses weights to fp16 by default; keep fp32 weights unless fp16 was asked for.
    ov.save_model(ov_model, str(target), compress_to_fp16=job.precision == "fp16")


def write_litert(model: nn.Module, example: torch.Tensor, target: Path, job: WriteJob) -> None:
    try:
        import litert_torch
    except ImportError:
        raise missing_extra("litert-torch", "litert") from None
    from .fusion import token_major_attention

    # LiteRT runs NHWC: token-major attention needs no transposes there (docs/deploy.md).
    model = token_major_attention(model)
    x = example  # the artefact's fixed batch
    if job.precision == "int8":
        from litert_torch.quantize.quant_config import QuantConfig

        from .quantize import litert_quantizer, pt2e_quantize

        quantizer = litert_quantizer(job.ptq.per_channel)
        qmodel = pt2e_quantize(model, x, job.calib, quantizer, fold_quantize=False)
        edge = litert_torch.convert(qmodel, (x,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
    else:
        edge = litert_torch.convert(model, (x,))
    edge.export(str(target))


def write_executorch(model: nn.Module, example: torch.Tensor, target: Path, job: WriteJob) -> None:
    import torch

    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError:
        raise missing_extra("executorch", "executorch") from None
    x = example  # the artefact's fixed batch
    if job.precision == "int8":
        from .quantize import pt2e_quantize, xnnpack_quantizer

        model = pt2e_quantize(model, x, job.calib, xnnpack_quantizer(job.ptq.per_channel))
    ep = torch.export.export(model, (x,))
    # Always lower to XNNPACK: a portable-kernel-only .pte is correct but ~300x slower.
    program = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    target.write_bytes(program.buffer)


def write_coreml(model: nn.Module, example: torch.Tensor, target: Path, job: WriteJob) -> None:
    import torch

    try:
        import coremltools as ct
    except ImportError:
        raise missing_extra("coremltools", "coreml") from None
    x = example  # the artefact's fixed batch
    # Only the torch.export frontend works with numpy 2 (the TorchScript one crashes).
    ep = torch.export.export(model, (x,)).run_decompositions({})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlmodel = ct.convert(
            ep,
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16 if job.precision == "fp16" else ct.precision.FLOAT32,
            minimum_deployment_target=ct.target.iOS16,
        )
    mlmodel.save(str(target))


def write_torchscript(model: nn.Module, example: torch.Tensor, target: Path, job: WriteJob) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.trace is deprecated in favour of torch.export, still works
        traced = torch.jit.trace(model, example[:1], check_trace=False)
        traced = torch.jit.freeze(traced.eval())
    # A frozen module has no parameters left to tell its dtype by; record it for the loader.
    traced.save(str(target), _extra_files={TORCHSCRIPT_META: json.dumps({"dtype": str(example.dtype)})})


def write_pt2(model: nn.Module, example: torch.Tensor, target: Path, job: WriteJob) -> None:
    import torch

    torch.export.save(export_program(model, example, job.dynamic_batch), str(target))
