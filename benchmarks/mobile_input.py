"""Does a mobile-ready input move INT8's speed-up? (docs/deploy.md, "Mobile-ready input as the factor")

One trained checkpoint exported to the pt2e routes (ExecuTorch, LiteRT) in fp32 and INT8, each with the
default input (NCHW float32, normalised by the caller) and with the camera's input (NHWC uint8, the
normalisation inside the graph: ``mnv4 export --input-layout nhwc --input-dtype uint8``). Every export
passes its parity check on ``--data``/val (calibrated on ``--data``/train); every artefact is then timed
in its own process, batch 1, in ``--rounds`` interleaved rounds (the order rotated; the median of the
rounds is the figure, each round's median printed beside it), with the input of its own format.

    python benchmarks/mobile_input.py --checkpoint runs/int8/mnv4_conv_small/base/best.safetensors \\
        --data DATA/cifar10-mini --work runs/mobile-input [--res 128] [--threads 1] [--rounds 3]

Artefacts and timings are cached in ``--work`` (``timings.json``); time alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from runtimes import timing_stamp  # noqa: E402  (the benchmarks' one timing cache stamp)

INPUTS = (("nchw", "float32"), ("nhwc", "uint8"))
SUFFIX = {"executorch": ".pte", "litert": ".tflite"}


def variants(routes: list[str]) -> list[tuple[str, str, str, str]]:
    return [(r, p, lay, dt) for r in routes for p in ("fp32", "int8") for lay, dt in INPUTS]


def artefact(work: Path, v: tuple[str, str, str, str]) -> Path:
    return work / f"{v[0]}_{v[1]}_{v[2]}_{v[3]}{SUFFIX[v[0]]}"


def export_stage(args, work: Path) -> dict[str, dict]:
    import mnv4
    from mnv4.deploy.export import export
    from mnv4.deploy.parity import parity_path

    data = Path(args.data)
    reports = {}
    for v in variants(args.routes):
        path = artefact(work, v)
        if not parity_path(path).exists():
            export(
                mnv4.create_model(checkpoint=args.checkpoint).eval(), v[0], path, input_size=args.res,
                precision=v[1], input_layout=v[2], input_dtype=v[3], calib_dir=data / "train",
                eval_dir=data / "val", samples=args.eval_images, calib_samples=args.calib_images, verbose=False,
            )  # fmt: skip
        reports[path.name] = json.loads(parity_path(path).read_text())
    return reports


def _worker(spec: dict) -> None:
    """Child process: time one artefact on an input of its own format."""
    import numpy as np

    from mnv4.deploy.formats import load_runner
    from mnv4.perf.latency import flush_denormals, measure_latency, set_threads

    set_threads(spec["threads"])
    flush_denormals()
    route, precision, layout, dtype = spec["variant"]
    res = spec["res"]
    shape = (1, res, res, 3) if layout == "nhwc" else (1, 3, res, res)
    rng = np.random.default_rng(0)
    if dtype == "uint8":
        x = rng.integers(0, 256, shape, dtype=np.uint8)
    else:
        x = rng.standard_normal(shape, dtype=np.float32)
    run = load_runner(spec["path"], route, threads=spec["threads"], precision=precision)
    lat = measure_latency(lambda: run(x), runs=1000, repeats=5, warmup=20, budget_s=3.0)
    print(json.dumps({"median_ms": lat.median_ms}), flush=True)


def time_stage(args, work: Path) -> dict[str, list]:
    cache = work / "timings.json"
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    todo = variants(args.routes)
    stamps = {artefact(work, v).name: timing_stamp(artefact(work, v)) for v in todo}
    entries = {k: e for k, e in cached.items() if isinstance(e, dict) and e.get("stamp") == stamps.get(k)}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for i in range(args.rounds):
        for v in todo[i % len(todo) :] + todo[: i % len(todo)]:
            name = artefact(work, v).name
            rounds = entries.setdefault(name, {"stamp": stamps[name], "round_ms": []})["round_ms"]
            if len(rounds) > i:
                continue
            spec = {"variant": v, "path": str(artefact(work, v)), "res": args.res, "threads": args.threads}
            proc = subprocess.run(
                [sys.executable, __file__, "--_time", json.dumps(spec)], capture_output=True, text=True, env=env
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            rounds.append(json.loads(lines[-1])["median_ms"] if lines else None)
            if not lines:
                print(f"{name}: timing failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
            cache.write_text(json.dumps(entries, indent=1))
    return {k: e["round_ms"] for k, e in entries.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--_time", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help="an mnv4 checkpoint trained on --data's classes")
    ap.add_argument("--data", help="image folder with train/ (calibration) and val/ (parity, accuracy)")
    ap.add_argument("--work", default="runs/mobile-input")
    ap.add_argument("--routes", default="executorch,litert")
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eval-images", type=int, default=300)
    ap.add_argument("--calib-images", type=int, default=256)
    args = ap.parse_args()
    if args._time:
        _worker(json.loads(args._time))
        return
    if not args.checkpoint or not Path(args.checkpoint).is_file():
        raise SystemExit(f"--checkpoint {args.checkpoint}: no such file (an mnv4 train checkpoint)")
    if not args.data or not (Path(args.data) / "val").is_dir():
        raise SystemExit(f"--data {args.data}: needs train/ and val/ image folders")
    args.routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if not args.routes or set(args.routes) - set(SUFFIX):
        raise SystemExit(f"--routes takes a subset of {', '.join(SUFFIX)}, got {args.routes}")
    if args.rounds < 1 or args.threads < 1 or args.res < 32:
        raise SystemExit("--rounds and --threads must be >= 1 and --res >= 32")
    from mnv4.host import cpu_description

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    reports = export_stage(args, work)
    timings = time_stage(args, work)
    print(f"CPU: {cpu_description()}, {args.threads} thread(s), {args.res} px, {args.rounds} rounds")
    print("| artefact | agreement | val top-1 | median ms | ms per round |")
    print("|---|---|---|---|---|")
    for v in variants(args.routes):
        name = artefact(work, v).name
        r, rounds = reports[name], timings.get(name, [])
        ok = [m for m in rounds if m is not None]
        med = f"{statistics.median(ok):.3f}" if ok else "-"
        per = " / ".join("-" if m is None else f"{m:.3f}" for m in rounds)
        acc = r.get("accuracy_exported")
        acc = "-" if acc is None else f"{100 * acc:.1f}%"
        print(f"| {name} | {100 * r['top1_agreement']:.1f}% | {acc} | {med} | {per} |")


if __name__ == "__main__":
    main()
