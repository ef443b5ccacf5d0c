"""When distillation pays: few labels, many unlabelled images, a strong teacher (docs/distillation.md,
"When distillation pays").

For each label budget B (``--budgets``, default 50 and 500 per class of cifar10-mini's ``train/``):

1. data: ``WORK/bB/train`` holds the first B images of each class (links); the other labelled images
   join the unlabelled pool *without their labels* (``WORK/bB/pool``: those plus the 44,000 images of
   ``--unlabeled``, extracted once into ``WORK/unlabeled``);
2. teachers, each trained on the budget's labels only (``--teachers``): ``finetune`` (EfficientNet-Lite0
   fine-tuned, ``mnv4 distill finetune``) and ``frozen`` (its frozen features + a fitted head,
   ``--mode frozen``); val top-1, mean top probability and wall time of each;
3. soft labels per teacher (``mnv4 distill label``, records at the student's size): D1 = the budget's
   labelled images x ``--replicas`` (RandAugment l2m9), D2 = the same with extreme Mixup, D3 = the pool
   once (l2m5); ``--label-views light`` labels D1 and D3 with the Inception crop alone instead (on 32 px
   photos RandAugment's views cost the teacher much of its accuracy), its folders and students named
   ``-light-cF`` after ``--crop-min F``; the ``baseline`` arm then trains with the same views (crops
   from ``F``, no RandAugment), and every gain is taken over the best baseline measured;
4. students ``mnv4_conv_small`` from scratch at ``--student-size`` (32 or 64 px), ``--steps`` optimizer
   steps of ``--batch`` for every arm and seed (``--seeds``): the hard-label baseline (recipe
   ``small-photos`` on the budget's labels) and the distilled arms (``--arms``, mixes as the paper's
   Tab. 8). A learning curve is taken by training in segments of ``--eval-every`` steps (a stopped run
   resumes bit-exactly, so the segments change nothing) and evaluating raw and EMA weights on ``val/``
   after each; the last point also gives the student/teacher agreement on ``val/``.

Every stage is cached in ``--work``: a rerun skips what is done, a killed run continues, and a later
session can add seeds, steps or arms. Prints the tables, writes ``WORK/results.json`` and
``WORK/curves.png``.

    nice -n 10 python benchmarks/distill_gain.py --data DATA/cifar10-mini --unlabeled DATA/cifar10-unlabeled.tar.gz \\
        [--work runs/distill-pays] [--budgets 50,500] [--steps 8000] [--seeds 0,1]

Runs single-threaded by default (``--threads``). ``--smoke`` shrinks everything to check the pipeline in
minutes (tiny steps, a few images); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MIX = {"D1": "1", "D2": "1", "D3": "1", "D1+D2": "1:1", "D2+D3": "1:1", "D1+D2+D3": "1:1:2"}
ARMS = ("baseline", *MIX)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _link(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src.resolve())


# ----------------------------------------------------------------------------------------------- data
def budget_data(args, work: Path, budget: int) -> Path:
    """WORK/bB/{train,val,pool}: B labelled images per class, the rest (unlabelled) in the pool."""
    root = work / f"b{budget}"
    done = root / "data.json"
    if done.is_file():
        return root
    unlabeled = _extract_unlabeled(args, work)
    kept = left = 0
    for cls in sorted(p for p in (args.data / "train").iterdir() if p.is_dir()):
        images = sorted(p for p in cls.iterdir() if p.is_file())[: args.smoke_images or None]
        for i, img in enumerate(images):
            if i < budget:
                _link(img, root / "train" / cls.name / img.name)
                kept += 1
            else:  # the label is dropped: the file joins the pool under a neutral name
                _link(img, root / "pool" / f"labelled-{cls.name}-{img.name}")
                left += 1
    for img in sorted(unlabeled.rglob("*.jpg")):
        _link(img, root / "pool" / img.name)
    if not args.smoke_images:
        if not (root / "val").exists():
            (root / "val").symlink_to((args.data / "val").resolve())
    else:  # a few val images per class
        for cls in sorted(p for p in (args.data / "val").iterdir() if p.is_dir()):
            for img in sorted(cls.iterdir())[: args.smoke_images]:
                _link(img, root / "val" / cls.name / img.name)
    done.write_text(json.dumps({"labelled": kept, "pool_from_train": left}))
    return root


def _extract_unlabeled(args, work: Path) -> Path:
    out = work / "unlabeled"
    if not (out / ".done").is_file():
        _log(f"[data] extracting {args.unlabeled} into {out}")
        with tarfile.open(args.unlabeled) as tar:
            if args.smoke_images:  # the first few members only
                members = [m for _, m in zip(range(args.smoke_images * 10), (m for m in tar if m.isfile()))]
                tar.extractall(out, members=members, filter="data")
            else:
                tar.extractall(out, filter="data")
        (out / ".done").write_text("")
    return out


# ----------------------------------------------------------------------------------------------- teachers
def teacher_stage(args, root: Path, kind: str) -> dict:
    """The teacher of one budget: fine-tuned, or frozen + fitted head; its val quality and wall time."""
    out = root / f"teacher-{kind}"
    record = out / "teacher.json"
    if record.is_file():
        return json.loads(record.read_text())
    t0 = time.perf_counter()
    if kind == "finetune":
        from mnv4.distill.finetune import finetune_teacher

        last = out / "last.pt"
        _log(f"[teacher] {root.name}: fine-tuning {args.teacher} at {args.teacher_size} px")
        res = finetune_teacher(
            args.teacher,
            str(root),
            str(out),
            input_size=args.teacher_size,
            crop_pct=1.0,
            resume=last if last.is_file() else None,
            exist_ok=not last.is_file(),
            progress=False,
            epochs=args.teacher_epochs,
            lr=args.teacher_lr,
            batch_size=args.teacher_batch,
            warmup_epochs=0.3,
            workers=args.workers,
            seed=0,
        )
        path = Path(res.summary["best_checkpoint"])
    else:
        from mnv4.distill.frozen import FrozenConfig, frozen_teacher

        _log(f"[teacher] {root.name}: frozen {args.teacher} features + fitted head, {args.frozen_views} views")
        cfg = FrozenConfig(args.teacher, str(root), str(out), views=args.frozen_views, crop_min=args.crop_min)
        cfg = dataclasses.replace(cfg, engine=args.engine)
        path = frozen_teacher(dataclasses.replace(cfg, workers=args.workers), progress=False).teacher_file
    from mnv4.distill.quality import teacher_quality

    q = teacher_quality(path, root / "val")
    info = {"kind": kind, "file": str(path), "val_top1": q.top1, "mean_max_prob": q.mean_max_prob}
    info["wall_seconds"] = time.perf_counter() - t0
    record.write_text(json.dumps(info, indent=2))
    return info


# ----------------------------------------------------------------------------------------------- labels
def label_stage(args, root: Path, teacher: dict) -> dict[str, Path]:
    from mnv4.distill.labelling import MANIFEST, LabelConfig, label

    light = args.label_views == "light"
    plans = {
        "D1": (root, "inception" if light else "inception-randaug-l2m9", args.replicas),
        "D2": (root, "inception-extreme-mixup", args.replicas),
        "D3": (root / "pool", "inception" if light else "inception-randaug-l2m5", 1),
    }
    folders = {}
    for name, (data, aug, replicas) in plans.items():
        out = root / f"labels-{teacher['kind']}{views_suffix(args)}" / name
        if not (out / MANIFEST).is_file():
            _log(f"[label] {root.name} {teacher['kind']} {name}: {aug} x {replicas} on {data}")
            cfg = LabelConfig(
                teacher=teacher["file"],
                data=str(data),
                out=str(out),
                aug=aug,
                crop_min=args.crop_min,
                replicas=replicas,
                record_size=args.student_size,
                workers=args.workers,
                check_images=0,
                engine=args.engine,
            )
            label(cfg, progress=False, log=_log)
        folders[name] = out
    return folders


def views_suffix(args) -> str:
    """How label folders and students of non-default views are told apart ('' for the paper's views)."""
    if args.label_views == "paper" and args.crop_min == 0.35:
        return ""
    return f"-{args.label_views}-c{args.crop_min:g}"


# ----------------------------------------------------------------------------------------------- students
def student_stage(args, root: Path, arm: str, seed: int, teacher: dict | None, labels: dict) -> dict:
    """One student, trained in segments of ``--eval-every`` steps; its learning curve and final figures."""
    name = f"baseline{views_suffix(args)}" if arm == "baseline" else f"{teacher['kind']}{views_suffix(args)}-{arm}"
    out = root / "students" / f"{name}-s{seed}-{args.steps}steps"
    record = out / "curve.json"
    curve = json.loads(record.read_text()) if record.is_file() else []
    if curve and curve[-1]["step"] >= args.steps:
        return {"arm": name, "seed": seed, "curve": curve, **_finish(args, root, out, curve, teacher)}
    cfg = _student_config(args, root, arm, seed, labels, out)
    from mnv4.distill import train_student
    from mnv4.train import train

    run = train if arm == "baseline" else train_student
    step = curve[-1]["step"] if curve else 0
    last = out / "last.pt"
    while step < args.steps:
        target = min(step + args.eval_every, args.steps)
        # a run killed inside a segment saved last.pt past the curve's last point: train only to the next point
        done = _saved_step(last)
        if done > target:
            sys.exit(f"{last} is at step {done}, past the curve point {target}: was --eval-every changed?")
        if done < target:
            res = run(cfg, resume=last if done else None, max_steps=target - done, progress=False, log=lambda m: None)
            if res.stopped_early and res.stop_reason != "max_steps":
                sys.exit(f"stopped during {name} ({res.stop_reason}); rerun the same command to continue")
        step = target
        curve.append({"step": step, **_evaluate(out / "last.pt", root)})
        record.write_text(json.dumps(curve))
        _log(f"[student] {root.name} {name} seed {seed}: step {step}: {curve[-1]}")
    return {"arm": name, "seed": seed, "curve": curve, **_finish(args, root, out, curve, teacher)}


def cached_baselines(args, root: Path, have: list[dict]) -> list[dict]:
    """Finished hard-label baselines of the requested seeds and steps that this invocation did not ask
    for (the paper's views when ``--label-views light`` runs, or the reverse): every gain is taken over
    the best baseline measured, so a run of the distilled arms alone still reports its gain."""
    done = {(s["arm"], s["seed"]) for s in have}
    found = []
    for seed in args.seeds:
        for record in sorted((root / "students").glob(f"baseline*-s{seed}-{args.steps}steps/curve.json")):
            name = record.parent.name[: -len(f"-s{seed}-{args.steps}steps")]
            curve = json.loads(record.read_text())
            if (name, seed) not in done and curve and curve[-1]["step"] >= args.steps:
                found.append({"arm": name, "seed": seed, "curve": curve, "final_top1": _final_top1(curve)})
    return found


def _final_top1(curve: list[dict]) -> float:
    """The better of raw and EMA weights at the curve's last point."""
    return max(v for k, v in curve[-1].items() if k != "step")


def _saved_step(last: Path) -> int:
    """The optimizer step ``last.pt`` was saved at (0 when there is none)."""
    import torch

    return int(torch.load(last, weights_only=True, mmap=True)["step"]) if last.is_file() else 0


def _student_config(args, root: Path, arm: str, seed: int, labels: dict, out: Path):
    from mnv4.train import resolve_config

    common = dict(
        model="mnv4_conv_small",
        data=str(root),
        input_size=args.student_size,
        batch_size=args.batch,
        workers=args.workers,
        seed=seed,
        output=str(out),
        eval_every=10**6,  # the curve is taken between segments
    )
    if arm == "baseline":
        n = sum(1 for p in (root / "train").rglob("*") if p.is_file() or p.is_symlink())
        recipe, fields = "small-photos", dict(ema_decay=args.ema)
        if views_suffix(args):  # the distilled arms' views for the hard labels too: crop only, from --crop-min
            light = args.label_views == "light"
            fields.update(crop_scale=(args.crop_min, 1.0), **({"randaug_prob": 0.0} if light else {}))
    else:
        from mnv4.distill import SoftLabelSet

        parts = arm.split("+")
        n = sum(len(SoftLabelSet(labels[p])) for p in parts)
        recipe = "distill"
        fields = dict(lr=args.lr, lr_scaling="none", weight_decay=0.05, dropout=0.2, ema_decay=args.ema)
        fields.update(distill=tuple(str(labels[p]) for p in parts), mix=MIX[arm])
    spe = max(1, n // args.batch)
    warm = args.warmup_steps / spe
    return resolve_config(
        recipe, epochs=args.steps / spe, warmup_epochs=warm, ema_start_epochs=warm, **common, **fields
    )


def _student(state_dict, root: Path, size: int):
    from mnv4 import create_model
    from mnv4.data.datasets import load_data

    bundle = load_data(str(root))
    model = create_model("mnv4_conv_small", num_classes=len(bundle.class_names))
    model.load_state_dict(state_dict)
    pp = dataclasses.replace(model.preprocess, input_size=size, test_input_size=None, test_crop_pct=None)
    if bundle.input_size is not None:  # as the trainer sets it for small-image sets
        pp = dataclasses.replace(pp, crop_pct=1.0, interpolation="bilinear")
    model.preprocess, model.class_names = pp, list(bundle.class_names)
    return model.eval(), bundle


def _evaluate(last: Path, root: Path) -> dict:
    import torch

    from mnv4.train.evaluate import evaluate_on

    state = torch.load(last, weights_only=True)
    size = int(state["config"]["input_size"])
    out = {}
    for kind in ("raw", "ema"):
        sd = _weights(state, kind)
        if sd:
            model, bundle = _student(sd, root, size)
            out[kind] = evaluate_on(model, bundle, progress=False)[0].top1
    return out


def _weights(state: dict, kind: str) -> dict | None:
    """The raw weights, or the EMA's (an AveragedModel: ``module.``-prefixed, None before it started)."""
    if kind == "raw":
        return state["model"]
    ema = state.get("ema")
    if not ema or int(ema.get("n_averaged", 0)) == 0:
        return None
    return {k[len("module.") :]: v for k, v in ema.items() if k.startswith("module.")}


def _finish(args, root: Path, out: Path, curve: list, teacher: dict | None) -> dict:
    """Best of raw/EMA at the last point, and the student/teacher agreement on val (argmax)."""
    import torch

    res = {"final_top1": _final_top1(curve)}
    if teacher is not None:
        state = torch.load(out / "last.pt", weights_only=True)
        size = int(state["config"]["input_size"])
        kind = max((k for k in ("raw", "ema") if k in curve[-1]), key=lambda k: curve[-1][k])
        model, bundle = _student(_weights(state, kind), root, size)
        from mnv4.train.evaluate import evaluate_on

        student = torch.tensor(evaluate_on(model, bundle, progress=False)[0].predictions)
        from mnv4.distill.quality import teacher_predictions

        probs, _, names = teacher_predictions(teacher["file"], root / "val")
        mine = [names.index(c) for c in model.class_names]
        res["agreement"] = 100.0 * float(torch.tensor(mine)[student].eq(probs.argmax(1)).float().mean())
    return res


# ----------------------------------------------------------------------------------------------- report
def main() -> None:
    args = _parse()
    import torch

    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"budgets": {}}
    for budget in args.budgets:
        root = budget_data(args, work, budget)
        teachers = {k: teacher_stage(args, root, k) for k in args.teachers}
        labels = {k: label_stage(args, root, t) for k, t in teachers.items()}
        students = []
        for seed in args.seeds:
            if "baseline" in args.arms:
                students.append(student_stage(args, root, "baseline", seed, None, {}))
            for kind, t in teachers.items():
                for arm in (a for a in args.arms if a != "baseline"):
                    students.append(student_stage(args, root, arm, seed, t, labels[kind]))
        students += cached_baselines(args, root, students)
        results["budgets"][budget] = {"teachers": teachers, "students": students}
    from mnv4.host import cpu_description

    results.update(cpu=cpu_description(), threads=args.threads, args={k: str(v) for k, v in vars(args).items()})
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report(args, results)
    plot_curves(results, work / "curves.png")
    _log(f"\nresults: {work / 'results.json'}; curves: {work / 'curves.png'}")


def report(args, results: dict) -> None:
    _log(f"\nCPU {results['cpu']}, {args.threads} thread(s); student mnv4_conv_small at {args.student_size} px")
    for budget, r in results["budgets"].items():
        _log(f"\nbudget {budget} labels per class: teachers (val top-1, mean top probability, wall min)")
        for t in r["teachers"].values():
            _log(f"  {t['kind']:<9} {t['val_top1']:6.2f}%  {t['mean_max_prob']:.3f}  {t['wall_seconds'] / 60:.1f}")
        by_arm: dict[str, list] = {}
        for s in r["students"]:
            by_arm.setdefault(s["arm"], []).append(s)
        # the gain is taken over the best hard-label baseline measured (paper's or light views)
        bases = {a: [s["final_top1"] for s in runs] for a, runs in by_arm.items() if a.startswith("baseline")}
        base_mean = max((sum(v) / len(v) for v in bases.values()), default=None)
        _log(f"  students, {args.steps} steps of {args.batch} (best of raw/EMA at the end; mean over seeds):")
        for arm, runs in by_arm.items():
            finals = [s["final_top1"] for s in runs]
            mean = sum(finals) / len(finals)
            gain = f"{mean - base_mean:+.2f}" if base_mean is not None and arm not in bases else ""
            agree = [s["agreement"] for s in runs if "agreement" in s]
            agree_text = f"agreement {sum(agree) / len(agree):.1f}%" if agree else ""
            seeds = ", ".join(f"{f:.2f}" for f in finals)
            _log(f"  {arm:<28} {mean:6.2f}  ({seeds})  {gain:>7}  {agree_text}")


def plot_curves(results: dict, path: Path) -> None:
    from mnv4.plotting import pyplot, save_figure

    plt = pyplot()
    budgets = list(results["budgets"])
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for s in results["budgets"][budget]["students"]:
            steps = [p["step"] for p in s["curve"]]
            best = [max(v for k, v in p.items() if k != "step") for p in s["curve"]]
            ax.plot(steps, best, label=f"{s['arm']} s{s['seed']}", alpha=0.8)
        ax.set(title=f"{budget} labels per class", xlabel="optimizer steps", ylabel="val top-1 (%)")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="the cifar10-mini image folder (train/ and val/)")
    ap.add_argument("--unlabeled", type=Path, required=True, help="the unlabelled images (cifar10-unlabeled.tar.gz)")
    ap.add_argument("--work", type=Path, default=Path("runs/distill-pays"))
    ap.add_argument("--budgets", default="50,500", help="labelled images per class")
    ap.add_argument("--teachers", default="finetune,frozen", help="finetune and/or frozen")
    ap.add_argument("--teacher", default="efficientnet-lite0")
    ap.add_argument("--teacher-size", type=int, default=128, help="the fine-tuned teacher's resolution")
    ap.add_argument("--teacher-epochs", type=float, default=3)
    ap.add_argument("--teacher-lr", type=float, default=5e-4)
    ap.add_argument("--teacher-batch", type=int, default=64)
    ap.add_argument("--frozen-views", type=int, default=0, help="augmented views of the frozen teacher's features")
    ap.add_argument("--replicas", type=int, default=4, help="passes of D1 and D2 over the labelled images")
    ap.add_argument("--crop-min", type=float, default=0.35, help="smallest Inception-crop area (32 px photos)")
    ap.add_argument(
        "--label-views",
        choices=("paper", "light"),
        default="paper",
        help="paper: D1 RandAugment l2m9, D3 l2m5 (Tab. 8); light: D1 and D3 Inception crop only (small photos)",
    )
    ap.add_argument("--engine", default="auto", help="where the labelling teacher runs (distill label --engine)")
    ap.add_argument("--student-size", type=int, default=64, choices=(32, 64))
    ap.add_argument("--steps", type=int, default=8000, help="optimizer steps of every student")
    ap.add_argument("--eval-every", type=int, default=1000, help="learning-curve interval in steps")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3, help="distilled students' peak LR")
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--warmup-steps", type=int, default=40)
    ap.add_argument("--arms", default="baseline,D1+D2+D3", help=f"of {','.join(ARMS)}")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="a few images and steps: checks the pipeline only")
    args = ap.parse_args()
    args.budgets = [int(b) for b in args.budgets.split(",") if b]
    args.teachers = [t for t in args.teachers.split(",") if t]
    args.arms = [a for a in args.arms.split(",") if a]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    bad = sorted(set(args.arms) - set(ARMS)) + sorted(set(args.teachers) - {"finetune", "frozen"})
    if bad:
        sys.exit(f"unknown arm(s) or teacher(s) {bad}; arms: {', '.join(ARMS)}; teachers: finetune, frozen")
    args.smoke_images = 0
    if args.smoke:  # 6 images per class, 60 from the pool, a handful of steps
        args.smoke_images = 6
        args.teacher_epochs, args.replicas, args.frozen_views = 1, 1, 1
        args.batch = args.teacher_batch = 8
    return args


if __name__ == "__main__":
    main()
