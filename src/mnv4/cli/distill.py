"""``mnv4 distill label | finetune``: teacher soft-label datasets, and fine-tuning a non-MobileNetV4 teacher.

The student is trained by ``mnv4 train --distill DIR [--distill DIR2 ...] --mix 1:1:2`` (or online with
``--teacher T``); see docs/distillation.md.
"""

from __future__ import annotations

import argparse

from . import args as A

__all__ = ["register"]

_TEACHER_HELP = (
    "mnv4 checkpoint, registered mnv4 model, efficientnet-lite0|1|2 (ImageNet, offline; extra 'teachers'), "
    "timm:NAME or torchvision:NAME (with --teacher-checkpoint), or a teacher file from `mnv4 distill finetune`"
)


def _cmd_label(args: argparse.Namespace) -> int:
    from ..distill.label import LabelConfig, label
    from ..train.distributed import teardown

    if not args.output:
        from ..errors import MNv4Error

        raise MNv4Error("`output` is required: the folder the shards and manifest go to")
    cfg = LabelConfig(
        teacher=args.teacher,
        data=args.data,
        out=args.output,
        aug=args.aug,
        crop_min=args.crop_min,
        replicas=args.replicas,
        teacher_checkpoint=args.teacher_checkpoint,
        teacher_size=args.teacher_size,
        record_size=args.record_size,
        jpeg_quality=args.jpeg_quality,
        top_k=args.top_k,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        workers=args.workers,
        seed=args.seed,
        device=args.device,
        check_images=args.check_images,
        data_root=args.data_root,
        engine=args.engine,
    )
    try:
        res = label(cfg, progress=False if args.no_progress else None, max_shards=args.max_shards)
    finally:
        teardown()
    if res.stopped_early:
        from ..distill.label import resume_command

        print(f"stopped after --max-shards; continue with: {resume_command(cfg)}")
    elif res.manifest:
        print(
            f"soft-label dataset: {res.out} ({res.manifest['records']} records); train a student with: "
            f"mnv4 train --distill {res.out} --data LABELLED_VAL_DATA"
        )
    return 0


def _cmd_frozen(args: argparse.Namespace) -> int:
    from ..distill.frozen import FrozenConfig, frozen_teacher

    cfg = FrozenConfig(
        teacher=args.teacher,
        data=args.data,
        out=args.output,
        teacher_checkpoint=args.teacher_checkpoint,
        input_size=args.input_size,
        views=args.views,
        aug=args.aug,
        crop_min=args.crop_min,
        weight_decay=args.head_wd,
        batch_size=args.batch_size or 64,
        workers=args.workers or 0,
        seed=args.seed or 0,
        cache=args.feature_cache,
        data_root=args.data_root,
        engine=args.engine,
    )
    res = frozen_teacher(cfg, progress=False if args.no_progress else None)
    s = res.summary
    val = s.get("val")
    quality = (
        f"val top-1 {val['top1']:.2f}% (mean top probability {val['mean_max_prob']:.3f})"
        if val
        else f"train top-1 {s['train']['top1']:.2f}% (no val/ folder)"
    )
    print(
        f"teacher {args.teacher} with a fitted head at {s['input_size']} px: {quality}; features "
        f"{s['features_seconds']:.0f} s, head {s['fit_seconds']:.1f} s"
    )
    print(f"teacher weights: {res.teacher_file}  (use it as --teacher)")
    return 0


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..distill.teachers import save_ensemble_teacher

    out = Path(args.output) / "best.safetensors"
    path = save_ensemble_teacher(args.ensemble, out)
    print(f"ensemble of {len(args.ensemble)} teachers (probabilities averaged): {path}  (use it as --teacher)")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ..distill.finetune import finetune_teacher

    if args.ensemble:
        return _cmd_ensemble(args)
    if not args.teacher or not args.data:
        from ..errors import MNv4Error

        raise MNv4Error("`teacher` and `data` are required (or --ensemble FILE FILE ... to join teacher files)")
    if args.mode == "frozen":
        return _cmd_frozen(args)
    from ..train.distributed import teardown

    overrides = {
        k: v
        for k, v in dict(
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device,
            seed=args.seed,
            data_root=args.data_root,
            loggers=args.logger,
        ).items()
        if v is not None
    }
    try:
        res = finetune_teacher(
            args.teacher,
            args.data,
            args.output,
            input_size=args.input_size,
            teacher_checkpoint=args.teacher_checkpoint,
            progress=False if args.no_progress else None,
            exist_ok=args.exist_ok,
            **overrides,
        )
    finally:
        teardown()
    s = res.summary
    if res.stopped_early or not s:
        from ..train.runs import exit_code

        return exit_code(res.stop_reason) if res.stopped_early else 0
    print(
        f"teacher {args.teacher} fine-tuned on {s['dataset']}: best val top-1 {s['val_top1']:.2f}% at "
        f"{s['input_size']} px, {s['wall_seconds']:.0f} s"
    )
    print(f"teacher weights: {s['best_checkpoint']}  (use it as --teacher)")
    return 0


def register(sub) -> None:
    g = sub.add_group("distill", help="teacher soft-label datasets (label) and teacher fine-tuning (finetune)")
    _add_label(g)
    _add_finetune(g)


def _add_label(g) -> None:
    p = g.add_parser(
        "label",
        help="label augmented images with a teacher into WebDataset-style shards (resumable; torchrun splits shards)",
        epilog="Then: mnv4 train --distill DIR [--distill DIR2 ...] --mix 1:1:2 --data LABELLED_VAL_DATA",
    )
    p.add_argument("--teacher", required=True, help=_TEACHER_HELP)
    p.add_argument("--teacher-checkpoint", default=None, metavar="PATH", help="weights for --teacher")
    p.add_argument(
        "--teacher-size",
        type=A.positive_int,
        default=None,
        metavar="N",
        help="resolution the teacher runs at (default: its own)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="labelled folder (class sub-folders, or train/), unlabelled folder, .tar/.tar.gz of images, "
        "or digits | cifar10 | fashion-mnist",
    )
    p.add_argument(
        "--aug",
        default="inception-randaug-l2m9",
        choices=("inception-randaug-l2m9", "inception-extreme-mixup", "inception-randaug-l2m5", "none"),
        help="augmentation of each record (the paper's D1, D2, D3, or none)",
    )
    p.add_argument(
        "--crop-min",
        type=A.positive_float,
        default=None,
        metavar="F",
        help="smallest Inception-crop area fraction (default: the paper's 0.08; small images may want more)",
    )
    p.add_argument(
        "--replicas",
        type=A.positive_int,
        default=1,
        metavar="R",
        help="passes over the data, each with fresh augmentations",
    )
    A.add_output(p, help="folder for the shards and manifest.json (a killed run continues there)")
    _add_label_storage(p)
    A.add_batch_size(p, 64, help="images per teacher batch")
    _add_engine(p, "where the teacher runs")
    A.add_workers(p)
    A.add_device(p)
    A.add_threads(p)
    p.add_argument("--seed", type=A.nonneg_int, default=0, help="seed of the augmentations")
    p.add_argument(
        "--check-images",
        type=A.nonneg_int,
        default=2000,
        metavar="N",
        help="first report the teacher's top-1 on N un-augmented labelled images (0: skip)",
    )
    p.add_argument("--data-root", default=None, help="cache folder of cifar10 / fashion-mnist")
    p.add_argument(
        "--max-shards",
        type=A.positive_int,
        default=None,
        metavar="N",
        help="stop after N shards (continue later with the same command)",
    )
    A.add_progress(p)
    p.set_defaults(func=_cmd_label)


def _add_label_storage(p) -> None:
    """How ``distill label`` stores its records: image size, JPEG quality, probabilities, shard size."""
    p.add_argument(
        "--record-size",
        type=A.positive_int,
        default=None,
        metavar="N",
        help="resolution of the stored images (default: the teacher's)",
    )
    p.add_argument("--jpeg-quality", type=A.positive_int, default=95, metavar="Q", help="JPEG round-trip quality")
    p.add_argument(
        "--top-k",
        type=A.nonneg_int,
        default=0,
        metavar="K",
        help="store the top K probabilities (+ the remaining mass) instead of all in float16",
    )
    p.add_argument("--shard-size", type=A.positive_int, default=1000, metavar="N", help="records per shard")


def _add_finetune(g) -> None:
    p = g.add_parser(
        "finetune",
        help="fine-tune a non-MobileNetV4 teacher (EfficientNet-Lite, timm, torchvision) on labelled images",
    )
    p.add_argument("--teacher", default=None, help="efficientnet-lite0|1|2, timm:NAME or torchvision:NAME")
    p.add_argument("--teacher-checkpoint", default=None, metavar="PATH", help="weights for --teacher")
    p.add_argument("--data", default=None, help="labelled folder (train/ and val/, or class folders) or built-in")
    p.add_argument(
        "--ensemble",
        nargs="+",
        default=None,
        metavar="FILE",
        help="instead of training: join these teacher files into one teacher (probabilities averaged) in OUTPUT",
    )
    A.add_output(p, help="run folder; its best.safetensors is the teacher", default="runs/teacher")
    A.add_input_size(p, help="resolution to fine-tune and label at (default: the teacher's own)")
    _add_frozen_options(p)
    p.add_argument("--epochs", type=float, default=None, help="default: the finetune recipe's")
    p.add_argument("--lr", type=float, default=None, help="peak LR (default: the finetune recipe's)")
    A.add_batch_size(p, None, help="batch size (default: the finetune recipe's)")
    A.add_workers(p, default=None)
    A.add_device(p, default=None)
    p.add_argument("--seed", type=A.nonneg_int, default=None)
    p.add_argument("--data-root", default=None, help="cache folder of cifar10 / fashion-mnist")
    p.add_argument("--exist-ok", action="store_true", help="replace a run already in --output")
    A.add_threads(p)
    A.add_loggers(p)
    A.add_progress(p)
    p.set_defaults(func=_cmd_finetune)


def _add_engine(p, what: str) -> None:
    p.add_argument(
        "--engine",
        default="auto",
        choices=("auto", "eager", "onnxruntime", "openvino"),  # mnv4.distill.engines.ENGINES, not imported here
        help=f"{what}: auto takes the first installed runtime (OpenVINO, ONNX Runtime) whose outputs match eager "
        "PyTorch's on a few images, else eager",
    )


def _add_frozen_options(p) -> None:
    """``--mode frozen``: a head fitted on the frozen teacher's cached pooled features."""
    p.add_argument(
        "--mode",
        choices=("full", "frozen"),
        default="full",
        help="full: train the whole network; frozen: fit a linear head on cached pooled features (minutes)",
    )
    p.add_argument(
        "--views",
        type=A.nonneg_int,
        default=0,
        metavar="K",
        help="frozen: augmented views per training image besides the un-augmented one",
    )
    p.add_argument(
        "--aug",
        default="inception-randaug-l2m5",
        choices=("inception-randaug-l2m9", "inception-randaug-l2m5", "none"),
        help="frozen: augmentation of the extra views",
    )
    p.add_argument("--crop-min", type=A.positive_float, default=None, metavar="F", help="frozen: smallest crop area")
    p.add_argument("--head-wd", type=float, default=0.3, metavar="L", help="frozen: L2 penalty of the head")
    _add_engine(p, "frozen: where the teacher computes its features")
    p.add_argument(
        "--feature-cache",
        default=None,
        metavar="DIR",
        help="frozen: folder of cached teacher features (default OUTPUT/features; reruns reuse them)",
    )
