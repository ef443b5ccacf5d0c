"""Training memory with and without gradient checkpointing (``model.set_grad_checkpointing()``).

For each model, one forward + backward of a batch runs in a fresh process per setting, so the peak
resident memory of one setting cannot hide in the other's. Reported per setting:

- peak RSS growth: the process's peak resident set size (``ru_maxrss``) after the step minus its
  resident size just before it (model, optimizer-free, and input already allocated);
- saved activations: bytes of the distinct buffers autograd keeps for backward during the forward
  (exact, from ``torch.autograd.graph.saved_tensors_hooks``);
- step time: median seconds of the forward + backward over ``--steps`` steps after that first one.

    python benchmarks/grad_checkpointing.py [--models mnv4_conv_small mnv4_hybrid_medium]
        [--input-size 224] [--batch-size 32] [--steps 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from mnv4.host import cpu_description


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def child(model_name: str, size: int, batch: int, steps: int, checkpointing: bool) -> dict:
    import torch

    import mnv4

    torch.manual_seed(0)
    model = mnv4.create_model(model_name, num_classes=1000).train()
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(batch, 3, size, size)
    saved = 0

    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:  # in-place activations: several saved tensors share one buffer
            seen.add(storage.data_ptr())
            saved += storage.nbytes()
        return t

    before = _rss_bytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.logsumexp(1).mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        model(x).logsumexp(1).mean().backward()
        times.append(time.perf_counter() - t)
    return {"peak_growth": peak - before, "saved": saved, "step_s": statistics.median(times) if times else None}


def _run_child(args: argparse.Namespace, model: str, checkpointing: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", model, str(int(checkpointing))]
    cmd += ["--input-size", str(args.input_size), "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    # glibc keeps freed heap memory resident and raises its mmap threshold as buffers are freed, so RSS
    # would track fragmentation rather than live tensors; a fixed 64 KiB threshold (mallopt(3)) maps every
    # tensor buffer on its own and returns it to the OS when freed.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"grad_checkpointing: error: the {model} run failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mnv4_conv_small", "mnv4_conv_medium", "mnv4_hybrid_medium"])
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after the measured one")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "ON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = child(args.child[0], args.input_size, args.batch_size, args.steps, bool(int(args.child[1])))
        print(json.dumps(res))
        return

    mb = 1 << 20
    print(
        f"{cpu_description()}, {args.threads} thread(s), batch {args.batch_size} @ {args.input_size} px, "
        "fp32, train mode"
    )
    header = ("model", "checkpointing", "peak RSS growth MB", "saved activations MB", "step s")
    rows = []
    for model in args.models:
        results = [(on, _run_child(args, model, on)) for on in (False, True)]
        for on, r in results:
            step = f"{r['step_s']:.2f}" if r["step_s"] is not None else "-"
            rows.append((model, "on" if on else "off", f"{r['peak_growth'] / mb:.0f}", f"{r['saved'] / mb:.0f}", step))
        off, on = results[0][1], results[1][1]
        rows.append((model, "on / off", f"{on['peak_growth'] / off['peak_growth']:.2f}x",
                     f"{on['saved'] / off['saved']:.2f}x", ""))  # fmt: skip
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
