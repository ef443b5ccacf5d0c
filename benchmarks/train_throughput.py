"""Training images/s: mnv4's trainer vs a plain PyTorch loop over timm's implementation of the
same model, same batch and resolution, measured alternately in one process (same machine, same run).

The mnv4 side is the full trainer (`mnv4.train.train`) with its defaults: PIL images through
RandomResizedCrop + flip + normalise in the main process (workers=0), per-step reseeding, channels_last
batches on CPU, fused AdamW with two parameter groups, LR schedule, label smoothing, metrics and
checkpoints. The timm side is the bare loop a timm user writes: a pre-made tensor batch (no data
loading at all), forward, cross-entropy, backward, `torch.optim.AdamW` with its defaults (the
per-tensor loop on CPU), NCHW. The ratio is therefore what the trainer's defaults gain (layout,
optimizer kernel) minus what it does on top of the raw step (data, checks, metrics). The reported
images/s is the second epoch's, from the trainer's metrics (evaluation and checkpoint writes excluded).

    python benchmarks/train_throughput.py [--input-size 128] [--batch-size 32] [--steps 12] [--rounds 3] [--threads N]

It prints the CPU, torch version and thread count, both sides' images/s and their ratio for each
round, and the medians: run it alone on the machine for a figure to quote (docs/training.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from mnv4.data.datasets import DataBundle  # noqa: E402
from mnv4.host import cpu_description  # noqa: E402
from mnv4.train import resolve_config, train  # noqa: E402
from mnv4.train.metrics import read_metrics  # noqa: E402


class RandomImages(Dataset):
    def __init__(self, n: int, size: int, classes: int = 10) -> None:
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)) for _ in range(n)]
        self.targets = rng.integers(0, classes, n).tolist()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]


def mnv4_images_per_s(model: str, res: int, batch: int, steps: int, out: str) -> float:
    # Two epochs of `steps` steps; the second one is reported (the first includes warm-up).
    data = DataBundle(
        "random", RandomImages(batch * steps, res), RandomImages(batch, res), [str(i) for i in range(10)], None
    )
    cfg = resolve_config(
        "quick", model=model, input_size=res, batch_size=batch, epochs=2, output=out, crop_scale=(0.08, 1.0), hflip=0.5
    )
    train(cfg, data=data, progress=False, log=lambda m: None)
    return float(read_metrics(os.path.join(out, "metrics.csv"))[-1]["images_per_sec"])


def timm_images_per_s(model: str, res: int, batch: int, steps: int, tuned: bool = False) -> float:
    """The bare loop as written by default (NCHW, torch's default AdamW) or ``tuned`` (channels_last
    model and batch, fused AdamW: the fastest bare loop we know on CPU)."""
    import timm

    net = timm.create_model(model.replace("mnv4_", "mobilenetv4_"), num_classes=10).train()
    x, y = torch.randn(batch, 3, res, res), torch.randint(0, 10, (batch,))
    if tuned:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05, fused=tuned or None)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y, label_smoothing=0.1).backward()
        opt.step()

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mnv4_conv_small")
    ap.add_argument("--input-size", "--res", dest="res", type=int, default=128)
    ap.add_argument("--batch-size", "--batch", dest="batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads, both sides (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{cpu_description()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"{args.model} @ {args.res}px, batch {args.batch}, {args.steps} timed steps per side and round")
    ours, theirs, tuned = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):  # alternate, so load from other processes hits every side alike
            theirs.append(timm_images_per_s(args.model, args.res, args.batch, args.steps))
            tuned.append(timm_images_per_s(args.model, args.res, args.batch, args.steps, tuned=True))
            ours.append(mnv4_images_per_s(args.model, args.res, args.batch, args.steps, os.path.join(tmp, f"r{r}")))
            print(
                f"round {r + 1}: mnv4 trainer {ours[-1]:.1f} img/s, timm plain loop {theirs[-1]:.1f} img/s "
                f"(ratio {ours[-1] / theirs[-1]:.2f}), timm tuned loop {tuned[-1]:.1f} img/s "
                f"(ratio {ours[-1] / tuned[-1]:.2f})"
            )
    a, b, c = statistics.median(ours), statistics.median(theirs), statistics.median(tuned)
    print(f"median: mnv4 trainer {a:.1f} img/s, timm plain loop {b:.1f} img/s, timm tuned loop {c:.1f} img/s")
    for label, other in (("plain", theirs), ("tuned", tuned)):
        per_round = statistics.median(o / t for o, t in zip(ours, other))
        print(f"mnv4 trainer / timm {label} loop: median per-round ratio {per_round:.2f}")


if __name__ == "__main__":
    main()
