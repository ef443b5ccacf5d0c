"""``mnv4 models | profile | convert | predict``."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import MNv4Error
from . import args as A

__all__ = ["register", "load_model", "announce_weights"]


def load_model(args: argparse.Namespace, teachers: bool = False, **overrides):
    """The model a command works on, from ``--model`` / ``--checkpoint`` / ``--pretrained``.

    ``teachers``: also take a teacher file of ``mnv4 distill finetune`` (a non-MobileNetV4 classifier, e.g. a
    fine-tuned EfficientNet-Lite), with its preprocessing and class names; commands that only work on
    MobileNetV4s refuse one in one line."""
    from ..factory import create_model

    teacher = _teacher_file(args.checkpoint) if getattr(args, "checkpoint", None) else None
    if teacher is not None:
        if not teachers or A.resolve_model(args) is not None:
            raise MNv4Error(
                f"{args.checkpoint} is a teacher file of `mnv4 distill finetune` ({teacher}), not a MobileNetV4: "
                "`mnv4 eval` and `mnv4 predict` take it as `checkpoint` (without `model`), and "
                "`mnv4 distill label` as `teacher`"
            )
        return _load_teacher_file(args.checkpoint)
    name = A.resolve_model(args)
    if getattr(args, "spec", None):
        if name is not None:
            raise MNv4Error("pass either `model` or `spec`, not both")
        from ..models.specs import ModelSpec

        name = ModelSpec.from_dict(A.read_spec(args.spec))
    pretrained = getattr(args, "pretrained", None) or False
    if name is None and args.checkpoint is None and not pretrained:
        raise MNv4Error("no model given; pass `model` (see `mnv4 models`) or a `checkpoint`")
    if pretrained and name is None:
        raise MNv4Error("`pretrained` needs `model` to say which architecture's weights")
    return create_model(name, checkpoint=args.checkpoint, pretrained=pretrained, **overrides)


def _teacher_file(path: str) -> str | None:
    """``family:arch`` when ``path`` is a teacher file of ``mnv4 distill finetune``, else None."""
    from pathlib import Path

    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return None
    from safetensors import safe_open

    from ..distill.teachers import TEACHER_FORMAT
    from ..weights.io import CONFIG_KEY

    try:
        with safe_open(path, "pt") as f:
            meta = (f.metadata() or {}).get(CONFIG_KEY)
        cfg = json.loads(meta) if meta else {}
    except Exception:  # not readable as safetensors: the normal loader says why
        return None
    return f"{cfg.get('family')}:{cfg.get('arch')}" if cfg.get("format") == TEACHER_FORMAT else None


def _load_teacher_file(path: str):
    """The teacher's network, carrying what eval and predict read from a model (name, preprocessing, classes)."""
    from ..distill.teachers import load_teacher
    from ..models.meta import WeightsMeta, set_weights_meta

    t = load_teacher(path)
    model = t.model
    names = tuple(t.class_names) if t.class_names else None
    set_weights_meta(model, WeightsMeta(preprocess=t.preprocess, class_names=names, source=path))
    model.num_classes, model.display_name = t.num_classes, f"{t.identity['family']}:{t.identity['arch']}"
    return model


def model_name(model) -> str:
    """What to call a model in output: its spec's name, or a teacher's ``family:arch``."""
    spec = getattr(model, "spec", None)
    return spec.name if spec is not None else getattr(model, "display_name", type(model).__name__)


def announce_weights(model, purpose: str = "") -> None:
    """One line when a command runs on random weights, so nobody mistakes its output for a real model's."""
    from ..models.meta import weights_meta

    if weights_meta(model).source is None:
        what = f" ({purpose})" if purpose else ""
        print(
            f"mnv4: note: {model_name(model)} has random weights{what}; "
            "pass --checkpoint or --pretrained for real ones",
            file=sys.stderr,
        )


def _cmd_models(args: argparse.Namespace) -> int:
    import fnmatch

    from ..models.registry import MODEL_TABLE_HEADER, MODELS, model_row, models_markdown

    if args.markdown:
        print(models_markdown(), end="")
        return 0
    pattern = args.pattern or "*"
    if not any(ch in pattern for ch in "*?["):
        pattern = f"*{pattern}*"
    entries = [
        e for name, e in MODELS.items() if fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(e.timm_name, pattern)
    ]
    if not entries:
        raise MNv4Error(f"no model matches {args.pattern!r}; `mnv4 models` lists them all")
    A.print_table(MODEL_TABLE_HEADER, [model_row(e) for e in entries])
    if args.verbose:
        print()
        tag_rows = []
        for e in entries:
            for t in e.tags:
                pp = t.preprocess
                top1 = f"{t.top1:.2f}" if t.top1 is not None else "-"
                test = f"{pp.test_input_size} @ {pp.test_crop_pct:g}" if pp.test_input_size else "-"
                tag_rows.append(
                    (
                        f"{e.name}.{t.tag}",
                        str(t.num_classes),
                        f"{pp.input_size} @ {pp.crop_pct:g}",
                        test,
                        pp.interpolation,
                        pp.normalization,
                        top1,
                    )
                )
        if tag_rows:
            head = ("weights", "classes", "eval size @ crop", "test size @ crop", "interp", "mean/std", "top-1")
            A.print_table(head, tag_rows)
        pooled = [f"{e.name} ({e.downsample})" for e in entries if e.downsample != "conv"]
        if pooled:
            print("\nanti-aliased downsampling (docs/architecture.md §7.1): " + ", ".join(pooled))
        print("\ntop-1: ImageNet-1k val at the listed preprocessing (timm results); paper top-1: Tab. 6")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from ..models.meta import weights_meta
    from ..perf import profile
    from .detect_tools import detector_profile

    prof = detector_profile(args)  # None unless the model is a detector
    if prof is None:
        model = load_model(args)
        res = args.input_size or weights_meta(model).preprocess.input_size
        prof = profile(model, resolution=res, dtype=args.dtype, batch_size=args.batch_size)
    if args.per_layer:
        rows = [
            (
                layer.name,
                layer.kind,
                "x".join(map(str, layer.out_shape[1:])),
                f"{layer.macs / 1e6:.2f}",
                f"{layer.params:,}",
                f"{layer.bytes / 1e6:.3f}",
                f"{layer.intensity:.1f}",
            )
            for layer in prof.layers
        ]
        A.print_table(("layer", "op", "output", "MMACs", "params", "MB moved", "MACs/byte"), rows)
        print()
    print(prof.summary())
    if getattr(prof, "note", None):
        print(prof.note)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from ..factory import create_model
    from ..weights.checkpoint import save_model

    model = create_model(A.resolve_model(args), checkpoint=args.src)
    if args.to == "timm":
        from ..weights.timm import save_timm, timm_architecture

        dst = save_timm(model, args.dst)
        n = model.num_classes
        print(f"wrote {dst} ({timm_architecture(model)}, {n} classes, timm's key layout); in timm:")
        print(
            f'  timm.create_model("{timm_architecture(model)}", pretrained=True, num_classes={n}, '
            f'pretrained_cfg_overlay=dict(file="{dst}", num_classes={n}))'
        )
        return 0
    dst = save_model(model, args.dst)
    print(f"wrote {dst} ({model.spec.name}, {model.num_classes} classes)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import csv
    import json

    from ..data.images import BadImageLog
    from ..inference import predict
    from ..train.distributed import pick_device

    if args.topk < 1:
        raise MNv4Error(f"`topk` {args.topk} is invalid: must be >= 1")
    device = pick_device(args.device)
    model = load_model(args, teachers=True)
    announce_weights(model, "its predictions mean nothing")
    bad = BadImageLog()
    writer = None
    if args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "rank", "class", "index", "prob"])
    n = 0
    for p in predict(
        model,
        args.images,
        topk=args.topk,
        batch_size=args.batch_size,
        device=device,
        input_size=args.input_size,
        workers=args.workers,
        progress=False if args.no_progress else None,
        bad_images=bad,
    ):
        n += 1
        if args.json:
            print(json.dumps(p.to_dict()))
        elif writer is not None:
            for rank, (c, i, prob) in enumerate(zip(p.classes, p.indices, p.probs), 1):
                writer.writerow([p.path, rank, c, i, f"{prob:.6f}"])
        else:
            print(f"{p.path}: " + ", ".join(f"{c} {prob:.3f}" for c, prob in zip(p.classes, p.probs)))
    if bad:
        print(f"mnv4: {bad.summary()}", file=sys.stderr)
    if n == 0:
        raise MNv4Error("no image could be read, nothing was predicted")
    return 0


def register(sub) -> None:
    from ..perf.dtypes import DTYPE_BYTES

    p = sub.add_parser("models", help="list the models: params, MACs, resolution, paper top-1, weight tags")
    p.add_argument("pattern", nargs="?", default=None, help="only names matching this (substring or glob)")
    p.add_argument("-v", "--verbose", action="store_true", help="also list every weight tag with preprocessing")
    p.add_argument("--markdown", action="store_true", help="print the README's model table")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("profile", help="count params, MACs and bytes moved (per layer with --per-layer)")
    A.add_model(p)
    A.add_spec(p)
    A.add_weights(p, checkpoint_help="weights whose architecture (and classes) to profile")
    A.add_input_size(p, help="input resolution (default: the model's native one)")
    A.add_batch_size(p, 1)
    p.add_argument(
        "--dtype", default="float32", choices=tuple(DTYPE_BYTES), help="element width used to count bytes moved"
    )
    p.add_argument("--per-layer", action="store_true", help="print one row per conv / linear / attention op")
    A.add_threads(p)
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser(
        "convert", help="convert a timm checkpoint (or any loadable one) to mnv4's format, or (--to timm) back"
    )
    p.add_argument("src", help="timm or mnv4 .safetensors / .pth / .bin file or hub folder")
    p.add_argument("dst", help="output .safetensors path")
    A.declare_outputs(p, dst="file")
    p.add_argument(
        "--to",
        choices=("mnv4", "timm"),
        default="mnv4",
        help="key layout to write: mnv4's (default) or timm's, which timm.create_model loads (docs/timm.md)",
    )
    A.add_model(p, help="architecture (default: inferred from the weights)", positional=False)
    A.add_threads(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("predict", help="top-k classes for image files or folders (text, --json or --csv)")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    A.add_model(p, help="architecture (default: from the checkpoint)", positional=False)
    A.add_weights(p)
    A.add_input_size(p)
    A.add_batch_size(p, 32)
    p.add_argument("-k", "--topk", type=A.positive_int, default=5, help="classes per image")
    A.add_device(p)
    A.add_threads(p)
    A.add_workers(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object per image")
    fmt.add_argument("--csv", action="store_true", help="CSV rows: path, rank, class, index, prob")
    A.add_progress(p)
    p.set_defaults(func=_cmd_predict)
