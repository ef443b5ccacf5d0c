"""The paper's Mobile MQA ablations (§6.3 Tab. 2 and §6.4 Tab. 3) at our scale, on this CPU.

    python benchmarks/mqa_ablation.py [--threads 2] [--rounds 7] [--iters 10] [--no-onnx]

Tab. 2: a conv base model plus 3 MHSA blocks vs plus 3 MQA blocks. The paper's base is unnamed
(6.0 GMACs, 30.9M params); ours is MNv4-Conv-L at 384 px (6.4 GMACs, 32.6M), with the three
attention blocks appended to its stride-32 stage using Hybrid-L's stride-32 attention settings
(8 heads, key/value dim 64, no K/V down-sampling). Like the paper, the deltas compare what each
kind of attention *adds* to the base: params, MACs and latency.

Tab. 3: MNv4-Hybrid-M at 256 px with its stride-16 MQA blocks' K/V down-sampling (kv_stride 2, as
released) vs without (kv_stride 1).

Latency is batch 1 on CPU: mnv4 eager after ``fuse()`` (models alternate within rounds, medians) and
ONNX Runtime on the exported fused model (same alternation, measured after all torch timings so
idle ORT threads cannot slow torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import mnv4  # noqa: E402
from mnv4.deploy import fuse  # noqa: E402
from mnv4.models.specs import MODEL_SPECS, AttentionSpec, ModelSpec, mhsa, mqa  # noqa: E402
from mnv4.perf.latency import alternating_medians  # noqa: E402

PAPER_TAB2 = {"params": -25.5, "macs": -28.6, "Pixel 7 EdgeTPU": -84.2, "Pixel 8 EdgeTPU": -39.0, "S23 GPU": -41.1}
PAPER_TAB3 = {"macs": 3.0, "CPU": 23.0, "GPU": 25.0}  # efficiency gain = without / with - 1, in %


def with_attention(base: ModelSpec, block: AttentionSpec, n: int, name: str) -> ModelSpec:
    stages = list(base.stages)
    stages[3] = (*stages[3], *[block] * n)
    return dataclasses.replace(base, name=name, stages=tuple(stages))


def without_kv_downsampling(spec: ModelSpec) -> ModelSpec:
    def strip(b):
        return dataclasses.replace(b, kv_stride=1) if isinstance(b, AttentionSpec) else b

    return dataclasses.replace(
        spec, name=f"{spec.name}_no_kv_ds", stages=tuple(tuple(strip(b) for b in st) for st in spec.stages)
    )


def measure(specs: dict[str, ModelSpec], res: int, args) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    models = {k: mnv4.create_model(s).eval() for k, s in specs.items()}
    out = {}
    for k, m in models.items():
        prof = mnv4.perf.profile(m, res)
        out[k] = {"params": prof.params, "macs": prof.macs}
    x = torch.randn(1, 3, res, res)
    fused = {k: fuse(m) for k, m in models.items()}
    with torch.inference_mode():
        for k, ms in alternating_medians(fused, x, args.rounds, args.iters).items():
            out[k]["eager"] = ms
    if not args.no_onnx:
        try:
            from mnv4.deploy.export import export
            from mnv4.deploy.runners import load_runner

            tmp = Path(tempfile.mkdtemp(prefix="mnv4-mqa-"))
            runners = {}
            for k, m in models.items():
                path = export(m, "onnx", tmp / f"{k}.onnx", resolution=res, samples=2, verbose=False).path
                runners[k] = load_runner(path, "onnx", threads=args.threads)
            xn = np.ascontiguousarray(x.numpy())
            for k, ms in alternating_medians(runners, xn, args.rounds, args.iters).items():
                out[k]["onnxruntime"] = ms
        except mnv4.MNv4Error as e:
            print(f"(onnxruntime skipped: {e})")
    return out


def _pct(new: float, old: float) -> str:
    return f"{(new / old - 1) * 100:+.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-onnx", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random-init hybrids: see mnv4.perf.latency.flush_denormals
    lat_keys = ["eager"] + ([] if args.no_onnx else ["onnxruntime"])
    print(f"torch {torch.__version__}, {args.threads} threads, batch 1, median of {args.rounds} rounds x {args.iters}")

    base = MODEL_SPECS["mnv4_conv_large"]
    tab2 = measure(
        {
            "base": base,
            "+3 MHSA": with_attention(base, mhsa(8, 64), 3, "conv_large_3mhsa"),
            "+3 MQA": with_attention(base, mqa(8, 64), 3, "conv_large_3mqa"),
        },
        384,
        args,
    )
    print("\n## Tab. 2: MQA vs MHSA (base: MNv4-Conv-L @384, 3 blocks appended to the stride-32 stage)\n")
    cols = ["params (M)", "MACs (G)", *[f"{k} ms" for k in lat_keys]]
    print("| model | " + " | ".join(cols) + " |\n|---" * 1 + "|---" * len(cols) + "|")
    for k, r in tab2.items():
        cells = [f"{r['params'] / 1e6:.2f}", f"{r['macs'] / 1e9:.3f}", *[f"{r[t]:.2f}" for t in lat_keys if t in r]]
        print(f"| {k} | " + " | ".join(cells) + " |")
    print("\nWhat MQA adds vs what MHSA adds (negative = MQA adds less):\n")
    print("| quantity | MHSA adds | MQA adds | ours | paper |\n|---|---|---|---|---|")
    paper_for = {"params": "params", "macs": "macs", "eager": "Pixel 8 EdgeTPU", "onnxruntime": "Pixel 8 EdgeTPU"}
    b, h, q = tab2["base"], tab2["+3 MHSA"], tab2["+3 MQA"]
    for key in ["params", "macs", *lat_keys]:
        if key not in q:
            continue
        dh, dq = h[key] - b[key], q[key] - b[key]
        unit = {"params": 1e6, "macs": 1e9}.get(key, 1.0)
        suffix = {"params": "M", "macs": "G"}.get(key, " ms")
        paper = PAPER_TAB2[paper_for[key]]
        others = "" if key in ("params", "macs") else " (EdgeTPU P7 -84.2%, S23 GPU -41.1%)"
        print(f"| {key} | {dh / unit:.3f}{suffix} | {dq / unit:.3f}{suffix} | {_pct(dq, dh)} | {paper:+.1f}%{others} |")

    hm = MODEL_SPECS["mnv4_hybrid_medium"]
    tab3 = measure({"with K/V down-sampling": hm, "without": without_kv_downsampling(hm)}, 256, args)
    print("\n## Tab. 3: K/V down-sampling in MNv4-Hybrid-M @256 (stride-16 MQA blocks)\n")
    print("| K/V down-sampling | params (M) | MACs (G) | " + " | ".join(f"{k} ms" for k in lat_keys) + " |")
    print("|---|---|---|" + "---|" * len(lat_keys))
    for k, r in tab3.items():
        lat = " | ".join(f"{r[t]:.2f}" for t in lat_keys if t in r)
        print(f"| {k} | {r['params'] / 1e6:.2f} | {r['macs'] / 1e9:.3f} | {lat} |")
    w, wo = tab3["with K/V down-sampling"], tab3["without"]
    print("\nEfficiency gain of down-sampling (without / with - 1):\n")
    print("| quantity | ours | paper |\n|---|---|---|")
    print(f"| MACs | {_pct(wo['macs'], w['macs'])} | +{PAPER_TAB3['macs']:.0f}% |")
    for key in lat_keys:
        if key in w:
            print(f"| {key} latency | {_pct(wo[key], w[key])} | CPU +{PAPER_TAB3['CPU']:.0f}%, GPU +25% |")


if __name__ == "__main__":
    main()
