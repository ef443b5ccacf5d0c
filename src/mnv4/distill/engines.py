"""The fastest route for a labelling teacher: eager PyTorch, ONNX Runtime or OpenVINO (docs/distillation.md).

``accelerate(teacher, engine, sample)`` exports the teacher's network with the project's exporters
(``mnv4.deploy.writers``), loads it in that runtime (``mnv4.deploy.runners``) with this process's thread
count, and keeps it only if its probabilities on ``sample`` match eager PyTorch's within ``tolerance``;
otherwise, or when the runtime is missing or cannot take the network, labelling stays on eager PyTorch
(channels_last, as :class:`~mnv4.distill.teachers.Teacher` runs it) and says why. Preprocessing (resize,
normalisation) stays in torch on every route, so only the network's arithmetic differs.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..data.images import BadImage
from ..errors import MNv4Error, check_choice
from .requests import ENGINES
from .sources import ImageSource, to_uint8
from .teachers import Teacher

__all__ = ["ENGINES", "accelerate", "available_engines", "parity_sample"]

# runtime -> (module that must be importable, artefact file name); auto tries them in this order
_RUNTIMES = {"openvino": ("openvino", "teacher.xml"), "onnxruntime": ("onnxruntime", "teacher.onnx")}
_EXTRA = {"openvino": "openvino", "onnxruntime": "onnx"}


def parity_sample(source: ImageSource, teacher: Teacher, n: int = 8) -> torch.Tensor:
    """Up to ``n`` readable images of ``source`` in the teacher's evaluation view: the parity check's inputs."""
    views = []
    for i in range(min(len(source), 4 * n)):
        image = source.load(i)
        if not isinstance(image, BadImage):
            views.append(teacher.view(to_uint8(image)))
        if len(views) == n:
            break
    return torch.stack(views)


def available_engines() -> list[str]:
    """The runtimes installed here, in the order ``auto`` tries them."""
    return [name for name, (module, _) in _RUNTIMES.items() if importlib.util.find_spec(module) is not None]


class _RuntimeNet(nn.Module):
    """A runtime's runner as a module: normalised float NCHW in, logits out (no parameters)."""

    def __init__(self, runner: Callable) -> None:
        super().__init__()
        self.runner = runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.runner(x.detach().cpu().contiguous().numpy()))


def _converted(teacher: Teacher, engine: str, example: torch.Tensor) -> Teacher:
    from ..deploy.runners import RunOptions, load_onnx, load_openvino
    from ..deploy.writers import WriteJob, write_onnx, write_openvino

    write, load = {"onnxruntime": (write_onnx, load_onnx), "openvino": (write_openvino, load_openvino)}[engine]
    options = RunOptions(threads=torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="mnv4-teacher-") as tmp:
        path = Path(tmp) / _RUNTIMES[engine][1]
        write(teacher.model, example.contiguous(), path, WriteJob("fp32"))
        runner = load(path, options)  # the runtime holds the network in memory: the files may go
        runner(example.contiguous().numpy())
    identity = dict(teacher.identity, engine=engine)  # the manifest says which route labelled
    return Teacher(_RuntimeNet(runner), teacher.preprocess, teacher.class_names, identity)


def accelerate(
    teacher: Teacher,
    engine: str,
    sample: torch.Tensor,
    say: Callable[[str], None] = print,
    tolerance: float = 1e-4,
    outputs: str = "probabilities",
    batch: int | None = None,
) -> tuple[Teacher, str]:
    """(the teacher on ``engine``, the engine used): ``auto`` takes the first installed runtime that
    passes the parity check on ``sample`` (uint8 images [N, 3, H, W]); a named runtime that is missing
    or fails the check is an error, so a user who asked for it knows. ``outputs="features"`` checks raw
    outputs (a feature extractor's) relative to their largest magnitude instead of probabilities.
    ``batch``: the batch size the caller will run; the runtime prepares for it with the export (OpenVINO
    compiles one network per input shape, a few tenths of a second each)."""
    check_choice("engine", engine, ENGINES)
    if engine == "eager":
        return teacher, "eager"
    if teacher.device.type != "cpu":
        say(f"teacher engine {engine}: the teacher is on {teacher.device}; labelling with eager PyTorch")
        return teacher, "eager"
    tries = available_engines() if engine == "auto" else [engine]
    if engine != "auto" and engine not in available_engines():
        raise MNv4Error(f"`engine` {engine}: not installed (pip install 'mnv4[{_EXTRA[engine]}]')")

    def out(t: Teacher) -> torch.Tensor:
        return t.probs(sample) if outputs == "probabilities" else t.logits(sample).cpu()

    want = out(teacher)
    scale = 1.0 if outputs == "probabilities" else max(float(want.abs().max()), 1e-12)
    for name in tries:
        t0 = time.perf_counter()
        try:
            fast = _converted(teacher, name, teacher.model_input(sample))
            diff = float((out(fast) - want).abs().max()) / scale
        except Exception as e:  # a network the exporter cannot take: eager still can
            first = (str(e).splitlines() or [""])[0][:120]
            problem = f"cannot run this teacher ({type(e).__name__}: {first})"
        else:
            if diff <= tolerance:
                if batch is not None and batch != len(sample):
                    fast.logits(sample[:1].expand(batch, -1, -1, -1))
                say(
                    f"teacher runs on {name}: {outputs} within {diff:.1e} of eager PyTorch on {len(sample)} "
                    f"images (export and check {time.perf_counter() - t0:.0f} s)"
                )
                return fast, name
            problem = f"{outputs} differ from eager PyTorch by {diff:.1e} (> {tolerance:g})"
        if engine != "auto":
            raise MNv4Error(f"`engine` {name}: {problem}; use --engine eager")
        say(f"teacher engine {name}: {problem}; trying the next")
    say("teacher runs on eager PyTorch")
    return teacher, "eager"
