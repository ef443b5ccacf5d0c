"""Prediction heads: torchvision's RetinaNet and SSDLite heads, with mobile convs where the paper has them.

torchvision's ``RetinaNetClassificationHead`` / ``RetinaNetRegressionHead`` keep their forward (the
per-level reshape to ``[B, HWA, K]``) and their losses; mnv4 replaces only their conv towers and
predictor convs with depthwise-separable ones. ``SSDLiteHead`` is torchvision's as is.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.ssdlite import SSDLiteHead

from .layers import conv3x3, conv_bn_relu

__all__ = ["retinanet_head", "ssdlite_head", "ssdlite_extras", "PRIOR_PROBABILITY"]

PRIOR_PROBABILITY = 0.01  # focal-loss prior: every anchor starts at p(object) = 0.01 (RetinaNet's init)


def _init_tower(tower: nn.Module) -> None:
    for m in tower.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _last_conv(module: nn.Module) -> nn.Conv2d:
    return module if isinstance(module, nn.Conv2d) else [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1]


def retinanet_head(
    width: int, num_anchors: int, num_classes: int, num_convs: int = 4, separable: bool = True
) -> RetinaNetHead:
    """RetinaNet's class and box subnets: ``num_convs`` 3x3 conv-BN-ReLU layers of ``width`` channels, then
    a 3x3 predictor, all depthwise-separable when ``separable`` (the paper's mobile head)."""
    head = RetinaNetHead(width, num_anchors, num_classes, norm_layer=nn.BatchNorm2d)
    for sub in (head.classification_head, head.regression_head):
        sub.conv = nn.Sequential(*[conv_bn_relu(width, width, separable) for _ in range(num_convs)])
        _init_tower(sub.conv)
    head.classification_head.cls_logits = conv3x3(width, num_anchors * num_classes, separable)
    head.regression_head.bbox_reg = conv3x3(width, num_anchors * 4, separable)
    _init_tower(head.classification_head.cls_logits)
    _init_tower(head.regression_head.bbox_reg)
    prior = -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)
    nn.init.constant_(_last_conv(head.classification_head.cls_logits).bias, prior)
    return head


class _ExtraBlock(nn.Sequential):
    """SSDLite's extra feature layer: 1x1 reduce to half, depthwise 3x3 stride 2, 1x1 expand (BN + ReLU6)."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        mid = out_chs // 2
        super().__init__(
            *self._cbr(in_chs, mid, 1, 1, 1),
            *self._cbr(mid, mid, 3, 2, mid),
            *self._cbr(mid, out_chs, 1, 1, 1),
        )

    @staticmethod
    def _cbr(i: int, o: int, k: int, s: int, groups: int) -> list[nn.Module]:
        return [
            nn.Conv2d(i, o, k, s, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(o, eps=0.001, momentum=0.03),
            nn.ReLU6(inplace=True),
        ]


def ssdlite_extras(in_chs: int, widths: tuple[int, ...] = (512, 256, 256, 128)) -> nn.ModuleList:
    """The extra stride-2 layers past the backbone's last map (torchvision's SSDLite widths)."""
    blocks, chs = [], in_chs
    for w in widths:
        blocks.append(_ExtraBlock(chs, w))
        chs = w
    for m in blocks:
        for conv in m.modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.normal_(conv.weight, std=0.03)
    return nn.ModuleList(blocks)


def ssdlite_head(in_channels: list[int], num_anchors: list[int], num_classes_with_background: int) -> SSDLiteHead:
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    return SSDLiteHead(in_channels, num_anchors, num_classes_with_background, norm)


def head_outputs(head: nn.Module, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    out = head(features)
    return out["cls_logits"], out["bbox_regression"]
