"""The ``mnv4`` command: a thin shell over the library API.

Command groups live next to the code they drive and register themselves here through a
``register(subparsers)`` function (see ``_COMMAND_MODULES``). Errors print one line; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import MNv4Error

# Modules that add their own subcommands; each defines register(subparsers).
_COMMAND_MODULES = ("mnv4.train.cli", "mnv4.deploy.cli")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _cmd_models(args: argparse.Namespace) -> None:
    from .models.registry import MODELS
    from .perf import profile

    rows = []
    for name, entry in MODELS.items():
        if args.filter and args.filter not in name:
            continue
        res = entry.default_preprocess.input_size
        prof = profile(entry.spec, resolution=res)
        more = f" (+{len(entry.tags) - 1} more)" if len(entry.tags) > 1 else ""
        tags = f"{entry.tags[0].tag}{more}" if entry.tags else "- (untrained)"
        rows.append((name, f"{prof.params / 1e6:.2f}M", f"{prof.macs / 1e9:.3f}G", str(res), tags))
    print_table(("model", "params", "MACs", "res", "default weights (timm tag)"), rows)


def _cmd_profile(args: argparse.Namespace) -> None:
    from .factory import create_model
    from .perf import profile

    model = create_model(args.model, checkpoint=args.checkpoint)
    res = args.res or model.preprocess.input_size
    prof = profile(model, resolution=res, dtype=args.dtype, batch_size=args.batch)
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
        print_table(("layer", "op", "output", "MMACs", "params", "MB moved", "MACs/byte"), rows)
        print()
    print(prof.summary())


def _cmd_convert(args: argparse.Namespace) -> None:
    from .factory import create_model
    from .weights.checkpoint import save_model

    model = create_model(args.model, checkpoint=args.src)
    dst = save_model(model, args.dst)
    print(f"wrote {dst} ({model.spec.name}, {model.num_classes} classes)")


def _image_paths(inputs: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            paths.append(p)
        else:
            raise MNv4Error(f"no such image or folder: {p}")
    if not paths:
        raise MNv4Error(f"no images found in {', '.join(inputs)}")
    return paths


def _cmd_predict(args: argparse.Namespace) -> None:
    import torch
    from PIL import Image, UnidentifiedImageError

    from .data.imagenet import imagenet_class_names
    from .data.transforms import eval_transform
    from .factory import create_model

    model = create_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained or False).eval()
    if model.class_names:
        names = list(model.class_names)
    elif model.num_classes == 1000:
        names = list(imagenet_class_names())
    else:
        names = [f"class {i}" for i in range(model.num_classes)]
    tf = eval_transform(model.preprocess, input_size=args.res)
    k = min(args.topk, model.num_classes)
    for path in _image_paths(args.images):
        try:
            with Image.open(path) as im:
                x = tf(im).unsqueeze(0)
        except (UnidentifiedImageError, OSError) as e:
            print(f"{path}: skipped, not a readable image ({e})", file=sys.stderr)
            continue
        with torch.inference_mode():
            probs = model(x).softmax(-1)[0]
        top = probs.topk(k)
        preds = ", ".join(f"{names[i]} {p:.3f}" for p, i in zip(top.values.tolist(), top.indices.tolist()))
        print(f"{path}: {preds}")


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Left-aligned columns with a dashed rule under the header (the CLI's table style)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*header))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnv4", description="MobileNetV4 models, weights, training and deployment")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("models", help="list the registered models with params, MACs and native resolution")
    p.add_argument("filter", nargs="?", default="", help="only names containing this text")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("profile", help="count params, MACs and bytes moved (per layer with --per-layer)")
    p.add_argument("model", help="model name, e.g. mnv4_conv_small")
    p.add_argument("--res", type=int, default=None, help="input resolution (default: the model's native one)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "int8"))
    p.add_argument("--checkpoint", default=None, help="optional checkpoint, e.g. for a custom num_classes")
    p.add_argument("--per-layer", action="store_true", help="print one row per conv / linear / attention op")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("convert", help="convert a timm checkpoint (or any loadable one) to mnv4's format")
    p.add_argument("src", help="timm .safetensors / .pth / .bin file or hub folder")
    p.add_argument("dst", help="output .safetensors path")
    p.add_argument("--model", default=None, help="architecture (default: inferred from the weights)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("predict", help="top-k predictions for images or folders of images")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--model", default=None, help="architecture (default: from the checkpoint)")
    p.add_argument("--checkpoint", default=None, help="weights to use")
    p.add_argument("--pretrained", default=None, help="a timm weight tag to download instead of --checkpoint")
    p.add_argument("--res", type=int, default=None, help="input resolution (default: the weights' own)")
    p.add_argument("--topk", type=int, default=5)
    p.set_defaults(func=_cmd_predict)

    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is None or not module_name.startswith(e.name):
                raise  # a real import error inside an installed command group
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except MNv4Error as e:
        if args.debug:
            raise
        print(f"mnv4: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mnv4: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything unexpected still gets one line unless --debug
        if args.debug:
            raise
        print(f"mnv4: error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
