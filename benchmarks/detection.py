"""MNv4 detectors vs torchvision's mobile detectors on small real datasets, from scratch (docs/detection.md
"Measured").

Candidates, all at the same input size (320 px letterboxed), trained by the same DetectionTrainer (same
augmentation, epochs, batch, optimizer, seeds) and scored by the same COCO evaluator on the val split:

* ``retinanet-mnv4-conv-s``: mnv4's RetinaNet (the paper's head) on MNv4-Conv-S;
* ``ssdlite-mnv4-conv-s``: mnv4's SSDLite head on MNv4-Conv-S, on the stage ends (96 / 128 channels);
* ``ssdlite-mnv4-conv-s-exp``: the same with ``feature_location="expansion"``: the stride-16 map at the
  576-channel expansion of the first stride-32 block and the stride-32 map after the 960 conv, where
  torchvision's SSDLite reads MobileNetV3 (672 / 480 channels);
* ``ssdlite-mnv4-conv-s-exp-bn``: the same with torchvision's SSDLite BatchNorm settings in the backbone
  (eps 0.001, momentum 0.03 instead of PyTorch's 1e-5 / 0.1);
* ``ssdlite-mnv4-conv-s-exp-a10``: the expansion taps with default boxes from 10% of the image side
  (``min_ratio=0.1``: 32 px at 320) instead of SSD's 20% (64 px), for small objects;
* ``ssdlite-mnv4-conv-s-exp-s8``: the expansion taps plus a stride-8 map (``levels=[2, 3, 4]``: the
  192-channel expansion of the first stride-16 block) and boxes from 5% of the side (16 px at 320);
* ``ssdlite-mnv4-conv-s-exp-auto`` / ``retinanet-mnv4-conv-s-auto``: the anchors fitted to the training
  boxes (``levels``, ``min_ratio`` / ``anchor_scale`` "auto": mnv4.detect.anchors.fit_anchor_options);
  ``ssdlite-mnv4-conv-s-exp-fit``: also each map's scale fitted (``scales`` "auto");
* ``tv-ssdlite320-mnv3-a10``: torchvision's SSDLite below with the same smaller default boxes;
* ``tv-ssdlite320-mnv3``: torchvision's ``ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)``.
  Without backbone weights torchvision switches its ``reduced_tail`` on (the last stage at half width,
  MobileNetV3 paper Tab. 6), so this is the smaller variant;
* ``tv-frcnn-mnv3-320-fpn``: torchvision's ``fasterrcnn_mobilenet_v3_large_320_fpn(weights=None,
  weights_backbone=None)`` (two-stage);
* ``retinanet-mnv4-conv-s+pre`` (added by ``--backbone-checkpoint``) and ``ssdlite-mnv4-conv-s+pre`` (asked
  for by name, with it): an MNv4 row with its backbone first trained by ``mnv4 train`` (e.g. on cifar10-mini
  photos), to measure the gain over scratch.

Per dataset and model: AP, AP50, AP-small (val), the anchor coverage (the share of training boxes some
anchor overlaps at IoU >= 0.5, mnv4.detect.anchors), params, MACs (one 320 px image, FlopCounterMode over the
whole eval forward), eager latency per image (batch 1, median), ONNX Runtime latency of the dense graph
where it exports (MNv4 and torchvision SSDLite: backbone + head without decoding; Faster R-CNN: "-"), and
training wall time. Every stage is cached in ``--work`` (a training run folder per model and seed, resumed
when interrupted; ``eval.json``, ``cost.json``), so rerunning the command continues where it stopped.
``--stages train`` trains and scores only, so long training can run in the background and the timing
stage (``--stages cost``) later, alone on the machine; ``--stages cost`` alone times trained rows only and
refuses a row not trained yet rather than start its training.

    python benchmarks/detection.py --data bccd=DATA/bccd --data aquarium=DATA/aquarium \\
        --epochs 30 --work runs/detection-bench
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mnv4.detect.data import load_detection_data  # noqa: E402
from mnv4.detect.evaluate import evaluate_detector  # noqa: E402
from mnv4.detect.recipes import resolve_detect_config  # noqa: E402
from mnv4.detect.train import DetectionTrainer  # noqa: E402
from mnv4.files import atomic_write_json  # noqa: E402
from mnv4.host import cpu_description  # noqa: E402

MODELS = (
    "retinanet-mnv4-conv-s",
    "ssdlite-mnv4-conv-s",
    "ssdlite-mnv4-conv-s-exp",
    "ssdlite-mnv4-conv-s-exp-bn",
    "ssdlite-mnv4-conv-s-exp-a10",
    "ssdlite-mnv4-conv-s-exp-s8",
    "ssdlite-mnv4-conv-s-exp-auto",
    "ssdlite-mnv4-conv-s-exp-fit",
    "retinanet-mnv4-conv-s-auto",
    "tv-ssdlite320-mnv3",
    "tv-ssdlite320-mnv3-a10",
    "tv-frcnn-mnv3-320-fpn",
)
PRETRAINED = "retinanet-mnv4-conv-s+pre"  # the backbone from --backbone-checkpoint
EXP = {"feature_location": "expansion"}
# name -> (head, head options) of the MNv4 rows
MNV4_HEADS = {
    "retinanet-mnv4-conv-s": ("retinanet", {}),
    "ssdlite-mnv4-conv-s": ("ssdlite", {}),
    "ssdlite-mnv4-conv-s-exp": ("ssdlite", EXP),
    # torchvision's SSDLite BatchNorm (eps 0.001, momentum 0.03) in the backbone too
    "ssdlite-mnv4-conv-s-exp-bn": ("ssdlite", {**EXP, "bn_eps": 0.001, "bn_momentum": 0.03}),
    "ssdlite-mnv4-conv-s-exp-a10": ("ssdlite", {**EXP, "min_ratio": 0.1}),
    "ssdlite-mnv4-conv-s-exp-s8": ("ssdlite", {**EXP, "levels": [2, 3, 4], "min_ratio": 0.05}),
    # anchors fitted to the training boxes (mnv4.detect.anchors.fit_anchor_options, as `mnv4 detect train`
    # does with these options "auto")
    "ssdlite-mnv4-conv-s-exp-auto": ("ssdlite", {**EXP, "levels": "auto", "min_ratio": "auto"}),
    "ssdlite-mnv4-conv-s-exp-fit": ("ssdlite", {**EXP, "levels": "auto", "min_ratio": "auto", "scales": "auto"}),
    "retinanet-mnv4-conv-s-auto": ("retinanet", {"anchor_scale": "auto"}),
}
SMALL_ANCHORS = 0.1  # the -a10 rows: default boxes from 10% of the image side (32 px at 320) instead of 20%
STAGES = ("train", "cost")


class ShiftLabels(nn.Module):
    """A torchvision detector (background = class 0) behind the 0..C-1 label contract of mnv4's detectors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images, targets=None):
        if targets is not None:
            targets = [{**t, "labels": t["labels"] + 1} for t in targets]
        out = self.model(images, targets)
        return out if self.training else [{**d, "labels": d["labels"] - 1} for d in out]


def build(name: str, data, size: int, backbone: str | None = None) -> nn.Module:
    """Model ``name`` for ``data`` (a DetectionData: its classes, and its training boxes for "auto" anchors)."""
    from torchvision.models import detection as tvd

    from mnv4.detect import create_detector
    from mnv4.detect.anchors import fit_anchor_options

    classes = list(data.classes)

    scratch, pre, rest = name.partition("+pre")
    if scratch in MNV4_HEADS and not rest:
        if pre and backbone is None:
            raise SystemExit(f"{name} needs --backbone-checkpoint (an mnv4 train checkpoint of mnv4_conv_small)")
        weights = {"backbone_checkpoint": backbone} if pre else {}
        head, options = MNV4_HEADS[scratch]
        options, _ = fit_anchor_options(head, options, data.split("train"), size)
        return create_detector("mnv4_conv_small", head=head, classes=classes, image_size=size, **weights, **options)
    n = len(classes) + 1
    if name in ("tv-ssdlite320-mnv3", "tv-ssdlite320-mnv3-a10"):
        m = tvd.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=n)
        if name.endswith("-a10"):  # same 6 boxes per location, smaller scales: the head is unchanged
            from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

            m.anchor_generator = DefaultBoxGenerator([[2, 3]] * 6, min_ratio=SMALL_ANCHORS, max_ratio=0.95)
        return ShiftLabels(m)
    if name == "tv-frcnn-mnv3-320-fpn":
        m = tvd.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=n)
        m.transform.min_size, m.transform.max_size = (size,), size  # no resizing: images arrive at `size`
        return ShiftLabels(m)
    raise SystemExit(
        f"unknown model {name}; choose from {', '.join(MODELS)} (an MNv4 one with +pre: its backbone "
        "from --backbone-checkpoint)"
    )


class BenchTrainer(DetectionTrainer):
    """DetectionTrainer for any detector: weights saved as a plain safetensors state dict."""

    def save_weights(self, model: nn.Module, path: Path, extra) -> None:
        from safetensors.torch import save_file

        from mnv4.files import atomic_write

        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write(path, lambda tmp: save_file(state, tmp))


def dense_graph(model: nn.Module) -> nn.Module | None:
    """The graph that exports to ONNX (backbone + head, raw outputs), or None for two-stage detectors."""
    from mnv4.detect.model import Detector

    class Dense(nn.Module):
        def __init__(self, fn) -> None:
            super().__init__()
            self.inner, self.fn = model, fn

        def forward(self, x):
            return self.fn(x)

    if isinstance(model, Detector):
        return Dense(model.network)
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "head") and hasattr(inner.head, "classification_head"):
        return Dense(lambda x: tuple(inner.head(list(inner.backbone(x).values())).values()))
    return None


def cost(model: nn.Module, size: int, runs: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    x = [torch.rand(3, size, size)]
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model(x)
        for _ in range(3):
            model(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
    out = {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "macs_g": counter.get_total_flops() / 2e9,
        "eager_ms": statistics.median(times),
        "onnx_ms": None,
    }
    out["onnx_ms"] = onnx_latency(model, size, runs)
    return out


def anchors_of(model: nn.Module, size: int) -> torch.Tensor:
    """The anchors (xyxy, input pixels) a detector matches boxes to: SSD's default boxes, RetinaNet's
    anchors, Faster R-CNN's RPN anchors."""
    from torchvision.models.detection.image_list import ImageList

    if hasattr(model, "anchors"):
        return model.anchors()
    inner = model.model
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        feats = inner.backbone(x)
    maps = list(feats.values()) if isinstance(feats, dict) else [feats]
    generator = inner.anchor_generator if hasattr(inner, "anchor_generator") else inner.rpn.anchor_generator
    return generator(ImageList(x, [(size, size)]), maps)[0]


def onnx_latency(model: nn.Module, size: int, runs: int) -> float | None:
    import tempfile

    dense = dense_graph(model)
    if dense is None:
        return None
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    x = torch.randn(1, 3, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        torch.onnx.export(dense.eval(), (x,), path, opset_version=17, dynamo=False)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x.numpy()}
        for _ in range(3):
            sess.run(None, feed)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_one(args, data_name: str, data, name: str, seed: int) -> dict:
    folder = Path(args.work) / data_name / name / f"seed{seed}"
    cfg = resolve_detect_config(
        "detect-small",
        input_size=args.size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=seed,
        output=str(folder),
        workers=args.workers,
        device=args.device,
        lr=args.lr,
    )
    summary = folder / "summary.json"
    trained = folder / "config.yaml"
    if trained.is_file():  # a cached run trained at another LR must not stand in for this one
        import yaml

        lr = yaml.safe_load(trained.read_text()).get("lr")
        if lr is not None and abs(float(lr) - cfg.lr) > 1e-12:
            raise SystemExit(f"{folder} was trained at LR {lr:g}, not {cfg.lr:g}: give --lr {lr:g} or another --work")
    if not summary.is_file() and "train" not in args.stages:
        # --stages cost alone is the timing run, meant to run alone on the machine: it must not start hours of
        # training for a row that has none yet
        raise SystemExit(f"{folder}: not trained yet; run the same command with --stages train first")
    if not summary.is_file():
        resume = folder / "last.pt" if (folder / "last.pt").is_file() else None
        model = build(name, data, args.size, args.backbone_checkpoint)
        BenchTrainer(cfg, data=data, model=model, progress=False, log=lambda m: None).run(resume)
        if not summary.is_file():  # stopped (Ctrl-C, SIGTERM): last.pt holds the run
            raise SystemExit(f"{folder}: training stopped; rerun the same command to continue it")
    wall = json.loads(summary.read_text())["wall_seconds"]
    evaluated = folder / "eval.json"
    if not evaluated.is_file():
        from safetensors.torch import load_file

        model = build(name, data, args.size, args.backbone_checkpoint)
        model.load_state_dict(load_file(folder / "best.safetensors"))
        from mnv4.train.distributed import pick_device

        device = pick_device(args.device)
        m, _ = evaluate_detector(model.to(device), data.split("val"), data.classes, args.size, device=device)
        atomic_write_json(evaluated, m.as_dict())
    ev = json.loads(evaluated.read_text())
    return {"AP": ev["AP"], "AP50": ev["AP50"], "AP_small": ev["AP_small"], "train_s": wall}


def coverage(name: str, data, size: int) -> float:
    """Share of the training boxes some anchor of the model matches at IoU >= 0.5 (mnv4.detect.anchors)."""
    from mnv4.detect.anchors import anchor_coverage

    model = build(name, data, size).eval()
    return anchor_coverage(anchors_of(model, size), data.split("train"), data.classes, size).covered


def statistics_mean(per_seed: list[dict]) -> dict:
    return {k: statistics.mean(r[k] for r in per_seed) for k in per_seed[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", required=True, metavar="NAME=PATH", help="a dataset (repeatable)")
    ap.add_argument("--work", default="runs/detection-bench", help="cache folder of every stage")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument(
        "--lr", type=float, default=None, help="peak LR (default: detect-small's, 3e-3); one --work folder per LR"
    )
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (results are their mean)")
    ap.add_argument("--latency-runs", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--backbone-checkpoint",
        default=None,
        help=f"an mnv4 train checkpoint of mnv4_conv_small: adds the {PRETRAINED} row (gain over scratch)",
    )
    ap.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="train (train + score) and/or cost (params, MACs, latency of trained rows: run it alone on the machine)",
    )
    args = ap.parse_args()
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    if not stages or stages - set(STAGES):
        raise SystemExit(f"--stages takes a comma-separated subset of {', '.join(STAGES)}, got {args.stages!r}")
    args.stages = stages
    if args.backbone_checkpoint is not None and not Path(args.backbone_checkpoint).is_file():
        raise SystemExit(f"--backbone-checkpoint {args.backbone_checkpoint}: no such file")
    if args.lr is not None and not 0 < args.lr < 1:
        raise SystemExit(f"--lr {args.lr:g}: give a peak learning rate between 0 and 1, e.g. 3e-3")
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.backbone_checkpoint is not None and PRETRAINED not in names:
        names.append(PRETRAINED)
    rows = []
    for item in args.data:
        data_name, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--data expects NAME=PATH, got {item!r}")
        data = load_detection_data(path)
        for name in names:
            per_seed = [run_one(args, data_name, data, name, s) for s in seeds]
            mean = {**statistics_mean(per_seed), "cover": coverage(name, data, args.size)}
            cost_file = Path(args.work) / data_name / name / "cost.json"
            if not cost_file.is_file() and "cost" not in stages:
                rows.append((data_name, name, mean, None))
                continue
            if not cost_file.is_file():  # timed with trained weights: an untrained head's box count is not typical
                from safetensors.torch import load_file

                model = build(name, data, args.size, args.backbone_checkpoint)
                model.load_state_dict(
                    load_file(Path(args.work) / data_name / name / f"seed{seeds[0]}" / "best.safetensors")
                )
                atomic_write_json(cost_file, cost(model, args.size, args.latency_runs))
            rows.append((data_name, name, mean, json.loads(cost_file.read_text())))
    lr = f"LR {args.lr:g}" if args.lr is not None else "detect-small LR"
    print(
        f"# {args.epochs:g} epochs, batch {args.batch_size}, {args.size} px, {lr}, seeds {seeds}, "
        f"CPU: {cpu_description()}"
    )
    head = (
        "| data | model | AP | AP50 | AP small | anchor cover | params (M) | MACs (G) | eager ms | ONNX RT ms "
        "| train s |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for data_name, name, m, c in rows:
        if c is None:  # the cost stage has not run yet
            cells = "- | - | - | -"
        else:
            onnx = f"{c['onnx_ms']:.1f}" if c["onnx_ms"] is not None else "-"
            cells = f"{c['params_m']:.2f} | {c['macs_g']:.2f} | {c['eager_ms']:.1f} | {onnx}"
        print(
            f"| {data_name} | {name} | {m['AP']:.3f} | {m['AP50']:.3f} | {m['AP_small']:.3f} | {m['cover']:.0%} "
            f"| {cells} | {m['train_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
