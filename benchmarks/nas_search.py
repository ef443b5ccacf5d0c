"""NAS at CPU scale: does the two-stage TuNAS search find a better model than chance at the cost of
mnv4_conv_small? (docs/nas.md, "Measured")

On cifar10-mini (5,000 train / 1,000 val 32 px JPEGs) at 32 px, with the target T0 = the cost of
mnv4_conv_small on the chosen cost model (default ``--hardware local``: the latency table measured
on this machine):

1. the latency table (local only): built once, its prediction checked against whole-model latency;
2. a two-stage search and a one-stage search with the same budget (``--search-epochs``);
3. ``--random`` architectures drawn uniformly from the same space, kept when within +-10% of T0;
4. every found and random architecture trained standalone with the same recipe and budget
   (``--train-epochs``, the cifar_mini.py recipe), val top-1 on the 1,000 val images;
5. the rank of the searched model among the random ones; two-stage vs one-stage; the found
   models' cost against T0 (and, for local, their measured latency); Kendall tau between
   super-network accuracy (BN recalibrated, on the val images) and standalone accuracy.

Every finished piece is cached in OUTPUT/results.json (searches resume from their folders), so a
rerun skips done work. Runs on one thread by default (2 shared cores: two OpenMP threads fighting
other processes are far slower than one)::

    nice -n 10 python benchmarks/nas_search.py [--hardware local] [--search-epochs 10] [--train-epochs 10]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mnv4.data.datasets import load_data  # noqa: E402
from mnv4.data.transforms import eval_transform  # noqa: E402
from mnv4.files import atomic_write_json  # noqa: E402
from mnv4.host import cpu_description  # noqa: E402
from mnv4.models.registry import Preprocess, get_entry  # noqa: E402
from mnv4.nas import get_space, spec_from_string  # noqa: E402
from mnv4.nas.cost import LatencyTable, get_cost_model  # noqa: E402
from mnv4.nas.run import search  # noqa: E402
from mnv4.nas.search import HeldOutSet, SearchConfig, SearchStopped, subnet_accuracy  # noqa: E402
from mnv4.nas.supernet import SuperNet  # noqa: E402
from mnv4.train import resolve_config  # noqa: E402
from mnv4.train.trainer import train  # noqa: E402


class Cache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        atomic_write_json(self.path, self.data)


def run_search(args, name: str, one_stage: bool, out: Path, cache: Cache, distill: tuple[str, ...] = ()) -> dict:
    key = f"search:{name}"
    if cache.get(key):
        return cache.get(key)
    folder = out / f"search-{name}"
    epochs = args.search_epochs
    if distill:  # the same number of steps as the hard-label searches: an epoch is all the soft-label records
        from mnv4.distill import SoftLabelSet

        records = sum(len(SoftLabelSet(d)) for d in distill)
        epochs = args.search_epochs * (1 - 0.2) * len(load_data(args.data).train) / records
    cfg = SearchConfig(
        data=args.data,
        output=str(folder),
        space=args.space,
        hardware=args.hardware,
        target_like="mnv4_conv_small",
        resolution=args.input_size,
        epochs=epochs,
        one_stage=one_stage,
        distill=tuple(distill),
        mix=args.mix if distill else None,
        batch_size=64,
        lr=2e-3,
        reward_batch=128,
        eval_subnets=8,
        seed=args.seed,
        threads=args.threads,
        latency_table=str(out / "latency-table.json") if args.hardware == "local" else None,
        save_every_steps=100,
    )
    resume = (folder / "last.pt").exists() and not (folder / "report.json").exists()
    result = search(cfg, resume=resume, progress=False)
    if isinstance(result, SearchStopped):  # Ctrl-C / SIGTERM: the search saved last.pt; rerun to continue
        raise SystemExit(f"stopped during the {name} search ({result.stop_reason}); rerun the same command")
    r = result.report
    row = {
        "compact": r["compact"],
        "cost": r["cost"],
        "target": r["target"],
        "cost_error": r["cost_error"],
        "projected": r["pick"]["projected"],
        "argmax": r["pick"]["argmax"],
        "wall_seconds": r["wall_seconds"],
        "measured_here_ms": r["measured_here_ms"],
        "folder": str(folder),
    }
    cache.put(key, row)
    return row


def train_standalone(args, compact: str, data, out: Path, cache: Cache) -> dict:
    key = f"train:{args.train_epochs}:{compact}"
    if cache.get(key):
        return cache.get(key)
    spec = spec_from_string(compact, name="candidate")
    folder = out / "standalone" / hashlib.sha1(compact.encode()).hexdigest()[:12]
    cfg = resolve_config(
        "small-photos",
        model=spec.to_dict(),
        data=args.data,
        epochs=args.train_epochs,
        input_size=args.input_size,
        output=str(folder),
        seed=args.seed,
        warmup_epochs=1,
    )
    t0 = time.perf_counter()
    res = train(cfg, data=data, progress=False, log=lambda m: None, exist_ok=True)
    row = {
        "val_top1_final": res.summary["val_top1_final"],
        "val_top1_best": res.summary["val_top1"],
        "wall_seconds": time.perf_counter() - t0,
    }
    cache.put(key, row)
    print(f"  trained {compact}: final val top-1 {row['val_top1_final']:.2f}% in {row['wall_seconds']:.0f} s")
    return row


def supernet_accuracies(search_row: dict, archs: list[str], data, args, space) -> dict[str, float]:
    """Held-out accuracy of each architecture inside a searched super-network (BN recalibrated)."""
    from safetensors.torch import load_file

    net = SuperNet(space, len(data.class_names))
    net.load_state_dict(load_file(str(Path(search_row["folder"]) / "supernet.safetensors")))
    pp = Preprocess(input_size=args.input_size, crop_pct=1.0, interpolation="bilinear")
    tf = eval_transform(pp)
    calib = HeldOutSet(torch.utils.data.Subset(data.train, range(min(256, len(data.train)))), tf)
    val = HeldOutSet(data.val, tf)
    return {c: subnet_accuracy(net, space.from_string(c), calib, val, 64)[0] for c in archs}


def measure_found(args, found: dict[str, dict], conv_small, nc: int, rounds: int = 7) -> dict:
    """Batch-1 latency of the found models and mnv4_conv_small, interleaved (perf.alternating_rounds):
    every round times each model once, in a rotated order, on the table's clock (thread CPU time), then
    again on the wall clock; the medians over rounds are reported, so a burst of load hits every model alike."""
    from mnv4.models.mobilenetv4 import MobileNetV4
    from mnv4.perf.latency import alternating_rounds, flush_denormals

    flush_denormals()
    torch.manual_seed(0)
    models = {"mnv4_conv_small": MobileNetV4(conv_small, num_classes=nc).eval()}
    for name, row in found.items():
        models[name] = MobileNetV4(spec_from_string(row["compact"]), num_classes=nc).eval()
    x = torch.randn(1, 3, args.input_size, args.input_size)
    with torch.inference_mode():
        cpu = alternating_rounds(models, x, rounds, iters=100, clock="thread")
        wall = alternating_rounds(models, x, rounds, iters=100, clock="wall")
    return {
        "cpu_ms": {k: statistics.median(v) for k, v in cpu.items()},
        "wall_ms": {k: statistics.median(v) for k, v in wall.items()},
        "rounds": rounds,
    }


def kendall(a: list[float], b: list[float]) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the cifar10-mini image folder (train/ and val/)")
    ap.add_argument("--hardware", default="local", help="local | macs | pixel6_cpu | pixel8_edgetpu | ... | FILE")
    ap.add_argument("--space", default="s")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--search-epochs", type=float, default=10)
    ap.add_argument("--train-epochs", type=float, default=10)
    ap.add_argument("--random", type=int, default=8, help="random architectures within +-10%% of the target")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="runs/nas-bench")
    ap.add_argument(
        "--distill",
        action="append",
        default=[],
        metavar="DIR",
        help="soft-label dataset(s) of the data's images (mnv4 distill label): adds a two-stage search on them",
    )
    ap.add_argument("--mix", default=None, help="mixing ratio of the --distill datasets (e.g. 1:1:2)")
    args = ap.parse_args()
    args.data = os.path.normpath(args.data)
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cache = Cache(out / "results.json")
    space = get_space(args.space)
    data = load_data(args.data)
    nc = len(data.class_names)
    t_all = time.perf_counter()
    print(f"{cpu_description()}, {args.threads} thread(s); {data.name}: {len(data.train)} train / {len(data.val)} val")

    # 1. the cost model and the target
    table_path = out / "latency-table.json"
    cm = get_cost_model(args.hardware, args.input_size, nc, "ms", table_path, args.threads)
    conv_small = get_entry("mnv4_conv_small").spec
    if isinstance(cm, LatencyTable):
        if not cache.get("table"):
            t0 = time.perf_counter()
            n = cm.build(space, progress=False)
            rng = random.Random(args.seed + 7)
            probes = [space.to_spec(space.sample(rng), f"probe{i}") for i in range(5)]
            fit = cm.fit_overhead(probes)
            held = [space.to_spec(space.sample(rng), f"check{i}") for i in range(6)] + [conv_small]
            check = cm.check(held)
            cache.put(
                "table",
                {"segments": len(cm), "measured": n, "seconds": time.perf_counter() - t0, "fit": fit, "check": check},
            )
        cm = get_cost_model(args.hardware, args.input_size, nc, "ms", table_path, args.threads)
    target = cm.cost(conv_small)
    print(f"cost model {cm.describe()}: T0 = cost of mnv4_conv_small = {target:.4g} {cm.unit}")

    # 2. searches
    two = run_search(args, "two_stage", False, out, cache)
    one = run_search(args, "one_stage", True, out, cache)
    soft = run_search(args, "soft_labels", False, out, cache, tuple(args.distill)) if args.distill else None
    searches = [("two_stage", two), ("one_stage", one)] + ([("soft_labels", soft)] if soft else [])

    # 3. random architectures within +-10% of T0
    if not cache.get("random"):
        rng = random.Random(args.seed + 1)
        picked, tries = [], 0
        while len(picked) < args.random and tries < 20000:
            tries += 1
            arch = space.sample(rng)
            c = cm.cost(space.to_spec(arch))
            text = space.to_string(arch)
            if abs(c / target - 1) <= 0.10 and text not in {p["compact"] for p in picked}:
                picked.append({"compact": text, "cost": c})
        cache.put("random", {"archs": picked, "tries": tries})
    randoms = cache.get("random")["archs"]

    # 4. standalone training
    found = [row["compact"] for _, row in searches]
    print(f"training {len(found) + len(randoms)} architectures standalone for {args.train_epochs:g} epochs each")
    acc = {}
    for c in found + [r["compact"] for r in randoms]:
        acc[c] = train_standalone(args, c, data, out, cache)["val_top1_final"]

    # 5. super-network accuracy vs standalone accuracy
    sampled = list(dict.fromkeys([r["compact"] for r in randoms] + found))
    taus = {}
    for name, row in searches:
        key = f"supernet_acc:{name}"
        if not cache.get(key) or set(sampled) - set(cache.get(key)):  # a later run may add the soft-label arm
            cache.put(key, supernet_accuracies(row, sampled, data, args, space))
        sn = cache.get(key)
        taus[name] = kendall([sn[c] for c in sampled], [acc[c] for c in sampled])

    # 6. latency of the found models measured here, interleaved with mnv4_conv_small
    lat = None
    if args.hardware == "local":
        if not cache.get("latency"):
            cache.put("latency", measure_found(args, {"two_stage": two, "one_stage": one}, conv_small, nc))
        lat = cache.get("latency")

    # report
    rand_acc = sorted(acc[r["compact"]] for r in randoms)
    if not rand_acc:
        raise SystemExit(f"no random architecture of {space.name} within +-10% of T0; widen the space")
    median = statistics.median(rand_acc)
    rank = 1 + sum(a > acc[two["compact"]] for a in rand_acc)
    print()
    print(f"{'architecture':<100} {'kind':<10} {'cost':>8} {'top-1':>7} {'SN-2st':>7} {'SN-1st':>7}")
    sn2, sn1 = cache.get("supernet_acc:two_stage"), cache.get("supernet_acc:one_stage")
    rows = [("two-stage", two["compact"], two["cost"]), ("one-stage", one["compact"], one["cost"])]
    rows += [("soft", soft["compact"], soft["cost"])] if soft else []
    rows += [("random", r["compact"], r["cost"]) for r in randoms]
    for kind, c, cost in rows:
        print(f"{c:<100} {kind:<10} {cost:>8.4g} {acc[c]:>7.2f} {sn2[c]:>7.2f} {sn1[c]:>7.2f}")
    print()
    print(f"CPU: {cpu_description()}, {args.threads} thread(s); cost model {cm.describe()}, T0 {target:.4g} {cm.unit}")
    if cache.get("table"):
        t = cache.get("table")
        errs = [abs(r["error"]) for r in t["check"]]
        print(
            f"latency table: {t['segments']} segments ({t['seconds'] / 60:.1f} min to build), per-call overhead "
            f"{t['fit']['overhead_ms']:.3f} ms; prediction vs whole-model latency on {len(errs)} held-out models: "
            f"mean |error| {100 * statistics.mean(errs):.1f}%, max {100 * max(errs):.1f}%"
        )
    print(
        f"searched (two-stage) val top-1 {acc[two['compact']]:.2f}% vs random median {median:.2f}% "
        f"(n={len(rand_acc)}, range {rand_acc[0]:.2f}-{rand_acc[-1]:.2f}): rank {rank} of {len(rand_acc) + 1} -> "
        f"{'BEATS' if acc[two['compact']] > median else 'DOES NOT BEAT'} the random median"
    )
    print(
        f"two-stage {acc[two['compact']]:.2f}% vs one-stage {acc[one['compact']]:.2f}% at equal search budget "
        f"({args.search_epochs:g} super-network epochs each)"
    )
    for name, row in (("two-stage", two), ("one-stage", one)):
        ok = abs(row["cost_error"]) <= 0.10
        print(
            f"{name} found cost {row['cost']:.4g} {cm.unit} = {100 * row['cost_error']:+.1f}% of T0 "
            f"({'within' if ok else 'OUTSIDE'} +-10%)"
            + (" [moved into the band from the argmax]" if row["projected"] else "")
        )
    if lat is not None:
        cpu, wall = lat["cpu_ms"], lat["wall_ms"]
        for name in ("two_stage", "one_stage"):
            e0 = cpu[name] / target - 1
            e1 = cpu[name] / cpu["mnv4_conv_small"] - 1
            e2 = wall[name] / wall["mnv4_conv_small"] - 1
            verdict = "within" if abs(e0) <= 0.15 else "OUTSIDE"
            print(
                f"{name} measured {cpu[name]:.3f} ms (the table's clock): {100 * e0:+.1f}% of T0 ({verdict} +-15%); "
                f"{100 * e1:+.1f}% of mnv4_conv_small measured alongside ({cpu['mnv4_conv_small']:.3f} ms), "
                f"{100 * e2:+.1f}% on the wall clock ({wall[name]:.3f} vs {wall['mnv4_conv_small']:.3f} ms)"
            )
    print(
        f"Kendall tau (super-network vs standalone accuracy, {len(sampled)} models): two-stage super-network "
        f"{taus['two_stage']:+.2f}, one-stage super-network {taus['one_stage']:+.2f}"
        + (f", soft-label super-network {taus['soft_labels']:+.2f}" if soft else "")
    )
    if soft:
        print(
            f"soft-label search ({', '.join(args.distill)}, mix {args.mix or 'equal'}): found "
            f"{acc[soft['compact']]:.2f}% standalone vs two-stage on hard labels {acc[two['compact']]:.2f}%; "
            f"cost {100 * soft['cost_error']:+.1f}% of T0; {soft['wall_seconds'] / 60:.1f} min"
        )
    print(
        f"search wall time: two-stage {two['wall_seconds'] / 60:.1f} min, one-stage "
        f"{one['wall_seconds'] / 60:.1f} min; this invocation {(time.perf_counter() - t_all) / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
