"""Anchor coverage (mnv4.detect.anchors): which boxes some anchor can match, and the advice (docs/detection.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mnv4.detect import create_detector
from mnv4.detect.anchors import anchor_coverage, coverage_advice
from mnv4.detect.formats import DetRecord

CLASSES = ["big", "small"]


def _record(boxes, labels, width=640, height=480) -> DetRecord:
    return DetRecord("x.jpg", width, height, np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64))


def test_an_anchor_sized_box_is_covered_and_a_tiny_one_is_not():
    anchors = torch.tensor([[0.0, 0.0, 64.0, 64.0], [64.0, 0.0, 128.0, 64.0]])
    # a 320 x 320 image letterboxed to 320: identity geometry
    rec = _record([[2, 2, 62, 62], [70, 5, 80, 15], [64, 0, 128, 64]], [0, 1, 0], 320, 320)
    cov = anchor_coverage(anchors, [rec, _record([], [])], CLASSES, 320)
    assert cov.boxes == 3  # the negative image adds nothing
    assert cov.covered == pytest.approx(2 / 3)
    assert cov.per_class == {"big": 1.0, "small": 0.0}
    assert cov.smallest_anchor == pytest.approx(64.0)


def test_boxes_are_measured_where_the_letterbox_puts_them():
    # 640 x 480 -> scale 0.5, 40 px of padding on top: the box [0, 0, 128, 128] lands on [0, 40, 64, 104]
    anchors = torch.tensor([[0.0, 40.0, 64.0, 104.0]])
    rec = _record([[0, 0, 128, 128]], [0])
    assert anchor_coverage(anchors, [rec], CLASSES, 320).covered == 1.0
    assert anchor_coverage(anchors - torch.tensor([0.0, 40.0, 0.0, 40.0]), [rec], CLASSES, 320).covered == 0.0
    # fixed mode stretches each axis: y scale 320/480, so the box becomes 64 x 85 at the top: IoU 0.75
    top = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    assert anchor_coverage(top, [rec], CLASSES, 320, mode="fixed").covered == 1.0


def test_smaller_ssd_boxes_and_a_stride8_map_cover_small_objects():
    # 20 px objects on a 320 px image: SSD's default boxes (64 px and up) match none of them
    recs = [_record([[x, y, x + 20, y + 20] for x in range(10, 300, 60) for y in (40, 200)], [1] * 10, 320, 320)]
    default = create_detector("ssdlite_mnv4_conv_small", classes=CLASSES, image_size=320)
    small = create_detector(
        "ssdlite_mnv4_conv_small", classes=CLASSES, image_size=320, levels=[2, 3, 4], min_ratio=0.05
    )
    low = anchor_coverage(default.anchors(), recs, CLASSES, 320)
    high = anchor_coverage(small.anchors(), recs, CLASSES, 320)
    assert low.covered == 0.0 and high.covered == 1.0
    advice = coverage_advice(low, "ssdlite", default.config["head_options"])
    assert "0% of 10 training boxes" in advice and "levels: [2, 3, 4]" in advice
    assert "`min_ratio` (now 0.2; 0.06 fits the smallest tenth of boxes)" in advice  # 20 px / 320 px
    assert "small boxes" not in coverage_advice(high, "ssdlite", small.config["head_options"])
    assert "`anchor_scale` (now 4)" in coverage_advice(low, "retinanet", {"anchor_scale": 4.0})


def test_large_sets_are_sampled_not_swept():
    anchors = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    recs = [_record([[0, 0, 64, 64]], [0], 320, 320)] * 50 + [_record([[0, 0, 8, 8]], [1], 320, 320)] * 50
    assert anchor_coverage(anchors, recs, CLASSES, 320, max_images=10).boxes == 10


@pytest.mark.parametrize("mode", ["letterbox", "fixed"])
def test_boxes_land_where_the_training_resize_puts_them(mode):
    # the coverage must see the boxes the model is trained on: compare with transforms.letterbox itself
    from torchvision import tv_tensors

    from mnv4.detect.anchors import _letterboxed
    from mnv4.detect.transforms import letterbox

    rec = _record([[3, 7, 150, 90], [200, 11, 333, 201]], [0, 1], width=337, height=203)
    image = torch.zeros(3, rec.height, rec.width, dtype=torch.uint8)
    boxes = tv_tensors.BoundingBoxes(torch.as_tensor(rec.boxes), format="XYXY", canvas_size=(rec.height, rec.width))
    _, moved, _ = letterbox(image, boxes, 96, mode)
    torch.testing.assert_close(_letterboxed(rec, 96, mode), moved.as_subclass(torch.Tensor).float(), atol=1e-3, rtol=0)
