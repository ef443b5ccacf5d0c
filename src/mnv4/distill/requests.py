"""What ``distill label`` and ``distill finetune --mode frozen`` are asked to do: the one home of their defaults.

:class:`LabelConfig` and :class:`FrozenConfig` are frozen dataclasses whose :func:`mnv4.requests.option`
fields become the commands' flags (:func:`mnv4.cli.args.add_request_flags`), with their type, default,
choices and help, so the library and the CLI cannot disagree. Nothing here imports torch: the CLI
builds its parser from these records at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import check_choice, check_float, check_input_size, check_int
from ..requests import option
from .policies import POLICIES, VIEW_POLICIES, AugPolicy, get_policy

__all__ = ["ENGINES", "LabelConfig", "FrozenConfig", "LABEL_COMMAND", "FROZEN_COMMAND"]

# Where a teacher runs (mnv4.distill.engines): auto takes the first installed runtime that passes the parity check.
ENGINES = ("auto", "eager", "onnxruntime", "openvino")

_TEACHER_HELP = (
    "mnv4 checkpoint, registered mnv4 model, efficientnet-lite0|1|2 (ImageNet, offline; extra 'teachers'), "
    "timm:NAME or torchvision:NAME (with --teacher-checkpoint), or a teacher file from `mnv4 distill finetune`"
)


def _engine(what: str) -> str:
    return option(
        "eager",
        f"{what}: auto takes the first installed runtime (OpenVINO, ONNX Runtime) whose outputs match eager "
        "PyTorch's on a few images, else eager",
        choices=ENGINES,
    )


@dataclass(frozen=True)
class LabelConfig:
    """One ``distill label`` run. ``out``, ``batch_size``, ``workers`` and ``device`` take the shared flags
    (``-o``, ``-b``, ``-j``, ``--device``; docs/cli.md); every other field with help is its own flag."""

    teacher: str = option(help=_TEACHER_HELP)
    data: str = option(
        help="labelled folder (class sub-folders, or train/), unlabelled folder, .tar/.tar.gz of images, "
        "or digits | cifar10 | fashion-mnist"
    )
    out: str
    aug: str = option(
        "inception-randaug-l2m9",
        "augmentation of each record (the paper's D1, D2, D3, or none)",
        choices=tuple(POLICIES),
    )
    crop_min: float | None = option(
        None,
        "smallest Inception-crop area fraction (default: the paper's 0.08; small images may want more)",
        kind=float,
        metavar="F",
    )
    replicas: int = option(1, "passes over the data, each with fresh augmentations", metavar="R")
    teacher_checkpoint: str | None = option(None, "weights for --teacher", kind=str, metavar="PATH")
    teacher_size: int | None = option(None, "resolution the teacher runs at (default: its own)", kind=int, metavar="N")
    record_size: int | None = option(
        None, "resolution of the stored images (default: the teacher's)", kind=int, metavar="N"
    )
    jpeg_quality: int = option(95, "JPEG round-trip quality", metavar="Q")
    top_k: int = option(
        0, "store the top K probabilities (+ the remaining mass) instead of all in float16", metavar="K"
    )
    shard_size: int = option(1000, "records per shard")
    # images per teacher batch: 16 keeps a batch's activations in the CPU's cache (at 128 px, 2x the
    # images/s of 64 in eager PyTorch: benchmarks/label_speed.py, docs/distillation.md "Labelling at speed")
    batch_size: int = 16
    workers: int = 0
    seed: int = option(0, "seed of the augmentations")
    device: str = "auto"
    check_images: int = option(2000, "first report the teacher's top-1 on N un-augmented labelled images (0: skip)")
    data_root: str | None = option(None, "cache folder of cifar10 / fashion-mnist", kind=str, metavar="DIR")
    engine: str = _engine("where the teacher runs")  # not in the records' identity

    def validate(self) -> LabelConfig:
        check_choice("aug", self.aug, POLICIES)
        check_choice("engine", self.engine, ENGINES)
        if self.crop_min is not None:
            check_float("crop_min", self.crop_min, 0.0, 1.0, lo_open=True)
        check_int("replicas", self.replicas, 1)
        if self.teacher_size is not None:
            check_input_size(self.teacher_size, "teacher_size")
        if self.record_size is not None:
            check_int("record_size", self.record_size, 8, 4096)
        check_int("jpeg_quality", self.jpeg_quality, 1, 100)
        check_int("top_k", self.top_k, 0)
        check_int("shard_size", self.shard_size, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("workers", self.workers, 0, 256)
        check_int("seed", self.seed, 0)
        check_int("check_images", self.check_images, 0)
        return self

    def policy(self) -> AugPolicy:
        return get_policy(self.aug, self.crop_min)


@dataclass(frozen=True)
class FrozenConfig:
    """``mnv4 distill finetune --mode frozen``: what to run the teacher on and how to fit its head. The fields
    with help are the mode's own flags; the others share ``distill finetune``'s (whose full mode takes the
    finetune recipe's defaults)."""

    teacher: str
    data: str
    out: str
    teacher_checkpoint: str | None = None
    input_size: int | None = None
    views: int = option(0, "augmented views per training image besides the un-augmented one", metavar="K")
    aug: str = option("inception-randaug-l2m5", "augmentation of the extra views", choices=VIEW_POLICIES)
    crop_min: float | None = option(None, "smallest crop area of the extra views", kind=float, metavar="F")
    # the best of 1e-3 ... 10 on cifar10-mini, 50 labels per class (docs/distillation.md)
    weight_decay: float = option(0.3, "L2 penalty of the head", flag="--head-wd", metavar="L")
    max_iter: int = 300
    batch_size: int = 64
    workers: int = 0
    seed: int = 0
    cache: str | None = option(
        None,
        "folder of cached teacher features (default OUTPUT/features; reruns reuse them)",
        kind=str,
        flag="--feature-cache",
        metavar="DIR",
    )
    engine: str = _engine("where the teacher computes its features")
    data_root: str | None = None

    def validate(self) -> FrozenConfig:
        check_int("views", self.views, 0)
        check_int("max_iter", self.max_iter, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("workers", self.workers, 0, 256)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_choice("aug", self.aug, VIEW_POLICIES)
        check_choice("engine", self.engine, ENGINES)
        self.policy()
        return self

    def policy(self) -> AugPolicy:
        return get_policy(self.aug, self.crop_min)


# The commands' defaults where they differ from the library's: a command takes the fastest teacher route
# that passes the parity gate (docs/distillation.md, `--engine`), and `distill label` makes its records in a
# worker process while the teacher runs; library calls stay eager and in-process unless asked.
LABEL_COMMAND = LabelConfig(teacher="", data="", out="", engine="auto", workers=1)
FROZEN_COMMAND = FrozenConfig(teacher="", data="", out="", engine="auto")
