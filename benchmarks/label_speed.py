"""Labelling at speed (issue #18 part 2): `mnv4 distill label` images/s, today's slow path vs the fast path.

Every configuration labels the same ``--n`` source images (the first of each class of ``--data`` in turn)
with the same teacher, policy, record size, shard size and thread count, through the library's
``mnv4.distill.label(LabelConfig(...))``, each run in a fresh process, the configurations alternated
across ``--rounds`` rounds (medians reported). The contenders (``--configs``, ``ENGINE:WORKERS:BATCH``):

* ``eager:0:64``: today's path (eager PyTorch, channels_last as the teacher always runs, records made
  in the labelling process, batches of 64) and the reference of every ratio and parity figure;
* ``eager:0:B``, ``eager:1:64``, ``auto:0:64``: one change at a time (``B`` the command's default batch
  size, sized for the cache; records made in a worker process while the teacher runs; the teacher on the
  fastest route that passes the parity check), and ``auto:1:64``: all but the batch size;
* ``auto:1:B``: the fast path, the command's defaults.

Images/s count labelling only: the one-off export and parity check of ``auto`` are reported apart (the
command prints them), and the teacher top-1 check is off (``check_images`` 0). Parity against
``eager:0:64``: the largest |difference| of the stored probabilities (float16) over every record, and
whether the records (keys, JPEG bytes, provenance) are identical.

Without ``--teacher`` the teacher is the ImageNet EfficientNet-Lite0 (extra ``teachers``) with a new
seeded random head for ``--data``'s classes at ``--teacher-size`` px, saved as a teacher file: the
arithmetic of the fine-tuned teacher of docs/distillation.md, whose weights only change the numbers.

    OMP_NUM_THREADS=1 python benchmarks/label_speed.py --data DATA/cifar10-mini/train [--n 1000] \\
        [--teacher FILE] [--rounds 3] [--threads 1] [--configs eager:0:64,auto:1:16]

Everything is written to a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REFERENCE = "eager:0:64"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def default_configs() -> list[str]:
    from mnv4.distill.requests import LABEL_COMMAND

    fast = f"auto:{max(LABEL_COMMAND.workers, 1)}:{LABEL_COMMAND.batch_size}"
    configs = [REFERENCE, f"eager:0:{LABEL_COMMAND.batch_size}", "eager:1:64", "auto:0:64", "auto:1:64", fast]
    return list(dict.fromkeys(configs))  # the fast path may be one of the steps already


def parse_config(text: str) -> tuple[str, int, int]:
    engine, workers, batch = text.split(":")
    return engine, int(workers), int(batch)


# ------------------------------------------------------------------------------------------------ setup
def subset(data: Path, n: int, out: Path) -> Path:
    """``out`` holding links to ``n`` images of ``data``: the first of each class folder in turn (class
    folders kept, so the records carry labels), or the first ``n`` of a flat folder."""
    classes = sorted(p for p in data.iterdir() if p.is_dir())
    pools = [sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for c in classes] or [
        sorted(f for f in data.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    ]
    chosen: list[tuple[str, Path]] = []
    for k in range(max(len(p) for p in pools)):
        for c, pool in enumerate(pools):
            if k < len(pool) and len(chosen) < n:
                chosen.append((classes[c].name if classes else "", pool[k]))
    if len(chosen) < n:
        sys.exit(f"label_speed.py: error: {data} holds {len(chosen)} images; --n asks for {n}")
    for cls, f in chosen:
        link = out / cls / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f.resolve())
    return out


def make_teacher(path: Path, size: int, class_names: list[str], seed: int = 0) -> Path:
    """EfficientNet-Lite0 (ImageNet features) with a seeded random head for ``class_names``, as a teacher file."""
    import torch

    from mnv4.distill.teachers import load_teacher, save_teacher

    base = load_teacher("efficientnet-lite0", input_size=size)
    net = base.model.to(memory_format=torch.contiguous_format)
    torch.manual_seed(seed)
    net._fc = torch.nn.Linear(net._fc.in_features, len(class_names))
    return save_teacher(net, path, "efficientnet-lite", "efficientnet-lite0", base.preprocess, class_names)


# ---------------------------------------------------------------------------------------------- one run
def run_one(spec: dict) -> dict:
    """One labelling run in this process (the child side); what it measured."""
    import torch

    torch.set_num_threads(spec["threads"])
    from mnv4.distill.labelling import LabelConfig, label

    engine, workers, batch = parse_config(spec["config"])
    said: list[str] = []
    start: list[tuple[float, float]] = []

    def log(line: str) -> None:
        said.append(line)
        if line.startswith("labelling "):  # said once the teacher is ready, just before the first record
            start.append((_cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)))

    cfg = LabelConfig(
        teacher=spec["teacher"],
        data=spec["data"],
        out=spec["out"],
        aug=spec["aug"],
        record_size=spec["record_size"],
        shard_size=spec["shard_size"],
        batch_size=batch,
        workers=workers,
        engine=engine,
        check_images=0,
        device="cpu",
    )
    res = label(cfg, progress=False, log=log)
    # the workers are joined when the loader is exhausted, so their CPU time is the children's by now
    main, children = _cpu(resource.RUSAGE_SELF) - start[0][0], _cpu(resource.RUSAGE_CHILDREN) - start[0][1]
    export = [line for line in said if line.startswith("teacher runs on") or line.startswith("teacher engine")]
    return {
        "images_per_s": res.records_this_run / res.seconds_this_run,
        "records": res.records_this_run,
        "cpu_ms_main": 1e3 * main / res.records_this_run,
        "cpu_ms_workers": 1e3 * children / res.records_this_run,
        "engine": res.manifest["teacher"].get("engine", "eager"),
        "export": export,
    }


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def spawn(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"label_speed.py: error: {spec['config']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- parity
def parity(reference: Path, other: Path) -> tuple[float, bool]:
    """(max |p_other - p_reference| over every stored probability, whether the records are identical)."""
    import numpy as np

    from mnv4.distill.shards import ShardIndex, decode_probs

    num_classes = json.loads((reference / "manifest.json").read_text())["num_classes"]
    a = ShardIndex(sorted(reference.glob("shard-*.tar")))
    b = ShardIndex(sorted(other.glob("shard-*.tar")))
    if a.keys != b.keys:
        return float("nan"), False
    worst, same = 0.0, True
    for i in range(len(a)):
        same = same and a.jpeg(i) == b.jpeg(i) and a.meta(i) == b.meta(i)
        diff = np.abs(decode_probs(a.probs(i), num_classes) - decode_probs(b.probs(i), num_classes))
        worst = max(worst, float(diff.max()))
    return worst, same


# ------------------------------------------------------------------------------------------------- main
def measure(args, configs: list[str], base: dict, tmp: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(args.rounds):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]  # no configuration always goes first
        for c in order:
            out = tmp / "out" / c.replace(":", "-")
            if out.exists():  # keep only the latest run of each configuration
                import shutil

                shutil.rmtree(out)
            got = spawn({**base, "config": c, "out": str(out)})
            runs[c].append(got)
            print(f"round {r + 1}: {c:<12} {got['images_per_s']:7.1f} img/s ({got['engine']})", flush=True)
    return runs


def report(args, configs: list[str], runs: dict[str, list[dict]], tmp: Path) -> None:
    import torch

    from mnv4.host import cpu_description

    def median(c: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[c])

    ref, ref_bound = median(REFERENCE, "images_per_s"), 1e3 / median(REFERENCE, "cpu_ms_main")
    print(
        f"\n{cpu_description()}, torch {torch.__version__}, {args.threads} thread(s) per process; {args.n} images of "
        f"{args.data}, teacher at {args.teacher_size} px, records {args.record_size} px, aug {args.aug}; "
        f"median of {args.rounds} rounds"
    )
    print(
        f"{'engine:workers:batch':<22}{'route':<10}{'img/s':>7}{'ratio':>7}{'CPU ms/img':>12}{'workers':>9}"
        f"{'bound':>8}{'ratio':>7}{'max |dp|':>10}  records"
    )
    for c in configs:
        rate, main, workers = median(c, "images_per_s"), median(c, "cpu_ms_main"), median(c, "cpu_ms_workers")
        bound = 1e3 / max(main, workers / max(parse_config(c)[1], 1))
        worst, same = parity(tmp / "out" / REFERENCE.replace(":", "-"), tmp / "out" / c.replace(":", "-"))
        print(
            f"{c:<22}{runs[c][-1]['engine']:<10}{rate:7.1f}{rate / ref:6.2f}x{main:12.2f}{workers:9.2f}"
            f"{bound:8.1f}{bound / ref_bound:6.2f}x{worst:10.1e}  {'identical' if same else 'DIFFER'}"
        )
    print(
        "ratio: to " + REFERENCE + "; CPU ms/img: the labelling process's CPU time per record, and its workers'; "
        "bound: the img/s those CPU times allow when every process has a core to itself (what a quiet machine "
        "approaches; the measured img/s is what this one gave)"
    )
    for line in {line for c in configs for r in runs[c] for line in r["export"]}:
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="image folder (class sub-folders or flat), e.g. DATA/cifar10-mini/train")
    ap.add_argument("--n", type=int, default=1000, help="images labelled by every configuration")
    ap.add_argument("--teacher", default=None, help="teacher file (default: Lite0 + a random head, see above)")
    ap.add_argument("--teacher-size", type=int, default=128, help="resolution of the default teacher")
    ap.add_argument("--record-size", type=int, default=64)
    ap.add_argument("--aug", default="inception-randaug-l2m9")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="torch / runtime threads of each labelling process")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", default=None, help=f"comma-separated ENGINE:WORKERS:BATCH (with {REFERENCE})")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child side
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    if not args.data:
        ap.error("--data is required")
    configs = args.configs.split(",") if args.configs else default_configs()
    if REFERENCE not in configs:
        configs.insert(0, REFERENCE)
    for c in configs:
        parse_config(c)
    with tempfile.TemporaryDirectory(prefix="mnv4-label-speed-") as name:
        tmp = Path(name)
        images = subset(Path(args.data), args.n, tmp / "images")
        classes = sorted(p.name for p in images.iterdir() if p.is_dir()) or [f"class{i}" for i in range(10)]
        t0 = time.perf_counter()
        teacher = args.teacher or str(make_teacher(tmp / "teacher.safetensors", args.teacher_size, classes))
        print(f"teacher {teacher} ready in {time.perf_counter() - t0:.0f} s", flush=True)
        base = {
            "teacher": teacher,
            "data": str(images),
            "aug": args.aug,
            "record_size": args.record_size,
            "shard_size": args.shard_size,
            "threads": args.threads,
        }
        runs = measure(args, configs, base, tmp)
        report(args, configs, runs, tmp)


if __name__ == "__main__":
    main()
