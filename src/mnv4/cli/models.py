"""``mnv4 models | profile | convert | predict``."""

from __future__ import annotations

import argparse
import sys

from ..errors import MNv4Error
from . import args as A

__all__ = ["register", "load_model", "announce_weights"]


def load_model(args: argparse.Namespace, **overrides):
    """The model a command works on, from ``--model`` / ``--checkpoint`` / ``--pretrained``."""
    from ..factory import create_model

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


def announce_weights(model, purpose: str = "") -> None:
    """One line when a command runs on random weights, so nobody mistakes its output for a real model's."""
    if getattr(model, "weights_source", None) is None:
        what = f" ({purpose})" if purpose else ""
        print(
            f"mnv4: note: {model.spec.name} has random weights{what}; pass --checkpoint or --pretrained for real ones",
            file=sys.stderr,
        )


def _cmd_models(args: argparse.Namespace) -> int:
    import fnmatch

    from ..models.registry import MODELS, models_markdown

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
    rows = []
    for e in entries:
        top1 = f"{e.paper_top1:.1f}" if e.paper_top1 is not None else "-"
        more = f" (+{len(e.tags) - 1} more, -v)" if len(e.tags) > 1 and not args.verbose else ""
        weights = f"{e.tags[0].tag}{more}" if e.tags else "- (untrained)"
        rows.append((e.name, f"{e.params / 1e6:.2f}M", f"{e.gmacs:.3f}G", str(e.resolution), top1, weights))
    A.print_table(("model", "params", "MACs", "res", "paper top-1", "weights (timm tag)"), rows)
    if args.verbose:
        print()
        tag_rows = []
        for e in entries:
            for t in e.tags:
                pp = t.preprocess
                norm = "inception" if pp.mean == (0.5, 0.5, 0.5) else "imagenet"
                top1 = f"{t.top1:.2f}" if t.top1 is not None else "-"
                tag_rows.append(
                    (
                        f"{e.name}.{t.tag}",
                        str(t.num_classes),
                        f"{pp.input_size} @ {pp.crop_pct:g}",
                        pp.interpolation,
                        norm,
                        top1,
                    )
                )
        if tag_rows:
            A.print_table(("weights", "classes", "eval size @ crop", "interp", "mean/std", "top-1"), tag_rows)
        print("\ntop-1: ImageNet-1k val at the listed preprocessing (timm results); paper top-1: Tab. 6")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from ..perf import profile
    from .detect_tools import detector_profile

    prof = detector_profile(args)  # None unless the model is a detector
    if prof is None:
        model = load_model(args)
        res = args.input_size or model.preprocess.input_size
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
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = load_model(args)
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
        "--dtype",
        default="float32",
        choices=("float32", "float16", "bfloat16", "int8"),
        help="element width used to count bytes moved",
    )
    p.add_argument("--per-layer", action="store_true", help="print one row per conv / linear / attention op")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("convert", help="convert a timm checkpoint (or any loadable one) to mnv4's format")
    p.add_argument("src", help="timm .safetensors / .pth / .bin file or hub folder")
    p.add_argument("dst", help="output .safetensors path")
    A.add_model(p, help="architecture (default: inferred from the weights)", positional=False)
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
