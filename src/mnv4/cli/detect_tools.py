"""Detectors in `mnv4 export` and `mnv4 profile`: the branches those commands hand over to (docs/detection.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MNv4Error
from . import args as A

__all__ = ["is_detector_request", "export_detector_cli"]


def is_detector_request(args: argparse.Namespace) -> bool:
    """Whether ``--checkpoint`` is a saved detector (read from the file's metadata) or ``--with-nms`` was asked."""
    if getattr(args, "with_nms", False):
        return True
    path = getattr(args, "checkpoint", None)
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


def export_detector_cli(args: argparse.Namespace, precision: str, progress: bool | None) -> int:
    from ..detect.export import export_detector
    from ..detect.io import load_detector

    if not args.checkpoint:
        raise MNv4Error("`with_nms` exports a detector: pass its `checkpoint` (a saved detector)")
    if args.input_size is not None:
        raise MNv4Error("a detector exports at its own image size; drop `input_size`")
    detector = load_detector(args.checkpoint)
    path = export_detector(
        detector,
        args.format,
        args.output,
        with_nms=args.with_nms,
        precision=precision,
        samples=args.samples,
        threads=args.threads,
        **({} if args.with_nms else dict(calib_dir=args.calib, calib_samples=args.calib_samples, progress=progress)),
    )
    print(f"wrote {path}, {path}.parity.json and {path}.detector.json")
    return 0


def detector_profile(args: argparse.Namespace):
    """``mnv4 profile`` of a detector (a detector name or checkpoint); None when the model is a classifier.

    Detector names are counted with 91 COCO classes at ``input_size`` (default 384, the paper's Tab. 7);
    the profile's ``note`` adds the totals as the paper counts them (with TF's classification tail).
    """
    from ..detect.bench import is_detector_name

    name = A.resolve_model(args)
    if not (is_detector_request(args) or (isinstance(name, str) and is_detector_name(name))):
        return None
    from ..detect.factory import create_detector
    from ..detect.profile import COCO_CLASSES, paper_counts, profile

    if args.checkpoint:
        if args.input_size is not None:
            raise MNv4Error("a saved detector is counted at its own image size; drop `input_size`")
        detector = create_detector(checkpoint=args.checkpoint)
    else:
        detector = create_detector(name, num_classes=COCO_CLASSES, image_size=args.input_size or 384)
    prof = profile(detector, batch_size=args.batch_size, dtype=args.dtype)
    counts = paper_counts(detector)
    prof.note = (
        f"as the paper counts (with TF's 960/1280 backbone tail, docs/detection.md): "
        f"{counts.paper_params / 1e6:.2f}M params, {counts.paper_macs / 1e9:.2f} GMACs"
    )
    return prof
