"""Detectors in `mnv4 export` and `mnv4 profile`: the branches those commands hand over to (docs/detection.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import MNv4Error
from . import args as A

__all__ = ["is_detector_request", "export_detector_cli", "detector_profile", "check_classifier_eval"]


def is_detector_request(args: argparse.Namespace) -> bool:
    """Whether the command is about a detector: a detector name (``retinanet_mnv4_conv_small``), a
    ``--checkpoint`` holding a saved detector (read from the file's metadata), or ``--with-nms``."""
    from ..detect.bench import is_detector_name

    name = A.resolve_model(args)
    if getattr(args, "with_nms", False) or (isinstance(name, str) and is_detector_name(name)):
        return True
    return _is_detector_file(getattr(args, "checkpoint", None))


def _is_detector_file(path: str | None) -> bool:
    """Whether ``path`` is a saved detector (read from the safetensors metadata, no weights loaded)."""
    if not path or not Path(path).is_file():
        return False
    from ..detect.io import is_detector_config
    from ..weights.io import CONFIG_KEY

    try:
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(CONFIG_KEY)
        return is_detector_config(json.loads(meta)) if meta else False
    except Exception:  # not a safetensors file (or damaged): the classifier path reports it
        return False


def export_detector_cli(args: argparse.Namespace, request, progress: bool | None) -> int:
    """``mnv4 export`` of a detector: the command's :class:`~mnv4.deploy.requests.ExportRequest` plus ``--with-nms``
    and ``--split``; ``--eval`` names a detection dataset, whose AP before -> after is printed."""
    import dataclasses

    from ..detect.export import export_detector

    detector = _detector(args, "exports", default_size=320)
    # the raw network takes every other request field (calibration, PTQ settings, input format, ...) as
    # a classifier's export does; the with-NMS graph has none of them
    named = ("format", "output", "precision", "samples", "threads", "eval_dir", "input_size")
    extra = {f.name: getattr(request, f.name) for f in dataclasses.fields(request) if f.name not in named}
    path = export_detector(
        detector,
        request.format,
        request.output,
        with_nms=args.with_nms,
        precision=request.precision,
        samples=request.samples,
        threads=request.threads,
        eval_data=request.eval_dir,
        split=args.split,
        **({} if args.with_nms else dict(extra, progress=progress)),
    )
    print(f"wrote {path}, {path}.parity.json and {path}.detector.json")
    return 0


def check_classifier_eval(eval_dir: str | None) -> None:
    """A classifier's ``--eval`` is a folder of class folders; a detection dataset there is a mix-up that
    would otherwise be read as classes named after its splits."""
    if eval_dir is None or not Path(eval_dir).is_dir():
        return  # the request names a missing folder itself
    from ..detect.data import detect_format

    try:
        fmt = detect_format(Path(eval_dir))
    except MNv4Error:
        return
    raise MNv4Error(
        f"{eval_dir} is a {fmt.upper()} detection dataset; a classifier's `eval_dir` is a folder of class "
        "folders (AP before/after needs a detector `checkpoint`)"
    )


def detector_profile(args: argparse.Namespace):
    """``mnv4 profile`` of a detector (a detector name or checkpoint); None when the model is a classifier.

    Detector names are counted with 91 COCO classes at ``input_size`` (default 384, the paper's Tab. 7);
    the profile's ``note`` adds the totals as the paper counts them (with TF's classification tail).
    """
    if not is_detector_request(args):
        return None
    from ..detect.profile import paper_counts, profile

    detector = _detector(args, "is counted", default_size=384)
    prof = profile(detector, batch_size=args.batch_size, dtype=args.dtype)
    counts = paper_counts(detector)
    prof.note = (
        f"as the paper counts (with TF's 960/1280 backbone tail, docs/detection.md): "
        f"{counts.paper_params / 1e6:.2f}M params, {counts.paper_macs / 1e9:.2f} GMACs"
    )
    return prof


def _detector(args: argparse.Namespace, verb: str, default_size: int):
    """The saved detector of ``--checkpoint``, or a random-weight one of ``--model`` with 91 COCO classes."""
    from ..detect.factory import create_detector
    from ..detect.profile import COCO_CLASSES

    name = A.resolve_model(args)
    if args.checkpoint:
        if (
            getattr(args, "with_nms", False)
            and Path(args.checkpoint).is_file()
            and not _is_detector_file(args.checkpoint)
        ):
            raise MNv4Error(f"--with-nms is for detectors; {args.checkpoint} is not one (export it without --with-nms)")
        if args.input_size is not None:
            raise MNv4Error(f"a saved detector {verb} at its own image size; drop `input_size`")
        if name is not None:
            raise MNv4Error("a saved detector names its own architecture; drop `model`")
        return create_detector(checkpoint=args.checkpoint)
    if name is None:
        raise MNv4Error("pass a detector `checkpoint` or a detector name as `model` (e.g. retinanet_mnv4_conv_small)")
    if getattr(args, "pretrained", None):
        raise MNv4Error("`pretrained` names classifier weights; build the detector in Python with pretrained=...")
    detector = create_detector(name, num_classes=COCO_CLASSES, image_size=args.input_size or default_size)
    print(
        f"mnv4: note: {name} has random weights ({COCO_CLASSES} classes); pass --checkpoint for a trained one",
        file=sys.stderr,
    )
    return detector
