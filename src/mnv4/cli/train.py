"""``mnv4 train | eval | recipes | plot``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import MNv4Error
from . import args as A

__all__ = ["register"]

OWN_IMAGES_HINT = (
    "next: train on your own images with `mnv4 train --data PATH` "
    "(PATH/<class>/*.jpg, or PATH/train/<class>/ and PATH/val/<class>/); "
    "to fine-tune pretrained weights add `--recipe finetune --pretrained` or `--checkpoint WEIGHTS`"
)

# Flags that map straight onto TrainConfig fields: (flags, field, type, help). Range checks live in
# one place, mnv4.train.config.validate, so these only parse. The shared rows mean the same in every
# training command (mnv4 detect train takes them too).
FieldFlags = tuple[tuple[tuple[str, ...], str, Any, str], ...]
SHARED_FIELD_FLAGS: FieldFlags = (
    (("--micro-batch",), "micro_batch", int, "per-process batch that fits in memory; the rest is accumulated"),
    (("--precision",), "precision", str, "fp32 | bf16 (CPU and CUDA) | fp16 (CUDA)"),
    (("--seed",), "seed", int, "seed for weights, data order and augmentation"),
    (("--save-every-steps",), "save_every_steps", int, "also checkpoint every N optimizer steps"),
)
_FIELD_FLAGS: FieldFlags = (
    (("--data",), "data", str, "PATH to an image folder, or cifar10 | fashion-mnist | digits (default: the recipe's)"),
    (("--epochs",), "epochs", float, "training epochs (fractions allowed; with --resume: extend a run to this)"),
    (("--lr",), "lr", float, "peak LR at lr_ref_batch (the recipe's batch), scaled to --batch-size by lr_scaling"),
    (("--data-root",), "data_root", str, "cache folder for cifar10 / fashion-mnist (default: ~/.cache/mnv4/data)"),
    (("--val-split",), "val_split", float, "validation fraction for folders without val/ (and digits)"),
    (("--grad-clip",), "grad_clip", float, "max gradient norm (0: off)"),
    *SHARED_FIELD_FLAGS,
)


def _parse_set(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise MNv4Error(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise MNv4Error(f"--set {item}: the value is not valid YAML") from None
    return out


def add_config_flags(
    p: argparse.ArgumentParser,
    field_flags: tuple,
    *,
    recipe: str,
    model: str,
    weights: str,
    input_size: str,
    batch: str,
    output: str,
) -> None:
    """The flags every training command builds its config from: recipe <- --config file <- flags
    (``field_flags``: (flags, config field, type, help) rows) <- --set; the helps say each command's defaults."""
    p.add_argument("--recipe", default=None, help=recipe)
    p.add_argument("--config", default=None, help="YAML/JSON file of config fields (applied after the recipe)")
    A.add_model(p, help=model, positional=False)
    A.add_spec(p)
    A.add_weights(p, checkpoint_help=weights)
    A.add_input_size(p, help=input_size)
    A.add_batch_size(p, None, help=batch)
    A.add_output(p, help=output, kind="folder")
    A.add_device(p, default=None)
    A.add_workers(p, default=None)
    for flags, field, typ, text in field_flags:
        p.add_argument(*flags, dest=field, type=typ, default=None, help=text)
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override any config field (repeatable)")


def add_run_control(p: argparse.ArgumentParser, resume_help: str) -> None:
    """``--resume``, ``--exist-ok`` and ``--max-steps``: what every training command takes about its run folder."""
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="RUN_DIR|last.pt", help=resume_help)
    p.add_argument("--exist-ok", action="store_true", help="start a new run in --output even if it holds one")
    p.add_argument(
        "--max-steps", type=A.positive_int, default=None, help="stop after N optimizer steps, resumable from there"
    )


def config_overrides(args: argparse.Namespace, field_flags: tuple, **extra: Any) -> dict[str, Any]:
    """The config fields a training command was given (None: not given): those of :func:`add_config_flags`
    (``field_flags`` rows included), the command's ``extra`` fields, then ``--set``."""
    overrides: dict[str, Any] = {field: getattr(args, field) for _, field, _, _ in field_flags}
    shared = ("batch_size", "input_size", "output", "checkpoint", "workers", "device")  # the shared flags' fields
    overrides.update({name: getattr(args, name) for name in shared})
    overrides.update(
        model=A.resolve_model(args), pretrained=("default" if args.pretrained is True else args.pretrained), **extra
    )
    if args.spec:
        if overrides["model"]:
            raise MNv4Error("pass either `model` or `spec`, not both")
        overrides["model"] = A.read_spec(args.spec)
    overrides.update(_parse_set(args.set or []))
    return overrides


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``mnv4 train``'s config fields given on the command line (None: not given)."""
    extra: dict[str, Any] = dict(
        loggers=args.logger, distill=tuple(args.distill) if args.distill else None, mix=args.mix, teacher=args.teacher
    )
    extra.update({flag: True for flag in ("compile", "sync_bn") if getattr(args, flag)})
    extra["channels_last"] = args.channels_last  # None: the config's (auto: channels_last batches on CPU)
    return config_overrides(args, _FIELD_FLAGS, **extra)


def _config(args: argparse.Namespace, resume: Path | None):
    """The run's config: a new one (recipe <- --config file <- flags), or the resumed run's with the changes a
    resume may make (the library's rule, mnv4.train.runs)."""
    from ..train.config import load_config_file, resolve_config
    from ..train.runs import resumed_train_config

    overrides = _overrides(args)
    from_file = load_config_file(args.config) if args.config else {}
    if resume is not None:
        return resumed_train_config(resume, {**from_file, **overrides, "recipe": args.recipe})
    recipe = args.recipe
    if recipe is None and (args.distill or args.teacher):  # distilling implies its recipe, unless a file names one
        recipe = from_file.get("recipe") or "distill"
    return resolve_config(recipe, args.config, **overrides)


def run_training(train_fn, cfg, resume, args: argparse.Namespace):
    """``train_fn(cfg, ...)`` with the command's run flags, the process group torn down after it; returns
    (exit code, result), the code None when this process should report the finished run (rank 0)."""
    from ..train.distributed import teardown
    from ..train.runs import exit_code

    try:
        result = train_fn(
            cfg,
            resume=resume,
            max_steps=args.max_steps,
            progress=False if args.no_progress else None,
            exist_ok=args.exist_ok,
        )
    finally:
        teardown()
    if result.stopped_early:  # the trainer said where and why, and how to continue
        return exit_code(result.stop_reason), result
    return (None if result.summary else 0), result  # no summary: a non-zero rank under torchrun


def _cmd_train(args: argparse.Namespace) -> int:
    from ..train.runs import find_resume
    from ..train.trainer import train

    resume = find_resume(args.resume, args.output) if args.resume else None
    cfg = _config(args, resume)
    if cfg.distill or cfg.teacher:  # a distillation config, given now or saved with the run being resumed
        from ..distill.student import train_student as train
    code, result = run_training(train, cfg, resume, args)
    if code is not None:
        return code
    s = result.summary
    print(
        f"{s['model']} on {s['dataset']}: best val top-1 {s['val_top1']:.2f}% (epoch {s['best_epoch']}, "
        f"{s['best_weights']} weights), final {s['val_top1_final']:.2f}%, {s['wall_seconds']:.0f} s"
    )
    print(f"best weights: {s['best_checkpoint']}  (summary: {result.run_dir / 'summary.json'})")
    if s["skipped_images"]:
        print(f"skipped {s['skipped_images']} unreadable image(s) (listed above)")
    if cfg.data == "digits":
        print(OWN_IMAGES_HINT)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..data.datasets import load_data
    from ..errors import check_float
    from ..train.distributed import pick_device
    from ..train.evaluate import evaluate_on, plot_confusion
    from .models import announce_weights, load_model, model_name

    if args.val_split is not None:  # before loading the model and scanning the data
        check_float("val_split", args.val_split, 0.0, 1.0, lo_open=True, hi_open=True)
    device = pick_device(args.device)
    model = load_model(args, teachers=True).eval()
    announce_weights(model, "its accuracy will be chance")
    data = load_data(_eval_data(args, model), args.data_root, args.val_split, args.seed)
    res, bad = evaluate_on(
        model,
        data,
        input_size=args.input_size,
        batch_size=args.batch_size,
        workers=args.workers,
        device=device,
        progress=False if args.no_progress else None,
    )
    skipped = f", {len(bad)} unreadable skipped" if bad else ""
    print(
        f"{model_name(model)} on {data.name} ({res.count} images{skipped}): "
        f"top-1 {res.top1:.2f}%  top-5 {res.top5:.2f}%  loss {res.loss:.4f}"
    )
    if args.output:
        out = Path(args.output)
    elif args.checkpoint:
        out = Path(Path(args.checkpoint).with_suffix("").as_posix() + "-confusion.png")
    else:
        out = Path(f"{model_name(model).replace(':', '-')}-{data.name}-confusion.png")
    from ..models.meta import weights_meta

    names = list(weights_meta(model).class_names or data.class_names)
    plot_confusion(res, names, out)
    print(f"confusion matrix: {out}")
    if args.json:
        print(
            json.dumps({"top1": res.top1, "top5": res.top5, "loss": res.loss, "count": res.count, "skipped": len(bad)})
        )
    return 0


def _eval_data(args: argparse.Namespace, model) -> str:
    """``--data``; without it, the built-in digits only for a model of the digits' classes (else one error)."""
    if args.data is not None:
        return args.data
    from ..data.digits import DigitsDataset
    from ..models.meta import weights_meta

    if list(weights_meta(model).class_names or []) == DigitsDataset.classes:
        print("mnv4: note: no --data: evaluating on the built-in digits (this model's classes)", file=sys.stderr)
        return "digits"
    raise MNv4Error(
        "`data` is required: the labelled images to evaluate on (a folder with one sub-folder per class, or "
        "val/ inside it; cifar10, fashion-mnist or digits)"
    )


def _cmd_recipes(args: argparse.Namespace) -> int:
    import yaml

    from ..train.recipes import RECIPES, get_recipe

    if args.show:
        import dataclasses

        from ..train.config import TrainConfig

        def plain(v):
            return list(v) if isinstance(v, tuple) else v

        d = {k: plain(v) for k, v in get_recipe(args.show).to_dict().items()}
        print(yaml.safe_dump(d, sort_keys=False, width=100), end="")
        # the fields a recipe does not set (where the run reads and writes, teachers, trackers): every
        # recipe starts from these defaults, and --set / --config take them as they take the rest
        run = {
            f.name: plain(f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(TrainConfig)
            if f.name not in d and f.name != "recipe"
        }
        print("# run fields, the same defaults for every recipe (set them with their flags, --set or --config):")
        print(yaml.safe_dump(run, sort_keys=False, width=100), end="")
        return 0
    rows = [
        (r.name, str(r.model or "(checkpoint)"), str(r.data or "-"), f"{r.epochs:g}", str(r.batch_size), f"{r.lr:g}")
        for r in RECIPES.values()
    ]
    A.print_table(("recipe", "model", "data", "epochs", "batch", "lr"), rows)
    print()
    for r in RECIPES.values():
        print(f"{r.name}: {r.note}")
    print(
        "\nLR is the peak at the recipe's batch size; other --batch-size values scale it linearly "
        "(lr_scaling). `mnv4 recipes --show NAME` prints every field; override any with --set FIELD=VALUE "
        "or --config FILE.yaml."
    )
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from ..train.metrics import plot_run

    print(f"wrote {plot_run(args.run_dir, args.output)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune (also under torchrun); default: digits in about a minute",
        epilog="Config fields without a flag of their own: --set FIELD=VALUE (`mnv4 recipes --show NAME` lists them).",
    )
    add_config_flags(
        p,
        _FIELD_FLAGS,
        recipe="named recipe (see `mnv4 recipes`); default: quick",
        model="architecture (see `mnv4 models`); default: the recipe's",
        weights="weights to start from (fine-tuning; the architecture comes from them)",
        input_size="training/eval resolution (default: the dataset's or model's)",
        batch="global effective batch; the LR scales with it (default: the recipe's)",
        output="run folder (default: runs/MODEL-DATA, suffixed -2, -3... when taken)",
    )
    A.add_soft_labels(p, "the student (implies --recipe distill)")
    p.add_argument("--teacher", default=None, help="online distillation from this live teacher (as distill label)")
    A.add_loggers(p)
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last model and batches; --no-channels-last: neither (default: channels_last batches on CPU)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA only)")
    add_run_control(
        p, "continue a run (no value: --output's, else the newest under runs/); with a larger --epochs: extend it"
    )
    A.add_threads(p)
    A.add_progress(p)
    p.set_defaults(func=_cmd_train, _field_fallback="--set {}")

    p = sub.add_parser("eval", help="top-1/top-5/loss and a confusion-matrix PNG for weights on labelled images")
    A.add_model(p, help="architecture (default: from the checkpoint)", positional=False)
    A.add_weights(p, checkpoint_help="weights (e.g. a run's best.safetensors)")
    p.add_argument(
        "--data",
        default=None,
        help="PATH (uses val/ when present) | cifar10 | fashion-mnist | digits (required unless the model's classes "
        "are the digits')",
    )
    p.add_argument("--data-root", default=None, help="cache folder of cifar10 / fashion-mnist")
    p.add_argument("--val-split", type=float, default=0.2, help="as used in training, for folders without val/")
    p.add_argument("--seed", type=A.nonneg_int, default=0, help="split seed, as used in training")
    A.add_input_size(p)
    A.add_batch_size(p, 128)
    A.add_workers(p)
    A.add_device(p)
    A.add_threads(p)
    A.add_output(p, help="confusion-matrix PNG (default: next to the checkpoint)", kind="file")
    p.add_argument("--json", action="store_true", help="also print the metrics as one JSON line")
    A.add_progress(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("recipes", help="list the training recipes (paper per-model, finetune, quick)")
    p.add_argument("--show", metavar="NAME", default=None, help="print every field of one recipe as YAML")
    p.set_defaults(func=_cmd_recipes)

    p = sub.add_parser("plot", help="PNG of a run's training curves (from its metrics.csv)")
    p.add_argument("run_dir", help="a training run folder")
    A.add_output(p, help="output PNG (default: RUN_DIR/curves.png)", kind="file")
    A.add_threads(p)
    p.set_defaults(func=_cmd_plot)
