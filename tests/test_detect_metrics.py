"""COCO metrics: faster-coco-eval's numbers equal pycocotools' (the oracle) on a fixture; PR curve PNG."""

from __future__ import annotations

import numpy as np
import pytest

from mnv4.detect.formats import DetRecord
from mnv4.detect.metrics import STAT_NAMES, coco_dicts, coco_metrics, plot_pr_curve

from .conftest import require

require("faster_coco_eval")  # the detect extra; CI (MNV4_REQUIRE_RUNTIMES=1) fails instead of skipping
CLASSES = ["a", "b", "c", "never"]


def _fixture(seed: int = 0):
    """12 images of 640 x 480: small, medium and large boxes of 3 classes (class 3 never occurs), one image
    without boxes; predictions are jittered copies with random scores, some misses, false positives and
    wrong classes."""
    rng = np.random.default_rng(seed)
    records, preds = [], []
    for i in range(12):
        n = 0 if i == 5 else int(rng.integers(1, 7))
        side = rng.choice([12, 50, 150], size=n) * rng.uniform(0.8, 1.2, size=n)
        x1, y1 = rng.uniform(0, 400, n), rng.uniform(0, 300, n)
        boxes = np.stack([x1, y1, x1 + side, y1 + side * rng.uniform(0.6, 1.4, n)], 1).astype(np.float32)
        labels = rng.integers(0, 3, n)
        records.append(DetRecord(f"im{i}.jpg", 640, 480, boxes.reshape(-1, 4), labels))
        keep = rng.random(n) > 0.2
        pb = boxes[keep] + rng.normal(0, 4, (keep.sum(), 4)).astype(np.float32)
        pl = np.where(rng.random(keep.sum()) < 0.1, (labels[keep] + 1) % 3, labels[keep])
        fp = rng.uniform(0, 300, (2, 2))
        pb = np.concatenate([pb, np.concatenate([fp, fp + 40], 1).astype(np.float32)])
        pl = np.concatenate([pl, rng.integers(0, 3, 2)])
        preds.append({"boxes": pb, "scores": rng.random(len(pb)), "labels": pl})
    return records, preds


def _pycocotools(gt: dict, dets: list, cat_ids=None) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes(dets), "bbox")
    if cat_ids is not None:
        ev.params.catIds = cat_ids
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats


@pytest.mark.parametrize("seed", [0, 1])
def test_faster_coco_eval_equals_pycocotools(seed):
    require("pycocotools")  # the test extra
    records, preds = _fixture(seed)
    m = coco_metrics(records, preds, CLASSES)
    gt, dets = coco_dicts(records, preds, CLASSES)
    oracle = _pycocotools(gt, dets)
    ours = [getattr(m, name) for name in STAT_NAMES]
    np.testing.assert_allclose(ours, oracle, atol=1e-9)
    assert 0.05 < m.AP < 0.95 and m.AP_small >= 0 and m.AP_large >= 0  # a fixture that exercises every area
    for k, c in enumerate(CLASSES[:3]):  # per-class AP = pycocotools restricted to that class
        assert m.per_class_AP[c] == pytest.approx(_pycocotools(gt, dets, [k + 1])[0], abs=1e-9)
    assert m.per_class_AP["never"] is None
    assert m.num_images == 12 and m.num_boxes == len(gt["annotations"])


def test_crowd_regions_are_ignored_and_areas_kept_as_coco_does():
    """A detection on a crowd region is neither a hit nor a false positive, and COCO's area buckets use the
    annotation's `area` (a segment's) rather than the box's, as official COCO evaluation does."""
    require("pycocotools")
    box = np.array([[10, 10, 110, 110]], np.float32)  # 100 x 100 box: "medium" (32^2..96^2) by box area
    r = DetRecord("a.jpg", 200, 200, box, np.array([0]), areas=np.array([900.0], np.float32))  # segment: small
    r.crowd_boxes, r.crowd_labels = np.array([[120, 120, 190, 190]], np.float32), np.array([0])
    pred = {"boxes": np.array([[10, 10, 110, 110], [125, 125, 185, 185]]), "scores": np.array([0.8, 0.9])}
    pred["labels"] = np.array([0, 0])  # the crowd detection scores first: counted, it would halve AP
    m = coco_metrics([r], [pred], CLASSES)
    assert m.AP == pytest.approx(1.0) and m.num_boxes == 1  # the crowd detection is no false positive
    assert m.AP_small == pytest.approx(1.0) and m.AP_medium == -1.0  # bucketed by the 900 px^2 area
    gt, dets = coco_dicts([r], [pred], CLASSES)
    np.testing.assert_allclose([getattr(m, k) for k in STAT_NAMES], _pycocotools(gt, dets), atol=1e-9)
    plain = DetRecord("a.jpg", 200, 200, box, np.array([0]))  # without the crowd region: a false positive
    assert coco_metrics([plain], [pred], CLASSES).AP < 1.0


def test_perfect_and_empty_predictions():
    records, _ = _fixture()
    perfect = [{"boxes": r.boxes, "scores": np.ones(len(r.boxes)), "labels": r.labels} for r in records]
    m = coco_metrics(records, perfect, CLASSES)
    assert m.AP == pytest.approx(1.0) and m.AP50 == pytest.approx(1.0)
    empty = [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)} for _ in records]
    assert coco_metrics(records, empty, CLASSES).AP50 == 0.0


def test_pr_curve_png(tmp_path):
    records, preds = _fixture()
    m = coco_metrics(records, preds, CLASSES)
    assert m.pr50.shape == (4, 101)
    out = plot_pr_curve(m, CLASSES, tmp_path / "pr.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
