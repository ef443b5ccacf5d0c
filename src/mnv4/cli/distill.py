"""``mnv4 distill label | finetune``: teacher soft-label datasets, and fine-tuning a non-MobileNetV4 teacher.

The student is trained by ``mnv4 train --distill DIR [--distill DIR2 ...] --mix 1:1:2`` (or online with
``--teacher T``); see docs/distillation.md.
"""

from __future__ import annotations

import argparse

from ..distill.requests import FROZEN_COMMAND, LABEL_COMMAND, FrozenConfig, LabelConfig
from . import args as A

TEACHER_RUN = "runs/teacher"  # distill finetune's run folder when -o is not given (not on a resume: it stays put)

__all__ = ["register"]


def _cmd_label(args: argparse.Namespace) -> int:
    from ..distill.labelling import label
    from ..train.distributed import teardown

    if not args.output:
        from ..errors import MNv4Error

        raise MNv4Error("`output` is required: the folder the shards and manifest go to")
    cfg = A.request_from_args(LabelConfig, args, out=args.output)
    try:
        res = label(cfg, progress=False if args.no_progress else None, max_shards=args.max_shards)
    finally:
        teardown()
    if res.stopped_early:
        from ..distill.labelling import resume_command

        print(f"stopped after --max-shards; continue with: {resume_command(cfg)}")
    elif res.manifest:
        print(
            f"soft-label dataset: {res.out} ({res.manifest['records']} records); train a student with: "
            f"mnv4 train --distill {res.out} --data LABELLED_VAL_DATA"
        )
    return 0


def _cmd_frozen(args: argparse.Namespace) -> int:
    from ..distill.frozen import frozen_teacher

    # flags shared with the full mode default to None there (the finetune recipe's); frozen takes its config's
    unset = {k: getattr(FrozenConfig, k) for k in ("batch_size", "workers", "seed") if getattr(args, k) is None}
    cfg = A.request_from_args(FrozenConfig, args, out=args.output or TEACHER_RUN, **unset)
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
    if args.data:  # score the ensemble as `--mode frozen` scores its teacher
        from ..distill.quality import teacher_quality

        q = teacher_quality(path, args.data)
        print(f"ensemble val top-1 {q.top1:.2f}% (mean top probability {q.mean_max_prob:.3f}) on {q.images} images")
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
        if args.resume or args.max_steps:
            from ..errors import MNv4Error

            raise MNv4Error("`resume` / `max_steps` are for --mode full; a frozen fit is one short pass, rerun it")
        return _cmd_frozen(args)
    from ..train.distributed import teardown

    fields = ("epochs", "lr", "batch_size", "workers", "device", "seed", "data_root")
    given = {**{k: getattr(args, k) for k in fields}, "loggers": args.logger}
    overrides = {k: v for k, v in given.items() if v is not None}  # the rest: the finetune recipe's
    try:
        res = finetune_teacher(
            args.teacher,
            args.data,
            args.output if args.resume else args.output or TEACHER_RUN,  # a resume stays in its folder
            input_size=args.input_size,
            teacher_checkpoint=args.teacher_checkpoint,
            progress=False if args.no_progress else None,
            exist_ok=args.exist_ok,
            resume=args.resume,
            max_steps=args.max_steps,
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
    A.add_request_flags(p, LabelConfig, defaults=LABEL_COMMAND)
    A.add_output(p, help="folder for the shards and manifest.json (a killed run continues there)", kind="folder")
    A.add_batch_size(p, LABEL_COMMAND.batch_size, help="images per teacher batch")
    A.add_workers(p, LABEL_COMMAND.workers)
    A.add_device(p, LABEL_COMMAND.device)
    A.add_threads(p)
    p.add_argument(
        "--max-shards",
        type=A.positive_int,
        default=None,
        metavar="N",
        help="stop after N shards (continue later with the same command)",
    )
    A.add_progress(p)
    p.set_defaults(func=_cmd_label)


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
        help="instead of training: join these teacher files into one teacher (probabilities averaged) in OUTPUT; "
        "with --data, print its val top-1",
    )
    A.add_output(p, help=f"run folder; its best.safetensors is the teacher (default: {TEACHER_RUN})", kind="folder")
    A.add_input_size(p, help="resolution to fine-tune and label at (default: the teacher's own)")
    _add_frozen_options(p)
    p.add_argument("--epochs", type=float, default=None, help="default: the finetune recipe's")
    p.add_argument("--lr", type=float, default=None, help="peak LR (default: the finetune recipe's)")
    A.add_batch_size(
        p, None, help=f"batch size (default: the finetune recipe's; --mode frozen: {FROZEN_COMMAND.batch_size})"
    )
    A.add_workers(p, default=None)
    A.add_device(p, default=None)
    p.add_argument("--seed", type=A.nonneg_int, default=None)
    p.add_argument("--data-root", default=None, help="cache folder of cifar10 / fashion-mnist")
    p.add_argument("--exist-ok", action="store_true", help="replace a run already in --output")
    A.add_threads(p)
    A.add_loggers(p)
    A.add_progress(p)
    p.add_argument(
        "--resume", default=None, metavar="DIR", help="continue the stopped fine-tuning in DIR (same --teacher, --data)"
    )
    p.add_argument("--max-steps", type=A.positive_int, default=None, help="stop after N steps, resumable from there")
    p.set_defaults(func=_cmd_finetune)


def _add_frozen_options(p) -> None:
    """``--mode`` and the flags of ``--mode frozen`` (a head fitted on the frozen teacher's cached pooled
    features), generated from :class:`mnv4.distill.requests.FrozenConfig`."""
    p.add_argument(
        "--mode",
        choices=("full", "frozen"),
        default="full",
        help="full: train the whole network; frozen: fit a linear head on cached pooled features (minutes)",
    )
    A.add_request_flags(p.add_argument_group("--mode frozen"), FrozenConfig, defaults=FROZEN_COMMAND)
