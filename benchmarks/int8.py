"""INT8 that keeps accuracy (issue #19): per model and INT8 route, val top-1 of fp32 vs default PTQ vs
tuned PTQ vs QAT, top-1 agreement, and latency against the best fp32 route, side by side in one run.

    python benchmarks/int8.py --data DATA/cifar10-mini --work runs/int8 \
        [--models mnv4_conv_small,mnv4_conv_medium,mnv4_hybrid_medium,mnv4_conv_large] [--res 128] \
        [--epochs 30] [--qat-epochs 3] [--routes onnx,openvino,litert,executorch] [--bf16] \
        [--threads 2] [--runs 200] [--repeats 5] [--rounds 3]

``--data`` holds ``train/`` and ``val/`` (one folder per class). Every stage is cached in ``--work``
(a stage whose output exists is not redone), so an interrupted run continues where it stopped:

1. ``<model>/base``: the recipe: ``mnv4 train --recipe small-photos --model M --input-size RES``.
2. ``<model>/qat``: ``mnv4 train --recipe qat --checkpoint <model>/base/best.safetensors``.
3. ``<model>/<route>_<variant>.<ext>`` (+ ``.parity.json``): ``mnv4 export`` of fp32, default PTQ
   (``ptq``), tuned PTQ (``tuned``: the route's settings in ``TUNED``; routes without PTQ choices
   have no tuned row) and QAT (the QAT checkpoint, default PTQ), calibrated on ``train/``, judged on
   ``val/`` (accuracy and agreement with the float model).
4. ``<model>/timings.json``: every artefact and the fused eager model timed in its own process
   (``mnv4.deploy.bench``'s protocol: fixed threads, batch 1, median of repeats), in ``--rounds``
   interleaved rounds; each figure is the median of its rounds, ``spread`` their range over it.

The table goes to ``--work``/int8.md and .json. Never quote timings from a loaded machine: ``--no-timing``
runs stages 1-3 only (e.g. in the background), and a later run alone on the machine adds stage 4.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import mnv4  # noqa: E402
from mnv4.deploy.formats import FORMATS  # noqa: E402
from mnv4.deploy.parity import parity_path  # noqa: E402
from mnv4.host import cpu_description, int8_support  # noqa: E402
from runtimes import _time_in_child, timing_stamp  # noqa: E402  (one timing worker for the benchmarks)

# Tuned PTQ per route: the settings docs/deploy.md suggests trying first; LiteRT/ExecuTorch offer none.
TUNED = {
    "onnx": {"calibration": "percentile"},
    "openvino": {"bias_correction": "full"},
}


def train_stage(args, model: str, work: Path) -> tuple[str, str]:
    """The base and QAT checkpoints of ``model`` (trained unless cached)."""
    from mnv4.train import resolve_config, train

    common = dict(data=args.data, input_size=args.res, batch_size=args.batch, seed=0)

    def run(name: str, recipe: str, **fields) -> str:
        # Done when summary.json exists (best.safetensors appears after the first epoch already);
        # an interrupted run continues from its last.pt, bit-exactly.
        folder = work / name
        if not (folder / "summary.json").exists():
            cfg = resolve_config(recipe, output=str(folder), **common, **fields)
            last = folder / "last.pt"
            train(cfg, resume=last if last.is_file() else None, progress=False, exist_ok=True)
        return str(folder / "best.safetensors")

    base = run("base", "small-photos", model=model, epochs=args.epochs)
    return base, run("qat", "qat", checkpoint=base, epochs=args.qat_epochs)


def export_stage(args, route: str, variant: str, checkpoint: str, work: Path) -> dict:
    """One artefact and its parity report (read back when cached)."""
    from mnv4.deploy.export import export

    info = FORMATS[route]
    precision = {"fp32": "fp32", "bf16": "bf16"}.get(variant, "int8")
    path = work / f"{route}_{variant}{info.suffix}"
    report_file = parity_path(path)
    if not report_file.exists():
        settings = TUNED.get(route, {}) if variant == "tuned" else {}
        data = Path(args.data)
        try:
            export(
                mnv4.create_model(checkpoint=checkpoint).eval(), route, path, input_size=args.res,
                precision=precision, calib_dir=data / "train", eval_dir=data / "val", samples=args.eval_images,
                calib_samples=args.calib_images, min_top1=0.0, verbose=False, **settings,
            )  # fmt: skip
        except Exception as e:  # a failed route is a row, not the end of the benchmark
            if not report_file.exists():
                return {"route": route, "variant": variant, "error": f"{type(e).__name__}: {e}"[:200]}
    r = json.loads(report_file.read_text())
    row = {"route": route, "variant": variant, "path": str(path), "precision": precision}
    row.update({k: r[k] for k in ("top1_agreement", "accuracy_reference", "accuracy_exported", "ptq", "passed")})
    return row


def time_stage(args, rows: list[dict], base: str, work: Path) -> dict[str, dict]:
    """Median ms of each artefact and of the fused eager model, each timing in its own process (cached).

    The artefacts are timed in ``--rounds`` interleaved rounds (every artefact once per round, the
    order rotated each round) and each one's figure is the median of its rounds: a CPU that drifts
    between states (as ExecuTorch's artefacts did when they ran on two threads beside the other
    routes' one: docs/deploy.md, INT8 "Why earlier runs missed") then moves every artefact alike instead of whichever
    happened to run during the drift; the table prints each artefact's rounds beside the median.
    """
    cache = work / "timings.json"
    timings = json.loads(cache.read_text()) if cache.exists() else {}
    spec = dict(threads=args.threads, res=args.res, runs=args.runs, repeats=args.repeats)
    todo = [("torch-fused", base, "fp32", "torch-fused")] + [
        (r["route"], r["path"], r["precision"], f"{r['route']}_{r['variant']}") for r in rows if "error" not in r
    ]
    # an entry from an older cache (one sequential timing, no rounds), of an artefact written since (its
    # size or modification time differ) or timed under an older protocol is timed again
    stamps = {key: timing_stamp(path) for _, path, _, key in todo}
    for key in [k for k, v in timings.items() if "round_ms" not in v or v.get("stamp") != stamps.get(k)]:
        del timings[key]
    for i in range(args.rounds):
        for fmt, path, precision, key in todo[i % len(todo) :] + todo[: i % len(todo)]:
            entry = timings.setdefault(key, {"round_ms": [], "stamp": stamps[key]})
            if len(entry["round_ms"]) > i:
                continue
            t = _time_in_child({**spec, "format": fmt, "path": path, "precision": precision})
            if "median_ms" not in t:  # a failed timing is reported, not averaged
                timings[key] = {**t, "round_ms": entry["round_ms"] + [None], "stamp": stamps[key]}
                continue
            entry["round_ms"].append(t["median_ms"])
            ok = [m for m in entry["round_ms"] if m is not None]
            entry.update(median_ms=statistics.median(ok), spread=(max(ok) - min(ok)) / statistics.median(ok))
            entry["runs"] = t.get("runs")
            cache.write_text(json.dumps(timings, indent=1))
    return timings


def model_table(args, model: str) -> list[dict]:
    work = Path(args.work) / model
    work.mkdir(parents=True, exist_ok=True)
    base, qat = train_stage(args, model, work)
    rows = []
    for route in args.routes:
        variants = ["fp32", "ptq"] + (["tuned"] if route in TUNED else []) + ["qat"]
        variants += ["bf16"] if args.bf16 and FORMATS[route].bf16 else []
        rows += [export_stage(args, route, v, qat if v == "qat" else base, work) for v in variants]
    timings = {} if args.no_timing else time_stage(args, rows, base, work)
    for r in rows:
        t = timings.get(f"{r['route']}_{r['variant']}", {})
        r["median_ms"], r["round_ms"] = t.get("median_ms"), t.get("round_ms")
    fp32_ms = [
        t["median_ms"] for k, t in timings.items() if (k == "torch-fused" or k.endswith("_fp32")) and "median_ms" in t
    ]
    best_fp32 = min(fp32_ms) if fp32_ms else None
    for r in rows:
        r["model"], r["speedup_vs_best_fp32"] = (
            model,
            (best_fp32 / r["median_ms"]) if best_fp32 and r["median_ms"] else None,
        )
    rows.append({"model": model, "route": "torch-fused", "variant": "fp32", **timings.get("torch-fused", {})})
    return rows


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _rounds(row: dict) -> str:
    return " / ".join("-" if m is None else f"{m:.2f}" for m in row.get("round_ms") or []) or "-"


def write_table(rows: list[dict], out: Path, cpu: str) -> str:
    lines = [
        f"CPU: {cpu}",
        int8_support()[1],
        "",
        "| model | route | variant | val top-1 fp32 | val top-1 | agreement | ms | x best fp32 | ms per round |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['route']} | {r['variant']} | error: {r['error']} ||||||")
            continue
        ms = r.get("median_ms")
        sp = r.get("speedup_vs_best_fp32")
        lines.append(
            f"| {r['model']} | {r['route']} | {r['variant']} | {_pct(r.get('accuracy_reference'))} "
            f"| {_pct(r.get('accuracy_exported'))} | {_pct(r.get('top1_agreement'))} "
            f"| {'-' if ms is None else f'{ms:.2f}'} | {'-' if sp is None else f'{sp:.2f}'} | {_rounds(r)} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "int8.md").write_text(text)
    (out / "int8.json").write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1))
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="image folder with train/ and val/ (one folder per class)")
    ap.add_argument("--work", required=True, help="work folder: every stage is cached there")
    ap.add_argument("--models", default="mnv4_conv_small,mnv4_conv_medium,mnv4_hybrid_medium,mnv4_conv_large")
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--qat-epochs", type=float, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--routes", default=",".join(f.name for f in FORMATS.values() if f.int8))
    ap.add_argument("--bf16", action="store_true", help="also bf16 on the routes that have it")
    ap.add_argument("--eval-images", type=int, default=1000)
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median of rounds)")
    ap.add_argument("--no-timing", action="store_true", help="skip stage 4 (timings need the machine alone)")
    args = ap.parse_args()
    for sub in ("train", "val"):
        if not (Path(args.data) / sub).is_dir():
            ap.error(f"--data {args.data} has no {sub}/ folder")
    args.routes = [r for r in args.routes.split(",") if r]
    unknown = [r for r in args.routes if r not in FORMATS or not FORMATS[r].int8]
    if unknown:
        ap.error(f"no INT8 route named {', '.join(unknown)}")
    rows = []
    for model in [m for m in args.models.split(",") if m]:
        rows += model_table(args, model)
    print(write_table(rows, Path(args.work), cpu_description()))


if __name__ == "__main__":
    main()
