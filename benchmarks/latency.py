"""Batch-1 CPU latency: mnv4 eager vs timm eager, same process, alternating, medians.

    python benchmarks/latency.py [--models mnv4_conv_small ...] [--threads 2] [--rounds 7] [--iters 20] [--nchw]
    python benchmarks/latency.py --models mnv4_conv_large --rounds 41 --paired   # is a small gap real?

Each round times ``--iters`` calls of one implementation, then of the other (the order flips every
round, so drift and noise from other processes hit both); the table shows the median over rounds
of the per-call mean, and the ratio ours / timm (< 1 means mnv4 is faster). Both models carry the
same weights (timm's random init with BatchNorm statistics re-estimated on noise, so activations have
a trained model's scale instead of sinking into denormals; converted by mnv4), and the script checks
the logits agree. ``--nchw`` adds a third candidate to the same rounds: mnv4 with its CPU channels_last
eval path switched off (``model.cpu_channels_last = False``), to see what that layout choice is worth.
``--paired`` adds the per-round ratio (round r of both candidates was timed seconds apart, so the ratio
is paired): its median and range, the rounds mnv4 was faster in, and the exact sign-test p-value of "no
difference" (``mnv4.perf.latency.paired_ratio``); with ``--nchw`` the same for the NCHW path. With many
rounds, a large p says a gap is noise.
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMM_FUSED_ATTN", "1")  # give timm its fastest attention path

import torch  # noqa: E402

import mnv4  # noqa: E402
from mnv4.host import cpu_description  # noqa: E402
from mnv4.models import noise_batches, recalibrate_batchnorm  # noqa: E402
from mnv4.models.registry import MODELS, PUBLISHED  # noqa: E402
from mnv4.perf.latency import alternating_rounds, paired_ratio  # noqa: E402


def bench(
    name: str, rounds: int, iters: int, res: int | None, nchw: bool = False
) -> tuple[dict[str, list[float]], float]:
    import copy

    import timm

    ours = mnv4.create_model(name).eval()
    size = res or ours.preprocess.input_size
    ref = timm.create_model(MODELS[name].timm_name).eval()
    # Random weights with realistic activations (default BN statistics would time denormals).
    recalibrate_batchnorm(ref, noise_batches(size, batches=2, batch_size=8))
    mnv4.load_weights(ours, ref.state_dict())
    x = torch.randn(1, 3, size, size)
    fns = {"mnv4": ours, "timm": ref}
    if nchw:
        fns["mnv4_nchw"] = copy.deepcopy(ours)
        fns["mnv4_nchw"].cpu_channels_last = False
    with torch.inference_mode():
        want = ref(x)
        diff = float((want - ours(x)).abs().max() / want.abs().max())
        t = alternating_rounds(fns, x, rounds, iters)
    return t, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(PUBLISHED))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument(
        "--input-size", "--res", dest="res", type=int, default=None, help="input size (default: native)"
    )
    parser.add_argument("--nchw", action="store_true", help="also time mnv4 with its channels_last eval path off")
    parser.add_argument("--paired", action="store_true", help="per-round ratios and a sign test (is a gap real?)")
    args = parser.parse_args()
    if args.rounds < 1 or args.iters < 1:
        parser.error("--rounds and --iters must be at least 1")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random-init hybrids: see mnv4.perf.latency.flush_denormals
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch 1, median of {args.rounds} rounds x {args.iters}, "
        f"CPU: {cpu_description()}"
    )
    extra = " mnv4 NCHW ms | channels_last / NCHW |" if args.nchw else ""
    extra += " paired ratio median [min..max] | mnv4 faster in | sign-test p |" if args.paired else ""
    extra += " NCHW paired ratio | NCHW faster in | NCHW sign-test p |" if args.paired and args.nchw else ""
    head = "| model | res | mnv4 eager ms | timm eager ms | ratio mnv4/timm | max abs logit diff / max abs logit |"
    print(head + extra)
    print("|---|---|---|---|---|---|" + "---|" * extra.count("|"))
    for name in args.models:
        times, diff = bench(name, args.rounds, args.iters, args.res, args.nchw)
        t = {k: statistics.median(v) for k, v in times.items()}
        ours, ref = t["mnv4"], t["timm"]
        res = args.res or MODELS[name].default_preprocess.input_size
        row = f"| {name} | {res} | {ours:.2f} | {ref:.2f} | {ours / ref:.3f} | {diff:.1e} |"
        if args.nchw:
            row += f" {t['mnv4_nchw']:.2f} | {ours / t['mnv4_nchw']:.3f} |"
        for ours_key in ("mnv4", "mnv4_nchw") if args.paired else ():
            if ours_key in times:
                pr = paired_ratio(times[ours_key], times["timm"])
                row += (
                    f" {pr['median']:.3f} [{pr['min']:.3f}..{pr['max']:.3f}] | {pr['a_faster']:g} of {pr['rounds']} "
                    f"| {pr['sign_p']:.3g} |"
                )
        print(row, flush=True)


if __name__ == "__main__":
    main()
