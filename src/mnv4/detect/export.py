"""Exporting detectors: the raw network through mnv4.deploy's exporters, and a graph with decoding + NMS.

- ``export_detector(det, fmt)``: the raw network, one output ``[B, A, C + 4]`` (class logits, then box
  deltas against the anchors), through :func:`mnv4.deploy.export.export` - every format, precision and
  parity check a classifier has. ``<artefact>.detector.json`` beside it holds the anchors (constants,
  ``[A, 4]`` xyxy pixels), the classes, the preprocessing, the input format and the output layout.
  Calibration and parity images are letterboxed as the detector's evaluation sees them.
- ``export_detector(det, fmt, eval_data=DATASET)`` then scores the eager detector and the artefact on one
  split with one evaluator (:func:`compare_ap`): COCO AP / AP50 before -> after, in ``.parity.json``.
- ``export_detector(det, fmt, with_nms=True)``: a batch-1 graph from the normalised image to final
  detections ``[N, 6]`` = (x1, y1, x2, y2, score, label), decoding with the anchors as constants and
  torchvision's batched NMS in the graph; ONNX and OpenVINO (from the ONNX graph). Parity is on the
  final boxes: the same number of detections, each matched with IoU >= 0.99 and the same class.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_iou, clip_boxes_to_image, nms

from ..errors import MNv4Error, check_float, check_int
from ..files import atomic_write_json, check_output_path
from ..models.meta import update_weights_meta
from ..threads import torch_threads
from .model import Detector

__all__ = [
    "RawNetwork",
    "NMSNetwork",
    "export_detector",
    "compare_ap",
    "NMS_FORMATS",
    "match_detections",
    "MIN_MATCH_IOU",
]

NMS_FORMATS = ("onnx", "openvino")  # routes whose runtime has a dynamic-size NMS op (docs/detection.md)
MIN_MATCH_IOU = 0.99
_SCORE_RTOL = 1e-3


def _preprocess(detector: Detector):
    from ..models.registry import Preprocess

    pre = detector.config["preprocess"]
    return Preprocess(input_size=detector.image_size, mean=tuple(pre["mean"]), std=tuple(pre["std"]))


class RawNetwork(nn.Module):
    """``detector.network`` with its two outputs joined: ``[B, A, C + 4]`` (runtimes hand back one output)."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector
        # what mnv4.deploy reads for the input size and the parity report (mnv4.models.meta)
        update_weights_meta(self, preprocess=_preprocess(detector), class_names=tuple(detector.classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_logits, box_regression = self.detector.network(x)
        return torch.cat([cls_logits, box_regression], dim=-1)


class NMSNetwork(nn.Module):
    """Batch-1 graph: normalised image -> ``[N, 6]`` detections, the same as ``Detector.decode``.

    torchvision's decoding keeps, per pyramid level (RetinaNet) or per class (SSD), the top-k scores
    above the threshold before NMS. Here the top-k is taken first (a static shape) and the threshold
    applied after NMS: a box under the threshold can only suppress boxes scoring lower still, which are
    under it too, so the kept set is the same and the graph has one dynamic size (NMS's) instead of two.
    """

    def __init__(self, detector: Detector, score_thresh: float, nms_thresh: float, max_det: int) -> None:
        super().__init__()
        self.detector = detector
        self.preprocess = _preprocess(detector)
        self.score_thresh, self.nms_thresh, self.max_det = score_thresh, nms_thresh, max_det
        self.register_buffer("anchors", detector.anchors(), persistent=False)
        grid = detector._grid
        per_loc = self.anchors.shape[0] // sum(g * g for g in grid)
        self.level_sizes = [g * g * per_loc for g in grid]

    def _candidates(self, cls_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores, anchor index, label) of the top-k candidates, as torchvision's postprocessing picks them."""
        model = self.detector.model
        if self.detector.head_kind == "retinanet":
            scores, anchor_idx, labels, start = [], [], [], 0
            for logits in cls_logits.split(self.level_sizes, dim=0):
                flat = torch.sigmoid(logits).flatten()
                top, idx = flat.topk(min(model.topk_candidates, flat.numel()))
                scores.append(top)
                anchor_idx.append(idx // logits.shape[1] + start)
                labels.append(idx % logits.shape[1])
                start += logits.shape[0]
            return torch.cat(scores), torch.cat(anchor_idx), torch.cat(labels)
        probs = torch.softmax(cls_logits, dim=-1)[:, 1:]  # drop SSD's background column
        k = min(model.topk_candidates, probs.shape[0])
        top, idx = probs.t().topk(k, dim=1)  # per class
        labels = torch.arange(probs.shape[1], device=probs.device).repeat_interleave(k)
        return top.flatten(), idx.flatten(), labels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_logits, box_regression = self.detector.network(x[:1])
        scores, anchor_idx, labels = self._candidates(cls_logits[0])
        coder = self.detector.model.box_coder
        boxes = coder.decode_single(box_regression[0][anchor_idx], self.anchors[anchor_idx])
        s = self.detector.image_size
        boxes = clip_boxes_to_image(boxes, (s, s))
        # per-class NMS as one NMS over boxes shifted apart per class (torchvision's batched_nms picks a
        # per-class loop for large inputs, which torch.export cannot trace)
        offsets = labels.to(boxes.dtype)[:, None] * (s + 1)
        keep = nms(boxes + offsets, scores, self.nms_thresh)
        keep = keep[scores[keep] > self.score_thresh][: self.max_det]
        return torch.cat([boxes[keep], scores[keep, None], labels[keep, None].to(boxes.dtype)], dim=1)


def match_detections(reference: np.ndarray, output: np.ndarray) -> dict[str, Any]:
    """Pair each reference detection with the output's at the same rank; IoU, class and score agreement."""
    stats: dict[str, Any] = {"reference": len(reference), "exported": len(output)}
    if len(reference) != len(output):
        stats.update(min_iou=0.0, same_class=False, max_score_diff=float("inf"))
        return stats
    if not len(reference):
        stats.update(min_iou=1.0, same_class=True, max_score_diff=0.0)
        return stats
    ref, out = torch.from_numpy(reference).float(), torch.from_numpy(output).float()
    iou = box_iou(ref[:, :4], out[:, :4])
    # NMS order can swap equal scores: match each reference box to its best same-class output box
    iou[ref[:, 5, None] != out[None, :, 5]] = 0.0
    best, j = iou.max(dim=1)
    stats.update(
        min_iou=float(best.min()),
        same_class=bool((ref[:, 5] == out[j, 5]).all()),
        max_score_diff=float((ref[:, 4] - out[j, 4]).abs().max()),
    )
    return stats


def _realistic(detector: Detector, samples: torch.Tensor) -> tuple[Detector, str]:
    """A random-weight detector gets BatchNorm statistics (mnv4.models.batchnorm), as classifiers do."""
    from ..models.batchnorm import has_default_bn_stats, noise_batches, recalibrate_batchnorm

    if not has_default_bn_stats(detector):
        return detector, "as given"
    detector = copy.deepcopy(detector)
    recalibrate_batchnorm(RawNetwork(detector), noise_batches(detector.image_size, 2, 4, seed=1))
    return detector, "random init; BatchNorm statistics re-estimated on 8 noise inputs"


def _sidecar(detector: Detector, path: Path, layout: str, **extra: Any) -> Path:
    from .evaluate import sidecar_path

    how = "letterboxed to S (aspect kept, padded with 114 grey)" if detector.resize == "letterbox" else "stretched to S"
    info = {
        "config": detector.config,
        "classes": detector.classes,
        "image_size": detector.image_size,
        "input": f"normalised RGB [B, 3, S, S]: (pixels / 255 - mean) / std, {how}",
        "output": layout,
        **extra,
    }
    return atomic_write_json(sidecar_path(path), info)


def _artefact_outputs(columns: int, split: bool) -> list[dict[str, Any]]:
    """The raw network artefact's outputs, each ``[B, A, columns]``: one joined output, or (INT8 routes that
    give each part its own scale, ``Format.int8_split_outputs``) class logits and box deltas apart, which
    mnv4's runners join along the last axis into the ``output`` layout."""
    if not split:
        return [{"part": "class logits + box deltas", "columns": columns + 4}]
    return [{"part": "class logits", "columns": columns}, {"part": "box deltas", "columns": 4}]


def _check_nms_request(fmt: str, precision: str) -> None:
    if fmt not in NMS_FORMATS:
        raise MNv4Error(
            f"{fmt} cannot hold NMS in the graph (it needs a dynamic-size NMS op); "
            f"use {' or '.join(NMS_FORMATS)}, or export the raw network and run NMS outside"
        )
    if precision != "fp32":
        raise MNv4Error("the with-NMS graph is exported in fp32; export the raw network for fp16 / int8")


def _write_nms_graph(module: NMSNetwork, example: torch.Tensor, fmt: str, target: Path) -> None:
    from ..deploy.writers import write_atomically

    def write(tmp: Path) -> None:
        onnx_path = tmp if fmt == "onnx" else tmp.with_suffix(".onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(module, (example,))
            torch.onnx.export(program, (example,), dynamo=True, external_data=False, verbose=False).save(str(onnx_path))
        if fmt == "openvino":  # OpenVINO reads NMS from the ONNX graph (not from torch.export's custom op)
            import openvino as ov

            ov.save_model(ov.convert_model(str(onnx_path)), str(tmp), compress_to_fp16=False)
            onnx_path.unlink()

    write_atomically(target, write)


def _nms_parity(module: NMSNetwork, path: Path, fmt: str, x: torch.Tensor, threads: int | None) -> dict[str, Any]:
    from ..deploy.formats import load_runner

    run = load_runner(path, fmt, threads=threads)
    worst: dict[str, Any] = {"min_iou": 1.0, "same_class": True, "max_score_diff": 0.0, "detections": 0}
    failures = []
    for i in range(len(x)):
        with torch.inference_mode():
            ref = module(x[i : i + 1]).numpy()
        got = np.asarray(run(x[i : i + 1].numpy()), dtype=np.float32).reshape(-1, 6)
        m = match_detections(ref, got)
        worst["detections"] += m["reference"]
        if m["reference"] != m["exported"]:
            failures.append(f"sample {i}: {m['exported']} detections, eager {m['reference']}")
        worst["min_iou"] = min(worst["min_iou"], m["min_iou"])
        worst["same_class"] &= m["same_class"]
        worst["max_score_diff"] = max(worst["max_score_diff"], m["max_score_diff"])
    if worst["min_iou"] < MIN_MATCH_IOU:
        failures.append(f"matched IoU {worst['min_iou']:.4f} < {MIN_MATCH_IOU}")
    if not worst["same_class"]:
        failures.append("classes differ")
    if worst["max_score_diff"] > _SCORE_RTOL:
        failures.append(f"scores differ by {worst['max_score_diff']:.3g}")
    return {**worst, "samples": len(x), "failures": failures, "passed": not failures}


def _inputs(detector: Detector, samples: int, images: torch.Tensor | None) -> tuple[torch.Tensor, str]:
    if images is not None:
        return images.float(), "given images"
    from ..deploy.inputs import random_inputs

    return random_inputs(samples, detector.image_size), "seeded N(0,1) noise"


def _export_raw(
    detector: Detector,
    fmt: str,
    path: Path,
    precision: str,
    check: tuple[int, torch.Tensor | None],
    threads: int | None,
    verbose: bool,
    options: dict[str, Any],
) -> Path:
    """The raw network through mnv4.deploy's export; a ``calib_dir`` is read letterboxed (its first images
    calibrate INT8, the next ones are the parity inputs, as a classifier's held-out images are)."""
    from ..deploy.export import export
    from ..deploy.formats import get_format
    from ..deploy.parity import ParityError
    from ..deploy.requests import ExportRequest
    from .evaluate import letterboxed_images

    samples, images = check
    if precision == "int8" and options.get("min_top1") is None:
        # the argmax of a whole [A, C + 4] row is no detector's answer: INT8 is held to the cosine bar here,
        # and its accuracy is the AP before -> after (`eval_data`)
        options["min_top1"] = 0.0
    calib_dir = options.pop("calib_dir", None)
    if calib_dir is not None:
        n_calib = options.get("calib_samples", ExportRequest.calib_samples)
        n_calib = n_calib if precision == "int8" and options.get("calib_data") is None else 0
        loaded = letterboxed_images(detector, calib_dir, n_calib + samples)
        if n_calib:
            options["calib_data"] = loaded[:n_calib]
        if images is None and len(loaded) > n_calib:
            images = loaded[n_calib:]
    columns = detector.num_classes + (detector.head_kind == "ssdlite")
    layout = f"[B, A, {columns} class logits + 4 box deltas]"
    shape = {k: options[k] for k in ("input_layout", "input_dtype", "batch") if options.get(k) is not None}
    info = get_format(fmt)
    batch = ExportRequest(fmt, **shape).batch_for(info)
    outputs = _artefact_outputs(columns, precision == "int8" and info.int8_split_outputs)

    def sidecar() -> None:
        _sidecar(detector, path, layout, anchors=detector.anchors().tolist(), head=detector.head_kind,
                 precision=precision, input_layout=shape.get("input_layout", "nchw"),
                 input_dtype=shape.get("input_dtype", "float32"), batch=batch,
                 artefact_outputs=outputs)  # fmt: skip

    try:
        export(RawNetwork(detector), fmt, path, precision=precision, samples=samples, threads=threads,
               verbose=verbose, check_data=images, **options)  # fmt: skip
    except ParityError:
        sidecar()  # a failed check leaves the artefact for inspection: with what runs it
        raise
    sidecar()
    return path


def _check_eval_data(data: str | os.PathLike | None) -> None:
    """Before any export: the evaluation set exists and is laid out as a detection dataset."""
    if data is None or str(data).lower() == "digits":
        return
    if not Path(data).is_dir():
        raise MNv4Error(f"detection evaluation set not found: {data}; give a COCO, VOC or YOLO folder, or digits")
    from .data import detect_format

    detect_format(Path(data))  # one error naming the folder when it is none of COCO, VOC, YOLO


def compare_ap(
    detector: Detector,
    path: str | os.PathLike,
    data: str | os.PathLike | None,
    split: str = "val",
    *,
    threads: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """COCO AP / AP50 of the eager detector (before) and of its exported raw network (after) on one split of
    ``data`` (a COCO / VOC / YOLO folder or ``digits``), by one evaluator, both on ``threads`` CPU threads;
    added to ``<artefact>.parity.json`` as ``detection_ap`` and returned."""
    from ..deploy.parity import parity_path
    from .data import load_detection_data
    from .evaluate import evaluate_artefact, evaluate_detector

    _check_eval_data(data)
    dataset = load_detection_data(data, detector.classes, warn=False)
    records = dataset.split(split)
    with torch_threads(threads):  # the eager side on as many threads as the runtime
        before, _ = evaluate_detector(detector.eval(), records, detector.classes, detector.image_size)
    after = evaluate_artefact(path, dataset, split, threads=threads, detector=detector)
    result = {
        "dataset": dataset.name,
        "split": split,
        "images": before.num_images,
        "boxes": before.num_boxes,
        "before": {"AP": before.AP, "AP50": before.AP50, "reference": "eager PyTorch fp32"},
        "after": {"AP": after.AP, "AP50": after.AP50, "detections": after.num_detections},
        "delta_AP": after.AP - before.AP,
        "delta_AP50": after.AP50 - before.AP50,
    }
    report = parity_path(path)
    stored = json.loads(report.read_text()) if report.is_file() else {}
    atomic_write_json(report, {**stored, "detection_ap": result})
    if verbose:
        print(
            f"AP on {dataset.name} {split} ({result['images']} images), eager -> {Path(path).name}: "
            f"AP {before.AP:.3f} -> {after.AP:.3f} ({result['delta_AP']:+.3f}), "
            f"AP50 {before.AP50:.3f} -> {after.AP50:.3f} ({result['delta_AP50']:+.3f})"
        )
    return result


def export_detector(
    detector: Detector,
    fmt: str,
    output: str | os.PathLike | None = None,
    *,
    with_nms: bool = False,
    precision: str = "fp32",
    score_thresh: float | None = None,
    nms_thresh: float | None = None,
    max_det: int | None = None,
    samples: int = 8,
    images: torch.Tensor | None = None,
    eval_data: str | os.PathLike | None = None,
    split: str = "val",
    threads: int | None = None,
    verbose: bool = True,
    **export_options: Any,
) -> Path:
    """Export ``detector`` (raw network, or ``with_nms`` the decoded + NMS graph) and check it against eager.

    ``images``: normalised ``[N, 3, S, S]`` inputs for the parity check (default: held-out ``calib_dir``
    images, else seeded noise); ``eval_data``: a detection dataset (folder or ``digits``) whose ``split``
    scores the raw network's artefact against the eager detector (:func:`compare_ap`); ``export_options``
    go to :func:`mnv4.deploy.export.export` for the raw network (``calib_dir``, ``calib_samples``, ...).
    Returns the artefact's path; a failed parity check raises ``ParityError``.
    """
    from ..deploy.export import artefact_path
    from ..deploy.formats import get_format
    from ..deploy.parity import ParityError
    from ..deploy.writers import previous_artefact_kept

    info = get_format(fmt)
    # Defaults: the eager detector's own decoding (RetinaNet 0.05 / 0.5, SSDLite 0.001 / 0.55, 100 boxes),
    # so the graph gives what the eager model gives.
    m = detector.model
    score_thresh = m.score_thresh if score_thresh is None else score_thresh
    nms_thresh = m.nms_thresh if nms_thresh is None else nms_thresh
    max_det = m.detections_per_img if max_det is None else max_det
    check_float("score_thresh", score_thresh, 0.0, 1.0)
    check_float("nms_thresh", nms_thresh, 0.0, 1.0)
    check_int("max_det", max_det, 1)
    check_int("samples", samples, 1)
    if export_options.get("eval_dir") is not None:
        raise MNv4Error("a detector is evaluated on a detection dataset: pass it as `eval_data`, not `eval_dir`")
    export_options.pop("eval_dir", None)
    if eval_data is not None and with_nms:
        raise MNv4Error("AP before and after is measured on the raw network's export; drop `with_nms`")
    _check_eval_data(eval_data)
    name = f"{detector.head_kind}_{detector.config['backbone']}_{detector.image_size}"
    path = artefact_path(output, f"{name}_{'nms' if with_nms else precision}{info.suffix}", info)
    check_output_path(path, "output", folder=info.suffix == ".mlpackage")
    with previous_artefact_kept(path):  # a failed export never replaces a good one (docs/deploy.md)
        detector = detector.eval().float()
        if not with_nms:
            failed = None
            try:
                _export_raw(detector, fmt, path, precision, (samples, images), threads, verbose, export_options)
            except ParityError as e:  # the AP of an artefact that failed its check is still worth knowing
                failed = e
            if eval_data is not None and path.exists():
                compare_ap(detector, path, eval_data, split, threads=threads, verbose=verbose)
            if failed is not None:
                raise failed
            return path
        _check_nms_request(fmt, precision)
        info.require("fp32")
        if path.suffix.lower() != info.suffix:
            raise MNv4Error(f"a {fmt} artefact must end in {info.suffix}, got {path.name} (`output`)")
        x, source = _inputs(detector, samples, images)
        detector, weights = _realistic(detector, x)
        module = NMSNetwork(detector, score_thresh, nms_thresh, max_det).eval()
        _write_nms_graph(module, x[:1], fmt, path)
        report = _nms_parity(module, path, fmt, x, threads)
        report.update(format=fmt, artefact=str(path), inputs=source, weights=weights, min_match_iou=MIN_MATCH_IOU)
        if not report["detections"]:
            # an untrained RetinaNet starts every score at its 0.01 prior, under any useful threshold
            report["note"] = "no detection above score_thresh to compare: pass trained weights or real `images`"
        atomic_write_json(path.with_name(path.name + ".parity.json"), report)
        _sidecar(detector, path, "[N, 6] detections: x1, y1, x2, y2 (pixels), score, label", head=detector.head_kind)
        if verbose:
            print(
                f"{fmt} with NMS: {report['detections']} detections on {len(x)} inputs ({source}), "
                f"min matched IoU {report['min_iou']:.4f}, classes {'equal' if report['same_class'] else 'DIFFER'}"
                + (f" ({report['note']})" if "note" in report else "")
            )
        if not report["passed"]:
            raise ParityError(f"{path} failed its parity check: {'; '.join(report['failures'])}")
        return path
