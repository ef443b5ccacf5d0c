"""CPU inference across runtimes: fused vs unfused eager vs timm eager vs ONNX Runtime (and OpenVINO),
this machine's fp32 GEMM peak, and INT8 vs fp32 on real images. Issue #4's targets, in one run.

    python benchmarks/runtimes.py [--models ...] [--threads 2] [--rounds 7] [--iters 20]
        [--checkpoint runs/cifar-mini-conv-small/best.safetensors --data DATA/cifar10-mini]

    # INT8 target on conv_medium (parts 1 and 4 only), with a model trained on the real photos:
    mnv4 train --model mnv4_conv_medium --data DATA/cifar10-mini --recipe quick \
        --input-size 128 --epochs 10 --output runs/cifar-mini-medium-128
    mnv4 train --data DATA/cifar10-mini --recipe finetune --input-size 256 --epochs 3 \
        --checkpoint runs/cifar-mini-medium-128/best.safetensors --output runs/cifar-mini-medium-256
    python benchmarks/runtimes.py --int8-only --int8-res 256 \
        --checkpoint runs/cifar-mini-medium-256/best.safetensors --data DATA/cifar10-mini

1. GEMM peak: a 2048x2048 fp32 matmul in torch and in onnxruntime (median of rounds); the best of the
   two is this machine's fp32 peak (GMAC/s).
2. Eager, batch 1, each model at its native resolution, same weights: timm, mnv4 as built, mnv4
   ``fuse()`` and mnv4 ``optimize_for_cpu()`` (fuse + pre-packed oneDNN convs), timed in alternating
   rounds in this process (medians). ONNX Runtime and OpenVINO fp32 run in their own processes with
   the paper's protocol (``mnv4.deploy.bench``), because idle runtime thread pools spinning on 2
   cores would slow whatever runs next to them.
3. Best fp32 route on conv_medium as a fraction of the GEMM peak (MACs / latency / peak).
4. With ``--checkpoint`` (a model trained on ``--data``, e.g. by ``benchmarks/cifar_mini.py``):
   export fp32 and INT8 (calibrated on ``--data``/train) to every installed route, check top-1
   agreement and accuracy on ``--data``/val (real photos, upscaled to ``--int8-res``), and time every
   artefact in its own process: best INT8 route vs best fp32 route. INT8 is built as ``mnv4 export
   --int8`` builds it: ONNX Runtime and OpenVINO keep the stem conv and the post-pool head float,
   LiteRT and ExecuTorch quantize every layer. ``--int8-only`` skips parts 2 and 3.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMM_FUSED_ATTN", "1")  # timm's fastest attention path

import torch  # noqa: E402

import mnv4  # noqa: E402
from mnv4.deploy import fuse  # noqa: E402
from mnv4.deploy.cpu import optimize_for_cpu  # noqa: E402
from mnv4.models import noise_batches, recalibrate_batchnorm  # noqa: E402
from mnv4.models.registry import MODELS, PUBLISHED  # noqa: E402
from mnv4.perf.latency import alternating_medians  # noqa: E402


def gemm_peak(threads: int, rounds: int, n: int = 2048) -> dict[str, float]:
    """GMAC/s of an n x n x n fp32 matmul: torch, and onnxruntime when installed."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = {"torch": n**3 / (alternating_medians({"mm": lambda x: torch.mm(x, b)}, a, rounds, 5)["mm"] / 1e3) / 1e9}
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return out
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
        [numpy_helper.from_array(b.numpy(), "b")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    an = a.numpy()
    ms = alternating_medians({"ort": lambda x: sess.run(None, {"a": x})}, an, rounds, 5)["ort"]
    out["onnxruntime"] = n**3 / (ms / 1e3) / 1e9
    del onnx
    return out


def eager_table(models: list[str], rounds: int, iters: int) -> dict[str, dict[str, float]]:
    import timm

    results = {}
    for name in models:
        ours = mnv4.create_model(name).eval()
        size = ours.preprocess.input_size
        ref = timm.create_model(MODELS[name].timm_name).eval()
        # Random weights with realistic activations (default BN statistics would time denormals).
        recalibrate_batchnorm(ref, noise_batches(size, batches=2, batch_size=8))
        mnv4.load_weights(ours, ref.state_dict())
        x = torch.randn(1, 3, size, size)
        fused, packed = fuse(ours), optimize_for_cpu(ours)
        with torch.inference_mode():
            want = ref(x)
            for m in (ours, fused, packed):
                diff = float((m(x) - want).abs().max() / want.abs().max())
                assert diff < 1e-4, f"{name}: an mnv4 variant disagrees with timm ({diff:.1e})"
        fns = {"timm": ref, "mnv4": ours, "fused": fused, "fused+packed": packed}
        with torch.inference_mode():
            timed = alternating_medians(fns, x, rounds, iters)
        results[name] = {"res": size, "macs": mnv4.perf.profile(ours, size).macs, **timed}
        print(f"  {name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in timed.items()), flush=True)
    return results


def _bench_rows(models: list[str], runtimes: list[str], precision: str, threads: int, runs: int, repeats: int):
    from mnv4.deploy.bench import available_runtimes, bench

    have = [r for r in runtimes if r in available_runtimes()]
    if not have:
        return []
    return bench(
        models=models, runtimes=have, precisions=(precision,), threads=threads, runs=runs, repeats=repeats, budget_s=3.0
    )


# --- INT8 on real images ---------------------------------------------------------------------------


def _time_worker(spec: dict) -> None:
    """Runs in a child process: time one artefact (or the fused eager model) with the paper's protocol."""
    import numpy as np

    from mnv4.perf.latency import flush_denormals, measure_latency, set_threads

    set_threads(spec["threads"])
    flush_denormals()
    x = torch.randn(1, 3, spec["res"], spec["res"], generator=torch.Generator().manual_seed(0))
    if spec["format"] == "torch-fused":
        model = optimize_for_cpu(mnv4.create_model(checkpoint=spec["path"]).eval())

        def fn():
            with torch.inference_mode():
                model(x)
    else:
        from mnv4.deploy.formats import load_runner

        run = load_runner(spec["path"], spec["format"], threads=spec["threads"], precision=spec["precision"])
        xn = np.ascontiguousarray(x.numpy())

        def fn():
            run(xn)

    lat = measure_latency(fn, runs=spec["runs"], repeats=spec["repeats"], warmup=20, budget_s=3.0)
    print(json.dumps({"median_ms": lat.median_ms, "spread": lat.spread, "runs": lat.runs}), flush=True)


# Bumped when the timing itself changes, so cached timings taken the old way are taken again.
# 2: ExecuTorch's own thread pool sized to --threads (mnv4.deploy.runners); before, .pte files ran on every core.
TIMING_PROTOCOL = 2


def timing_stamp(path: str | Path) -> str:
    """Which file was timed, and how: its size, its modification time and the timing protocol (a rebuilt
    artefact, or one timed under an older protocol, is timed again)."""
    st = Path(path).stat()
    return f"{st.st_size}-{st.st_mtime_ns}-p{TIMING_PROTOCOL}"


def _time_in_child(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run(
        [sys.executable, __file__, "--_time", json.dumps(spec)], capture_output=True, text=True, env=env, timeout=900
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def int8_table(args) -> list[dict]:
    from mnv4.deploy.bench import available_runtimes
    from mnv4.deploy.export import export
    from mnv4.deploy.formats import FORMATS

    model = mnv4.create_model(checkpoint=args.checkpoint).eval()
    data = Path(args.data)
    out_dir = Path(tempfile.mkdtemp(prefix="mnv4-int8-"))
    routes = {f.name: f.runtime for f in FORMATS.values() if f.int8}
    rows = []
    spec = dict(threads=args.threads, res=args.int8_res, runs=args.runs, repeats=args.repeats)
    t = _time_in_child({**spec, "format": "torch-fused", "path": args.checkpoint, "precision": "fp32"})
    rows.append({"route": "torch fused eager", "precision": "fp32", **t})
    for fmt, runtime in routes.items():
        if runtime not in available_runtimes():
            continue
        for precision in ("fp32", "int8"):
            path = out_dir / f"model_{precision}{FORMATS[fmt].suffix}"
            try:
                res = export(
                    model,
                    fmt,
                    path,
                    input_size=args.int8_res,
                    precision=precision,
                    calib_dir=data / "train",
                    eval_dir=data / "val",
                    samples=args.eval_images,
                    calib_samples=args.calib_images,
                    verbose=False,
                )
            except Exception as e:  # a failed route is a row, not the end of the benchmark
                rows.append({"route": fmt, "precision": precision, "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            r = res.report
            t = _time_in_child({**spec, "format": fmt, "path": str(path), "precision": precision})
            rows.append(
                {
                    "route": fmt,
                    "precision": precision,
                    "top1_agreement": r.top1_agreement,
                    "acc": r.accuracy_exported,
                    "acc_ref": r.accuracy_reference,
                    **t,
                }
            )
        done = ", ".join(f"{r['precision']} {r.get('median_ms', float('nan')):.2f} ms" for r in rows[-2:])
        print(f"  {fmt}: {done}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(PUBLISHED))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--runs", type=int, default=200, help="runs per repeat for the per-process measurements")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--runtimes", default="onnxruntime,openvino", help="exported fp32 runtimes for part 2")
    ap.add_argument("--checkpoint", default=None, help="trained checkpoint for the INT8 part (e.g. cifar_mini's)")
    ap.add_argument("--data", default=None, help="labelled image folder with val/ for the INT8 part (--checkpoint)")
    ap.add_argument("--int8-res", type=int, default=224, help="resolution the real images are upscaled to")
    ap.add_argument("--eval-images", type=int, default=1000)
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--min-agreement", type=float, default=0.98, help="INT8 top-1 agreement the target asks for")
    ap.add_argument("--int8-only", action="store_true", help="only the INT8 part (needs --checkpoint)")
    ap.add_argument("--_time", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.checkpoint and not args.data:
        ap.error("--checkpoint needs --data: the labelled image folder (with val/) the model was trained on")
    if args._time:
        return _time_worker(json.loads(args._time))
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random-init hybrids: see mnv4.perf.latency.flush_denormals
    print(f"torch {torch.__version__}, {args.threads} threads, batch 1; {os.cpu_count()} CPUs visible")

    peak = gemm_peak(args.threads, args.rounds)
    best_peak = max(peak.values())
    print("\n## fp32 GEMM 2048x2048x2048\n")
    print("| runtime | GMAC/s |\n|---|---|")
    for k, v in peak.items():
        print(f"| {k} | {v:.1f} |")

    eager: dict[str, dict[str, float]] = {}
    if not args.int8_only:
        print("\n## eager, same weights, alternating rounds\n", flush=True)
        eager = eager_table(args.models, args.rounds, args.iters)
        rows = _bench_rows(args.models, args.runtimes.split(","), "fp32", args.threads, args.runs, args.repeats)
        exported = {(r.model, r.runtime): r.median_ms for r in rows if not r.error}
        rt_names = sorted({r.runtime for r in rows})
        head = ["model", "res", "timm ms", "mnv4 ms", "fused ms", "fused+packed ms", *[f"{r} ms" for r in rt_names]]
        head += ["mnv4/timm", "fused/timm", "fused+packed/timm", *[f"{r}/timm" for r in rt_names]]
        print("\n| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
        for name, e in eager.items():
            ext = [exported.get((name, r), float("nan")) for r in rt_names]
            cells = [name, str(e["res"])] + [f"{v:.2f}" for v in (e["timm"], e["mnv4"], e["fused"], e["fused+packed"])]
            cells += [f"{v:.2f}" for v in ext]
            cells += [f"{e[k] / e['timm']:.3f}" for k in ("mnv4", "fused", "fused+packed")]
            cells += [f"{v / e['timm']:.3f}" for v in ext]
            print("| " + " | ".join(cells) + " |")
        for r in rows:
            if r.error:
                print(f"(failed: {r.model} {r.runtime}: {r.error})")

    if "mnv4_conv_medium" in eager:
        e = eager["mnv4_conv_medium"]
        cands = {"torch fused+packed": e["fused+packed"], "torch fused": e["fused"]}
        cands.update({r: exported[("mnv4_conv_medium", r)] for r in rt_names if ("mnv4_conv_medium", r) in exported})
        best = min(cands, key=cands.get)
        rate = e["macs"] / (cands[best] / 1e3) / 1e9
        print(
            f"\nbest fp32 route on mnv4_conv_medium: {best} {cands[best]:.2f} ms = {rate:.1f} GMAC/s = "
            f"{rate / best_peak:.0%} of the GEMM peak {best_peak:.1f} GMAC/s"
        )

    if args.checkpoint:
        print(f"\n## INT8 vs fp32: {args.checkpoint} on {args.data}/val upscaled to {args.int8_res} px\n", flush=True)
        rows8 = int8_table(args)
        print("\n| route | precision | ms | top-1 agreement with eager fp32 | val top-1 (eager fp32) |")
        print("|---|---|---|---|---|")
        for r in rows8:
            if "error" in r:
                print(f"| {r['route']} | {r['precision']} | failed: {r['error']} | | |")
                continue
            agree = f"{r['top1_agreement']:.2%}" if r.get("top1_agreement") is not None else "-"
            acc = f"{r['acc']:.2%} ({r['acc_ref']:.2%})" if r.get("acc") is not None else "-"
            print(f"| {r['route']} | {r['precision']} | {r['median_ms']:.2f} | {agree} | {acc} |")
        ok = [r for r in rows8 if "median_ms" in r]
        fp32 = min((r for r in ok if r["precision"] == "fp32"), key=lambda r: r["median_ms"], default=None)
        int8s = [r for r in ok if r["precision"] == "int8"]
        faithful = [r for r in int8s if (r.get("top1_agreement") or 0) >= args.min_agreement]
        shown = None
        for label, pool in (("fastest INT8 route", int8s), (f">= {args.min_agreement:.0%} agreement", faithful)):
            int8 = min(pool, key=lambda r: r["median_ms"], default=None)
            if int8 is not None and int8 is shown:
                continue  # the fastest route already meets the agreement bar
            shown = int8
            if fp32 is None or int8 is None:
                print(f"\n{label}: none")
                continue
            speedup = fp32["median_ms"] / int8["median_ms"]
            verdict = "met" if speedup >= 2 and int8 in faithful else "missed"
            print(
                f"\n{label}: {int8['route']} {int8['median_ms']:.2f} ms vs best fp32 route {fp32['route']} "
                f"{fp32['median_ms']:.2f} ms: {speedup:.2f}x faster, top-1 agreement {int8['top1_agreement']:.2%}"
                f" (target >= 2x with >= {args.min_agreement:.0%}: {verdict})"
            )


if __name__ == "__main__":
    main()
