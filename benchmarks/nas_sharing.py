"""How the super-network shares depthwise weights decides whether it trains at all (docs/nas.md).

Trains the `s` super-network on cifar10-mini at 32 px for ``--steps`` AdamW steps (batch 64, from
scratch, one fixed stem/width/depth skeleton) while sampling the depthwise choices of every block
at random each step, and prints the mean training loss of the last 20 steps per setting:

* fixed: every block IB 3x3 (no sampling) - the reference;
* mid 3/5: the middle DW kernel drawn from {3, 5} - separate weights per kernel vs 3x3 = centre of 5x5;
* start 0/3/5: the start DW drawn from {absent, 3, 5} - Kaiming init vs near-identity init;
* all: start and middle DW both sampled - separate + Kaiming vs centre + identity (the default).

    nice -n 10 python benchmarks/nas_sharing.py --data DATA/cifar10-mini [--steps 100]
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mnv4.data.datasets import load_data  # noqa: E402
from mnv4.data.transforms import train_transform  # noqa: E402
from mnv4.models.registry import Preprocess  # noqa: E402
from mnv4.nas import get_space  # noqa: E402
from mnv4.nas.supernet import SuperNet  # noqa: E402

# (label, start choices, mid choices, kernel_sharing, dw_init)
SETTINGS = (
    ("fixed IB 3x3", (0,), (3,), "centre", "identity"),
    ("mid {3,5}, separate kernels", (0,), (3, 5), "separate", "kaiming"),
    ("mid {3,5}, 3x3 = centre of 5x5", (0,), (3, 5), "centre", "kaiming"),
    ("start {0,3,5}, Kaiming init", (0, 3, 5), (3,), "centre", "kaiming"),
    ("start {0,3,5}, near-identity init", (0, 3, 5), (3,), "centre", "identity"),
    ("all DW choices, separate + Kaiming", (0, 3, 5), (0, 3, 5), "separate", "kaiming"),
    ("all DW choices, centre + identity (default)", (0, 3, 5), (0, 3, 5), "centre", "identity"),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the cifar10-mini image folder (train/ and val/)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--images", type=int, default=1500, help="training images, augmented once and kept in memory")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data(os.path.normpath(args.data))
    tf = train_transform(Preprocess(input_size=32, crop_pct=1.0, interpolation="bilinear"), scale=(0.35, 1.0))
    torch.manual_seed(0)
    pick = torch.randperm(len(data.train))[: args.images].tolist()
    xs, ys = zip(*((tf(data.train[i][0]), data.train[i][1]) for i in pick))
    x_all, y_all = torch.stack(xs), torch.tensor(ys)
    space = get_space("s")
    skeleton = space.fine_fixed(space.sample(random.Random(5), space.coarse_fixed()))  # widths, depths, e4

    print(f"{'setting':<46} {'loss (last 20 steps)':>21} {'seconds':>8}")
    for label, starts, mids, sharing, init in SETTINGS:
        torch.manual_seed(0)
        net = SuperNet(space, len(data.class_names), kernel_sharing=sharing, dw_init=init)
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.05)
        rng = random.Random(0)
        g = torch.Generator().manual_seed(0)
        losses, t0 = [], time.perf_counter()
        for _ in range(args.steps):
            arch = dict(skeleton)
            for d in space.decisions:
                if d.name.endswith(".start"):
                    arch[d.name] = rng.choice([k for k in starts if k in d.choices])
                elif d.name.endswith(".mid"):
                    arch[d.name] = rng.choice([k for k in mids if k in d.choices] or [min(k for k in d.choices if k)])
            arch = space.sample(rng, arch)
            idx = torch.randint(0, len(x_all), (64,), generator=g)
            loss = F.cross_entropy(net(x_all[idx], arch), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        tail = losses[-20:]
        print(f"{label:<46} {sum(tail) / len(tail):>21.3f} {time.perf_counter() - t0:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
