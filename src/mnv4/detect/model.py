"""``Detector``: an MNv4 backbone, a neck and a head on torchvision's RetinaNet / SSD machinery.

torchvision's ``RetinaNet`` and ``SSD`` supply anchor matching, the box coder, the losses (focal /
hard-negative-mined softmax) and decoding with batched NMS; mnv4 supplies the backbone, the neck and
an input stage that only normalises. Images arrive already letterboxed to ``image_size`` by the data
pipeline, so nothing here resizes (torchvision's default transform would).

Labels are 0..num_classes-1 on both sides; SSD's softmax needs a background class 0, so the input
stage shifts target labels up by one and the output stage shifts predictions back.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.ssd import SSD

from ..errors import MNv4Error
from .heads import head_outputs, retinanet_head, ssdlite_extras, ssdlite_head
from .layers import build_fpn

__all__ = [
    "Detector",
    "RETINANET_OPTIONS",
    "SSDLITE_OPTIONS",
    "BOX_LOSSES",
    "FEATURE_LEVELS",
    "feature_levels",
    "feature_sizes",
]

# The paper's mobile RetinaNet (docs/detection.md "The paper's detector" explains each choice).
RETINANET_OPTIONS: dict[str, Any] = dict(
    width=256,
    num_convs=4,
    head_separable=True,
    fpn_separable=True,
    p6p7_from="p5",
    anchor_scale=4.0,
    box_loss="l1",
    bn_eps=None,
    bn_momentum=None,
)
# torchvision's RetinaNet box losses; "smooth_l1" (beta 1/9) is close to TF's Huber loss with delta 0.1.
BOX_LOSSES = ("l1", "smooth_l1", "giou", "diou", "ciou")
# feature_location "expansion" reads the backbone where torchvision's SSDLite reads MobileNetV3: the
# stride-16 map at the next block's 1x1 expansion and the stride-32 map after the 960 conv
# (docs/detection.md "SSDLite"); "stage" reads the stage ends.
SSDLITE_OPTIONS: dict[str, Any] = dict(
    extra_widths=[512, 256, 256, 128],
    feature_location="stage",
    levels=[3, 4],
    min_ratio=0.2,
    max_ratio=0.95,
    scales=None,
    bn_eps=None,
    bn_momentum=None,
)
# levels: the backbone levels SSDLite predicts on before its extras (features_only indices: 2 = stride 8,
# 3 = stride 16, 4 = stride 32); [2, 3, 4] adds a stride-8 map for small objects.
# min_ratio / max_ratio: SSD's default-box scales, as fractions of the image side, spread linearly over
# the maps (torchvision's DefaultBoxGenerator; 0.2-0.95 is SSD's and torchvision's SSDLite's: 64-304 px
# boxes at 320 px, too large for small objects: docs/detection.md "Anchors that fit the data").
# scales: instead of that linear spread, one scale per map plus one more (map k's boxes are scales[k] and
# sqrt(scales[k] * scales[k + 1])), e.g. fitted to a dataset's boxes ("auto").
# bn_eps / bn_momentum: the backbone's BatchNorm (None: PyTorch's 1e-5 / 0.1). torchvision's SSDLite
# trains its MobileNetV3 with 0.001 / 0.03, the values mnv4's SSDLite head and extras always use
# (docs/detection.md "SSDLite").
# Feature levels of MobileNetV4 (features_only out_indices) each neck reads: strides 8/16/32 and 16/32.
FEATURE_LEVELS = {"retinanet": (2, 3, 4), "ssdlite": (3, 4)}


def feature_levels(head: str, options: dict[str, Any]) -> tuple[int, ...]:
    """The backbone levels (features_only ``out_indices``) a head reads."""
    if head == "ssdlite":
        return tuple(options.get("levels", FEATURE_LEVELS["ssdlite"]))
    return FEATURE_LEVELS[head]


def ssd_default_boxes(options: dict[str, Any], count: int) -> DefaultBoxGenerator:
    """SSDLite's default boxes on ``count`` maps: ``scales`` when given, else min_ratio..max_ratio."""
    scales = options.get("scales")
    return DefaultBoxGenerator(
        [[2, 3]] * count,
        min_ratio=options.get("min_ratio", 0.2),
        max_ratio=options.get("max_ratio", 0.95),
        scales=list(scales) if scales is not None else None,
    )


def feature_sizes(image_size: int, first_stride: int, count: int) -> list[int]:
    """Side of each feature map: every stride-2 layer maps n -> ceil(n / 2) (symmetric padding)."""
    side = image_size
    for _ in range(int(math.log2(first_stride))):
        side = -(-side // 2)
    sizes = []
    for _ in range(count):
        sizes.append(side)
        side = -(-side // 2)
    return sizes


class _Neck(nn.Module):
    """Backbone levels -> the maps the head predicts on, as the ordered dict torchvision's models expect."""

    def __init__(self, body: nn.Module, head: str, options: dict[str, Any]) -> None:
        super().__init__()
        self.body = body
        chs = [info["num_chs"] for info in body.feature_info]
        self.head_kind = head
        if head == "retinanet":
            self.fpn = build_fpn(chs, options["width"], options["fpn_separable"], options["p6p7_from"])
            self.out_channels = options["width"]
        else:
            self.extras = ssdlite_extras(chs[-1], tuple(options["extra_widths"]))
            self.out_channels = [*chs, *options["extra_widths"]]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        levels = self.body(x)
        if self.head_kind == "retinanet":
            return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(levels)))
        maps = list(levels)
        for block in self.extras:
            maps.append(block(maps[-1]))
        return OrderedDict((str(i), f) for i, f in enumerate(maps))


class _NormaliseOnly(nn.Module):
    """Stands in for torchvision's GeneralizedRCNNTransform: checks size, normalises, batches; never resizes."""

    def __init__(self, image_size: int, mean, std, label_offset: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.label_offset = label_offset
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1), persistent=False)

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        s = self.image_size
        for img in images:
            if img.dim() != 3 or img.shape[0] != 3 or tuple(img.shape[1:]) != (s, s):
                raise MNv4Error(
                    f"the detector takes 3x{s}x{s} images (letterboxed by the data pipeline); got {tuple(img.shape)}"
                )
        batch = (torch.stack(images) - self.mean) / self.std
        if targets is not None and self.label_offset:
            targets = [{**t, "labels": t["labels"] + self.label_offset} for t in targets]
        return ImageList(batch, [(s, s)] * len(images)), targets

    def postprocess(self, detections: list[dict[str, torch.Tensor]], image_sizes=None, original_sizes=None):
        if self.label_offset:
            detections = [{**d, "labels": d["labels"] - self.label_offset} for d in detections]
        return detections


class Detector(nn.Module):
    """A detector on an MNv4 ``features_only`` backbone; see docs/detection.md for the interface.

    ``model(images, targets)`` in train mode returns ``{"classification", "bbox_regression"}`` losses;
    in eval mode ``model(images)`` returns one ``{"boxes", "scores", "labels"}`` dict per image.
    """

    def __init__(self, config: dict[str, Any], body: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.classes: list[str] = list(config["classes"])
        self.image_size: int = int(config["image_size"])
        # How images reach image_size (detect/transforms.py): the mode it was trained with, which evaluation,
        # prediction and export calibration must use too. Files from before the key: letterbox.
        self.resize: str = str(config.get("resize", "letterbox"))
        self.head_kind: str = config["head"]
        num_classes = len(self.classes)
        opts = config["head_options"]
        neck = _Neck(body, self.head_kind, opts)
        pre = config["preprocess"]
        first_stride = body.feature_info[0]["reduction"]
        if self.head_kind == "retinanet":
            n_levels = 5
            base = [opts["anchor_scale"] * first_stride * 2**i for i in range(n_levels)]
            sizes = tuple(tuple(b * 2 ** (j / 3) for j in range(3)) for b in base)
            anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * n_levels)
            head = retinanet_head(
                opts["width"],
                anchors.num_anchors_per_location()[0],
                num_classes,
                opts["num_convs"],
                opts["head_separable"],
            )
            head.regression_head._loss_type = opts.get("box_loss", "l1")  # torchvision's switch
            self.model = RetinaNet(neck, num_classes, anchor_generator=anchors, head=head, detections_per_img=100)
            offset = 0
        else:
            n_levels = len(neck.out_channels)
            anchors = ssd_default_boxes(opts, n_levels)
            head = ssdlite_head(neck.out_channels, anchors.num_anchors_per_location(), num_classes + 1)
            size = (self.image_size, self.image_size)
            self.model = SSD(
                neck,
                anchors,
                size,
                num_classes + 1,
                head=head,
                score_thresh=0.001,
                nms_thresh=0.55,
                detections_per_img=100,
                topk_candidates=300,
            )
            offset = 1
        self._grid = feature_sizes(self.image_size, first_stride, n_levels)
        self.model.transform = _NormaliseOnly(self.image_size, pre["mean"], pre["std"], offset)

    @property
    def backbone(self) -> nn.Module:
        """The MobileNetV4 ``features_only`` model."""
        return self.model.backbone.body

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        if self.training and targets is None:
            raise MNv4Error("a detector in train mode needs `targets`; call .eval() to predict")
        return self.model(images, targets)

    def network(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw graph on a normalised batch: ``(cls_logits [B, A, C], box_regression [B, A, 4])``.

        For SSDLite C is num_classes + 1 (column 0 is the background of its softmax)."""
        features = list(self.model.backbone(x).values())
        return head_outputs(self.model.head, features)

    def anchors(self) -> torch.Tensor:
        """Anchors for ``image_size`` in xyxy pixels, ``[A, 4]``, in the order ``network`` predicts them."""
        s = self.image_size
        images = ImageList(torch.empty(1, 3, s, s), [(s, s)])
        maps = [torch.empty(1, 1, g, g) for g in self._grid]
        return self.model.anchor_generator(images, maps)[0]

    def decode(
        self,
        cls_logits: torch.Tensor,
        box_regression: torch.Tensor,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        max_det: int = 100,
    ) -> list[dict[str, torch.Tensor]]:
        """torchvision's decoding (box coder, top-k, per-class batched NMS) of ``network``'s outputs."""
        m = self.model
        b, s = cls_logits.shape[0], self.image_size
        anchors = self.anchors().to(box_regression)
        saved = (m.score_thresh, m.nms_thresh, m.detections_per_img)
        m.score_thresh, m.nms_thresh, m.detections_per_img = score_thresh, nms_thresh, max_det
        try:
            outputs = {"cls_logits": cls_logits, "bbox_regression": box_regression}
            if self.head_kind == "retinanet":
                per_level = [g * g * (anchors.shape[0] // sum(g * g for g in self._grid)) for g in self._grid]
                split = {k: list(v.split(per_level, dim=1)) for k, v in outputs.items()}
                dets = m.postprocess_detections(split, [list(anchors.split(per_level))] * b, [(s, s)] * b)
            else:
                dets = m.postprocess_detections(outputs, [anchors] * b, [(s, s)] * b)
        finally:
            m.score_thresh, m.nms_thresh, m.detections_per_img = saved
        return m.transform.postprocess(dets)
