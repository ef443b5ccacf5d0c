"""Sanity check on real photos: mnv4_conv_small from scratch on the cifar10-mini development set
(ImageFolder, 5,000 train / 1,000 val 32x32 JPEGs; not part of the test suite).

The `small-photos` recipe: `quick`'s AdamW, warm-up + cosine and label smoothing 0.1, with the augmentations
that photos need and digits do not: horizontal flips, RandAugment (p 0.5, 2 ops, level 5) and
random resized crops from 35% of the image, at the native 32 px, 40 epochs, batch 64.

    python benchmarks/cifar_mini.py --data DATA/cifar10-mini [--epochs 40]

Prints val top-1 (best epoch) and wall time, and writes a normal run directory (summary.json,
metrics.csv, curves.png) under runs/.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mnv4.train import resolve_config, train  # noqa: E402
from mnv4.train.metrics import plot_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the cifar10-mini image folder (train/ and val/)")
    ap.add_argument("--epochs", type=float, default=40)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--output", default="runs/cifar-mini-conv-small")
    args = ap.parse_args()
    cfg = resolve_config(
        "small-photos",
        model="mnv4_conv_small",
        data=os.path.normpath(args.data),
        epochs=args.epochs,
        input_size=args.input_size,
        workers=args.workers,
        output=args.output,
    )
    result = train(cfg, progress=False, exist_ok=True)  # a rerun replaces the previous benchmark run
    s = result.summary
    plot_run(result.run_dir)
    print(
        f"cifar10-mini, {s['model']} from scratch, {s['epochs']} epochs at {s['input_size']} px: "
        f"val top-1 {s['val_top1']:.2f}% (best, epoch {s['best_epoch']}), final {s['val_top1_final']:.2f}%, "
        f"wall {s['wall_seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
