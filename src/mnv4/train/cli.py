"""``mnv4 train | eval | recipes | plot``: registered into the main ``mnv4`` command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import MNv4Error

__all__ = ["register"]

OWN_IMAGES_HINT = (
    "next: train on your own images with `mnv4 train --data PATH` "
    "(PATH/<class>/*.jpg, or PATH/train/<class>/ and PATH/val/<class>/); "
    "to fine-tune pretrained weights add `--recipe finetune --checkpoint WEIGHTS`"
)

# Flags that map straight onto TrainConfig fields (flag name -> field, type, help).
_FIELD_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--model", "model", str, "architecture (see `mnv4 models`); default: the recipe's"),
    ("--data", "data", str, "PATH to an image folder, or cifar10 | fashion-mnist | digits (default: the recipe's)"),
    ("--epochs", "epochs", float, "training epochs (fractions allowed)"),
    ("--batch-size", "batch_size", int, "global effective batch; the LR scales with it (see `mnv4 recipes`)"),
    ("--micro-batch", "micro_batch", int, "per-process batch that fits in memory; the rest is accumulated"),
    ("--lr", "lr", float, "peak LR at lr_ref_batch (the recipe's batch), scaled to --batch-size by lr_scaling"),
    ("--input-size", "input_size", int, "training/eval resolution (default: dataset's or model's)"),
    ("--output", "output", str, "run directory (default: runs/MODEL-DATA-TIMESTAMP)"),
    ("--checkpoint", "checkpoint", str, "pretrained weights to start from (fine-tuning)"),
    ("--data-root", "data_root", str, "cache folder for cifar10 / fashion-mnist (default: ~/.cache/mnv4/data)"),
    ("--val-split", "val_split", float, "validation fraction for folders without val/ (and digits)"),
    ("--workers", "workers", int, "data-loading worker processes"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--precision", "precision", str, "fp32 | bf16 (CPU and CUDA) | fp16 (CUDA)"),
    ("--seed", "seed", int, "seed for weights, data order and augmentation"),
    ("--save-every-steps", "save_every_steps", int, "also checkpoint every N optimizer steps"),
    ("--grad-clip", "grad_clip", float, "max gradient norm (0: off)"),
)


def _parse_set(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise MNv4Error(f"--set expects FIELD=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def _cmd_train(args: argparse.Namespace) -> None:
    from .checkpoint import find_resume, load_training_state
    from .config import TrainConfig, resolve_config
    from .distributed import teardown
    from .trainer import train

    overrides = {field: getattr(args, field) for _, field, _, _ in _FIELD_FLAGS}
    for flag in ("channels_last", "compile", "sync_bn"):
        if getattr(args, flag):
            overrides[flag] = True
    overrides.update(_parse_set(args.set or []))
    resume = None
    if args.resume:
        resume = find_resume(args.resume, args.output)
        saved = load_training_state(resume)["config"]
        # A resumed run keeps its recipe and hyper-parameters; only where/how it runs may change.
        for key in ("workers", "device", "save_every_steps", "data_root"):
            if overrides.get(key) is not None:
                saved[key] = overrides[key]
        cfg = TrainConfig.from_dict(saved)
    else:
        cfg = resolve_config(args.recipe, args.config, **overrides)
    try:
        result = train(cfg, resume=resume, max_steps=args.max_steps, progress=False if args.no_progress else None)
    finally:
        teardown()
    s = result.summary
    if not s:
        if result.stopped_early:
            print(f"stopped after --max-steps; continue with: mnv4 train --resume {result.run_dir}")
        return
    print(
        f"{s['model']} on {s['dataset']}: best val top-1 {s['val_top1']:.2f}% (epoch {s['best_epoch']}, "
        f"{s['best_weights']} weights), final {s['val_top1_final']:.2f}%, {s['wall_seconds']:.0f} s"
    )
    print(f"best weights: {s['best_checkpoint']}  (summary: {result.run_dir / 'summary.json'})")
    if s["skipped_images"]:
        print(f"skipped {s['skipped_images']} unreadable image(s) (listed above)")
    if cfg.data == "digits":
        print(OWN_IMAGES_HINT)


def _cmd_eval(args: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import DataLoader

    from ..data.datasets import collate_images, load_data
    from ..data.sampling import SeededDataset
    from ..data.transforms import eval_transform
    from ..factory import create_model
    from .evaluate import evaluate, plot_confusion

    model = create_model(args.model, checkpoint=args.checkpoint).eval()
    data = load_data(args.data, args.data_root, args.val_split, args.seed)
    val = data.val
    names = list(model.class_names or data.class_names)
    if model.class_names and list(model.class_names) != list(data.class_names):
        unknown = [c for c in data.class_names if c not in model.class_names]
        if unknown:
            raise MNv4Error(f"{args.data} has classes the checkpoint was not trained on: {', '.join(unknown[:5])}")
        remap = [model.class_names.index(c) for c in data.class_names]
        val = _Relabel(val, remap)
    elif len(data.class_names) != model.num_classes:
        raise MNv4Error(
            f"the checkpoint has {model.num_classes} classes but {args.data} has {len(data.class_names)}; "
            "evaluate on the dataset it was trained on"
        )
    tf = eval_transform(model.preprocess, input_size=args.res)
    loader = DataLoader(
        SeededDataset(val, tf), batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_images
    )
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    res = evaluate(model.to(device), loader, device, keep_predictions=True)
    print(
        f"{model.spec.name} on {data.name} ({res.count} images): "
        f"top-1 {res.top1:.2f}%  top-5 {res.top5:.2f}%  loss {res.loss:.4f}"
    )
    out = Path(args.output or Path(args.checkpoint).with_suffix("").as_posix() + "-confusion.png")
    plot_confusion(res, names, out)
    print(f"confusion matrix: {out}")
    if args.json:
        print(json.dumps({"top1": res.top1, "top5": res.top5, "loss": res.loss, "count": res.count}))


class _Relabel:
    """Dataset view whose labels follow the checkpoint's class order instead of the folder's."""

    def __init__(self, ds: Any, remap: list[int]) -> None:
        self.ds, self.remap = ds, remap

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        x, y = self.ds[i]
        return x, self.remap[y]


def _cmd_recipes(args: argparse.Namespace) -> None:
    import yaml

    from .recipes import RECIPES, get_recipe

    if args.show:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in get_recipe(args.show).to_dict().items()}
        print(yaml.safe_dump(d, sort_keys=False, width=100), end="")
        return
    rows = [
        (
            r.name,
            str(r.model or "(checkpoint)"),
            str(r.data or "-"),
            f"{r.epochs:g}",
            str(r.batch_size),
            f"{r.lr:g}",
            r.note,
        )
        for r in RECIPES.values()
    ]
    header = ("recipe", "model", "data", "epochs", "batch", "lr", "note")
    widths = [max(len(c) for c in col) for col in zip(header, *[row[:-1] for row in rows], strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    print(fmt.format(*header))
    for row in rows:
        print(fmt.format(*row))
    print(
        "\nLR is the peak at the recipe's batch size; other --batch-size values scale it linearly "
        "(lr_scaling). `mnv4 recipes --show NAME` prints every field; override any with --set FIELD=VALUE "
        "or --config FILE.yaml."
    )


def _cmd_plot(args: argparse.Namespace) -> None:
    from .metrics import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add train / eval / recipes / plot to the ``mnv4`` command."""
    p = subparsers.add_parser("train", help="train or fine-tune (also under torchrun); default: digits in minutes")
    p.add_argument("--recipe", default=None, help="named recipe (see `mnv4 recipes`); default: quick")
    p.add_argument("--config", default=None, help="YAML/JSON file of config fields (applied after the recipe)")
    for flag, field, typ, text in _FIELD_FLAGS:
        p.add_argument(flag, dest=field, type=typ, default=None, help=text)
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override any config field (repeatable)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA only)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="RUN_DIR|last.pt",
        help="continue a run (no value: --output's, else the newest under runs/)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="stop this invocation after N optimizer steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (per-epoch lines still print)")
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser("eval", help="top-1/top-5/loss and a confusion-matrix PNG for a checkpoint")
    p.add_argument("--model", default=None, help="architecture (default: from the checkpoint)")
    p.add_argument("--checkpoint", required=True, help="weights (e.g. a run's best.safetensors)")
    p.add_argument("--data", default="digits", help="PATH (uses val/ when present) | cifar10 | fashion-mnist | digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--val-split", type=float, default=0.2, help="as used in training, for folders without val/")
    p.add_argument("--seed", type=int, default=0, help="split seed, as used in training")
    p.add_argument("--res", type=int, default=None, help="input resolution (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--output", default=None, help="confusion-matrix PNG (default: next to the checkpoint)")
    p.add_argument("--json", action="store_true", help="also print the metrics as one JSON line")
    p.set_defaults(func=_cmd_eval)

    p = subparsers.add_parser("recipes", help="list the training recipes (paper per-model, finetune, quick)")
    p.add_argument("--show", metavar="NAME", default=None, help="print every field of one recipe as YAML")
    p.set_defaults(func=_cmd_recipes)

    p = subparsers.add_parser("plot", help="PNG of a run's training curves (from its metrics.csv)")
    p.add_argument("run_dir", help="a `mnv4 train` run directory")
    p.add_argument("--out", default=None, help="output PNG (default: RUN_DIR/curves.png)")
    p.set_defaults(func=_cmd_plot)
