"""``mnv4 detect train | eval | predict``: object detection (docs/detection.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import MNv4Error, check_float
from . import args as A
from .train import SHARED_FIELD_FLAGS, FieldFlags

__all__ = ["register"]

# Flags that map straight onto DetectConfig fields (range checks live in the config's validation).
_FIELD_FLAGS: FieldFlags = (
    (("--epochs",), "epochs", float, "training epochs (with --resume: extend a run to this)"),
    (("--lr",), "lr", float, "peak LR at the recipe's batch size"),
    (("--val-split",), "val_split", float, "validation fraction for datasets without a val split"),
    (("--head",), "head", str, "retinanet (the paper's) | ssdlite"),
    (("--backbone-checkpoint",), "backbone_checkpoint", str, "classification weights for the backbone"),
    *SHARED_FIELD_FLAGS,
)
_RESUME_MAY_CHANGE = ("output", "workers", "device", "save_every_steps", "data_root", "epochs", "loggers")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from .train import config_overrides

    return config_overrides(args, _FIELD_FLAGS, data=args.data)


def _cmd_train(args: argparse.Namespace) -> int:
    from ..detect.recipes import DetectConfig, resolve_detect_config
    from ..detect.train import train_detector
    from ..train.config import load_config_file
    from ..train.runs import find_resume, resumed_train_config
    from .train import run_training

    overrides = _overrides(args)
    resume = find_resume(args.resume, args.output) if args.resume else None
    if resume is not None:
        from_file = load_config_file(args.config) if args.config else {}
        requested = {**from_file, **overrides, "recipe": args.recipe}
        cfg = resumed_train_config(resume, requested, _RESUME_MAY_CHANGE, DetectConfig)
    else:
        cfg = resolve_detect_config(args.recipe, args.config, **overrides)
    code, result = run_training(train_detector, cfg, resume, args)
    if code is not None:
        return code
    s = result.summary
    print(
        f"{s['head']} {s['model']} on {s['dataset']}: best val AP {s['val_AP']:.3f} AP50 {s['val_AP50']:.3f} "
        f"(epoch {s['best_epoch']}, {s['best_weights']} weights), {s['wall_seconds']:.0f} s"
    )
    print(f"run folder: {result.run_dir}  (best detector: {s['best_checkpoint']})")
    if s["skipped_images"]:
        print(f"skipped {s['skipped_images']} unreadable image(s) (listed above)")
    if cfg.data in (None, "digits"):
        print("next: train on your own boxes with `mnv4 detect train --data PATH` (a COCO, VOC or YOLO folder)")
    return 0


def _load(args: argparse.Namespace):
    from ..detect.factory import load_detector
    from ..train.distributed import pick_device

    device = pick_device(args.device)
    if not Path(args.checkpoint).is_file():
        raise MNv4Error(f"`checkpoint` {args.checkpoint}: no such file; pass a detector .safetensors")
    return load_detector(args.checkpoint).to(device).eval(), device


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..data.images import BadImageLog
    from ..detect.data import load_detection_data
    from ..detect.evaluate import evaluate_detector
    from ..detect.metrics import plot_pr_curve

    check_float("val_split", args.val_split, 0.0, 1.0, lo_open=True, hi_open=True)  # used or not, as training checks it
    det, device = _load(args)
    data = load_detection_data(args.data, classes=det.classes, val_fraction=args.val_split, seed=args.seed)
    records = data.split(args.split)
    bad = BadImageLog()
    metrics, _ = evaluate_detector(
        det,
        records,
        det.classes,
        det.image_size,
        device=device,
        batch_size=args.batch_size,
        workers=args.workers,
        bad=bad,
    )
    out = Path(args.output) if args.output else Path(Path(args.checkpoint).with_suffix("").as_posix() + "-pr.png")
    plot_pr_curve(metrics, det.classes, out, title=f"{data.name} {args.split}: AP {metrics.AP:.3f}")
    human = sys.stderr if args.json else sys.stdout
    print(
        f"{data.name} {args.split} ({metrics.num_images} images, {metrics.num_boxes} boxes): AP {metrics.AP:.3f}  "
        f"AP50 {metrics.AP50:.3f}  AP75 {metrics.AP75:.3f}  AP small {metrics.AP_small:.3f}; PR curve: {out}",
        file=human,
    )
    if bad:
        print(f"mnv4: {bad.summary()}", file=sys.stderr)
    if args.json:
        print(json.dumps({**metrics.as_dict(), "split": args.split, "dataset": data.name, "pr_curve": str(out)}))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from ..data.images import BadImageLog, find_images
    from ..detect.evaluate import image_records, predict_records
    from ..detect.predict import check_drawn_paths, draw_predictions, prediction_rows, write_rows

    if not 0.0 <= args.score_threshold <= 1.0:
        raise MNv4Error(f"`score_threshold` {args.score_threshold} is invalid: must be within 0 and 1")
    paths = find_images(args.images)
    if not paths:
        raise MNv4Error("no image files found in the given folders")
    if args.output and Path(args.output).resolve() in {Path(p).resolve() for p in paths}:
        raise MNv4Error(f"`output` {args.output} is one of the input images; choose another file")
    if args.save_images:  # before predicting: the drawn images must not replace the ones read
        check_drawn_paths(paths, args.save_images)
    det, device = _load(args)
    records = image_records(paths)
    bad = BadImageLog()
    preds = predict_records(
        det, records, det.image_size, device=device, batch_size=args.batch_size, workers=args.workers, bad=bad
    )
    if bad:
        print(f"mnv4: {bad.summary()}", file=sys.stderr)
    if all(p is None for p in preds):  # before any output is written: an existing --output file stays as it was
        raise MNv4Error("no image could be read, nothing was predicted")
    rows = prediction_rows(records, preds, det.classes, args.score_threshold)
    write_rows(rows, args.format, args.output)
    if args.save_images:
        saved = draw_predictions(records, preds, det.classes, args.score_threshold, args.save_images)
        print(f"drew boxes on {saved} image(s) in {args.save_images}", file=sys.stderr)
    return 0


def _data_flags(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--data", default=default, help="a COCO / VOC / YOLO dataset folder, or digits (the built-in set)")


def register(sub) -> None:
    from .train import add_config_flags, add_run_control

    group = sub.add_group("detect", help="object detection: train, evaluate and run detectors (docs/detection.md)")

    p = group.add_parser(
        "train",
        help="train a detector; default: the built-in digits set in a few minutes",
        epilog="Config fields without a flag of their own: --set FIELD=VALUE (e.g. --set head_options='{width: 128}').",
    )
    _data_flags(p, None)
    add_config_flags(
        p,
        _FIELD_FLAGS,
        recipe="detect-digits (default without --data) | detect-small (default with --data) | detect-paper",
        model="backbone (see `mnv4 models`) or detector name; default: mnv4_conv_small",
        weights="a saved detector to continue training from (fine-tuning)",
        input_size="square input side the images are letterboxed to (default: the recipe's)",
        batch="global effective batch (default: the recipe's)",
        output="run folder (default: runs/detect-HEAD-MODEL-DATA, suffixed when taken)",
    )
    add_run_control(p, "continue a run (no value: --output's, else the newest under runs/)")
    A.add_threads(p)
    A.add_progress(p)
    p.set_defaults(func=_cmd_train, _field_fallback="--set {}")

    p = group.add_parser("eval", help="COCO AP, AP50, AP75, AP small/medium/large and a PR-curve PNG")
    p.add_argument("--checkpoint", required=True, help="a detector .safetensors (a run's best.safetensors)")
    _data_flags(p, "digits")
    p.add_argument("--split", default="val", choices=("train", "val", "test"), help="which split to evaluate")
    p.add_argument("--val-split", type=float, default=0.2, help="as in training, for datasets without a val split")
    p.add_argument("--seed", type=A.nonneg_int, default=0, help="split seed, as in training")
    A.add_batch_size(p, 16)
    A.add_workers(p)
    A.add_device(p)
    A.add_threads(p)
    A.add_output(p, help="PR-curve PNG (default: next to the checkpoint)", kind="file")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object (other lines: stderr)")
    p.set_defaults(func=_cmd_eval)

    p = group.add_parser("predict", help="boxes for image files or folders, in original-image pixels")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--checkpoint", required=True, help="a detector .safetensors")
    p.add_argument("--score-threshold", type=float, default=0.3, help="keep boxes scoring at least this")
    p.add_argument("--format", default="jsonl", choices=("jsonl", "csv"), help="one JSON object per image, or CSV")
    A.add_output(p, help="write the boxes to this file (default: stdout)", kind="file")
    p.add_argument("--save-images", default=None, metavar="DIR", help="also write each image with its boxes drawn")
    A.declare_outputs(p, save_images="folder")
    A.add_batch_size(p, 8)
    A.add_workers(p)
    A.add_device(p)
    A.add_threads(p)
    p.set_defaults(func=_cmd_predict)
