"""Anchor coverage (mnv4.detect.anchors): which boxes some anchor can match, and the advice (docs/detection.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mnv4.detect import create_detector
from mnv4.detect.anchors import anchor_coverage, coverage_advice, fit_anchor_options
from mnv4.detect.formats import DetRecord
from mnv4.errors import MNv4Error

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
    assert "{min_ratio: auto, levels: auto}" in advice


def _squares(sides, image=320) -> list[DetRecord]:
    """One image per side: a square of that side (identity letterbox at 320 px)."""
    return [_record([[10, 10, 10 + s, 10 + s]], [i % 2], image, image) for i, s in enumerate(sides)]


def test_auto_anchors_fit_the_small_end_of_the_boxes():
    # a tenth of the boxes are 20 px, the rest 60 px: the smallest anchor goes to 20 px on a stride-8 map
    recs = _squares([20] * 10 + [60] * 90)
    opts, line = fit_anchor_options("ssdlite", {"min_ratio": "auto", "levels": "auto", "max_ratio": 0.9}, recs, 320)
    assert opts["levels"] == [2, 3, 4] and opts["min_ratio"] == pytest.approx(20 / 320, abs=2e-3)
    assert opts["max_ratio"] == 0.9  # what was not "auto" is kept
    assert "100 training boxes" in line and "levels [2, 3, 4]" in line and "min_ratio 0.06" in line
    # fitted boxes cover what SSD's defaults miss
    fitted = create_detector("ssdlite_mnv4_conv_small", classes=CLASSES, image_size=320, **opts)
    default = create_detector("ssdlite_mnv4_conv_small", classes=CLASSES, image_size=320)
    assert anchor_coverage(fitted.anchors(), recs, CLASSES, 320).covered == 1.0
    assert anchor_coverage(default.anchors(), recs, CLASSES, 320).covered < 0.96
    # only large boxes: no stride-8 map, and the smallest box is SSD's 0.2 x 320 = 64 px or the data's
    big, _ = fit_anchor_options("ssdlite", {"min_ratio": "auto", "levels": "auto"}, _squares([100] * 20), 320)
    assert big["levels"] == [3, 4] and big["min_ratio"] == pytest.approx(100 / 320, abs=2e-3)


def test_auto_anchors_never_go_below_what_the_first_map_can_match():
    # 6 px boxes: a stride-8 grid matches nothing that small, so the floor is 2 x 8 = 16 px (0.05 at 320)
    tiny = _squares([6] * 50)
    opts, _ = fit_anchor_options("ssdlite", {"min_ratio": "auto", "levels": "auto"}, tiny, 320)
    assert opts == {"min_ratio": 0.05, "levels": [2, 3, 4]}
    # levels fixed at [3, 4]: the floor is 2 x 16 = 32 px
    opts, _ = fit_anchor_options("ssdlite", {"min_ratio": "auto", "levels": [3, 4]}, tiny, 320)
    assert opts["min_ratio"] == 0.1
    # RetinaNet: its smallest anchor is anchor_scale x 8 px, from 2 (16 px) up to 8
    assert fit_anchor_options("retinanet", {"anchor_scale": "auto"}, tiny, 320)[0]["anchor_scale"] == 2.0
    assert fit_anchor_options("retinanet", {"anchor_scale": "auto"}, _squares([40] * 9), 320)[0]["anchor_scale"] == 5.0
    assert fit_anchor_options("retinanet", {"anchor_scale": "auto"}, _squares([300] * 9), 320)[0]["anchor_scale"] == 8.0


def test_explicit_ssd_scales_set_each_maps_boxes_and_are_checked(tmp_path):
    # levels [3, 4] + 4 extras = 6 maps: 7 scales; the first map's square boxes are scales[0] x 320 and
    # sqrt(scales[0] * scales[1]) x 320
    scales = [0.1, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0]
    det = create_detector("ssdlite_mnv4_conv_small", classes=CLASSES, image_size=320, scales=scales)
    a = det.anchors()
    side = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])).sqrt()
    assert side.min().item() == pytest.approx(32.0, abs=0.1)
    assert bool(((side - (0.1 * 0.3) ** 0.5 * 320).abs() < 0.1).any())
    from mnv4.detect.factory import load_detector
    from mnv4.detect.io import save_detector

    save_detector(det, tmp_path / "d.safetensors")  # the scales travel with the checkpoint
    assert torch.equal(load_detector(tmp_path / "d.safetensors").anchors(), a)
    with pytest.raises(MNv4Error, match="`scales` needs 7 numbers"):
        create_detector("ssdlite_mnv4_conv_small", classes=CLASSES, scales=[0.1, 0.2])
    with pytest.raises(MNv4Error, match="must increase"):
        create_detector("ssdlite_mnv4_conv_small", classes=CLASSES, scales=[0.1, 0.3, 0.2, 0.6, 0.75, 0.9, 1.0])


def test_fitted_ssd_scales_fit_the_boxes_better_than_the_linear_spread():
    from mnv4.detect.anchors import _class_mean_iou

    # two sizes, 24 px and 52 px (bccd's platelets and red cells at 320 px): SSD's linear spread from the
    # fitted min_ratio puts no box near 52 px; the fitted scales do
    recs = _squares([24] * 20 + [52] * 60)
    base = {"min_ratio": "auto", "levels": "auto"}
    linear, _ = fit_anchor_options("ssdlite", base, recs, 320)
    fitted, line = fit_anchor_options("ssdlite", {**base, "scales": "auto"}, recs, 320)
    assert len(fitted["scales"]) == 8 and fitted["scales"][0] == linear["min_ratio"] and "scales [" in line
    assert fitted == fit_anchor_options("ssdlite", {**base, "scales": "auto"}, recs, 320)[0]  # deterministic
    boxes = torch.tensor([[10.0, 10, 34, 34]] * 20 + [[10.0, 10, 62, 62]] * 60)
    labels = torch.tensor([0] * 20 + [1] * 60)

    def quality(opts):
        return _class_mean_iou(
            boxes, labels, create_detector("ssdlite_mnv4_conv_small", classes=CLASSES, **opts).anchors()
        )

    assert quality(fitted) > quality(linear) + 0.05


def test_auto_anchors_need_boxes_and_numbers_elsewhere():
    assert fit_anchor_options("ssdlite", {"min_ratio": 0.1}, [], 320) == ({"min_ratio": 0.1}, "")
    with pytest.raises(MNv4Error, match="training split has none"):
        fit_anchor_options("retinanet", {"anchor_scale": "auto"}, [_record([], [])], 320)
    # create_detector has no boxes to fit to: it says where auto is resolved
    with pytest.raises(MNv4Error, match="`min_ratio: auto`.*fit_anchor_options"):
        create_detector("ssdlite_mnv4_conv_small", classes=CLASSES, min_ratio="auto")
    with pytest.raises(MNv4Error, match="`levels` 'autox' is invalid: give a value or auto"):
        create_detector("ssdlite_mnv4_conv_small", classes=CLASSES, levels="autox")


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
