"""The convolution layers the mobile detectors are made of, and the FPN built from torchvision's.

The paper's RetinaNet (docs/detection.md "The paper's detector") uses depthwise-separable 3x3 convs in
the FPN and in the prediction towers: a depthwise 3x3 followed by a pointwise 1x1, with one BatchNorm
and ReLU after the pair (as a separable conv layer is one layer with one norm). torchvision's
``FeaturePyramidNetwork`` and ``LastLevelP6P7`` provide the top-down wiring; mnv4 only swaps their
3x3 convs for separable ones where the configuration asks for it.
"""

from __future__ import annotations

from torch import nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

__all__ = ["separable_conv", "conv_bn_relu", "build_fpn"]


def separable_conv(in_chs: int, out_chs: int, stride: int = 1, bias: bool = True) -> nn.Sequential:
    """Depthwise 3x3 (stride ``stride``) then pointwise 1x1: the cost of a 3x3 conv at ~1/9 of the MACs."""
    return nn.Sequential(
        nn.Conv2d(in_chs, in_chs, 3, stride, 1, groups=in_chs, bias=False),
        nn.Conv2d(in_chs, out_chs, 1, bias=bias),
    )


def conv3x3(in_chs: int, out_chs: int, separable: bool, stride: int = 1, bias: bool = True) -> nn.Module:
    if separable:
        return separable_conv(in_chs, out_chs, stride, bias)
    return nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=bias)


def conv_bn_relu(in_chs: int, out_chs: int, separable: bool) -> nn.Sequential:
    """One tower layer: (separable) 3x3 conv, BatchNorm, ReLU; flat, so export's BN folding sees conv -> BN."""
    conv = conv3x3(in_chs, out_chs, separable, bias=False)
    layers = list(conv) if isinstance(conv, nn.Sequential) else [conv]
    return nn.Sequential(*layers, nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True))


def build_fpn(
    in_channels: list[int], width: int, separable: bool, p6p7_from: str = "p5", extra_levels: int = 2
) -> FeaturePyramidNetwork:
    """torchvision's FPN over ``in_channels`` (strides 8/16/32) with P6/P7 added by strided 3x3 convs.

    ``p6p7_from``: "p5" builds P6 from the FPN's P5 output (as TF Model Garden's FPN does), "c5" from
    the backbone's last map (torchvision's RetinaNet v1). The output convs get BatchNorm (the paper
    trains with BN throughout); with ``separable`` the 3x3 output and P6/P7 convs are depthwise-separable.
    """
    extra = None
    if extra_levels:
        src = width if p6p7_from == "p5" else in_channels[-1]
        extra = LastLevelP6P7(src, width)
        extra.use_P5 = p6p7_from == "p5"
        extra.p6 = conv3x3(src, width, separable, stride=2)
        extra.p7 = conv3x3(width, width, separable, stride=2)
    fpn = FeaturePyramidNetwork(in_channels, width, extra_blocks=extra, norm_layer=nn.BatchNorm2d)
    if separable:
        for i, block in enumerate(fpn.layer_blocks):
            # Conv2dNormActivation(conv, norm): keep its norm, swap the dense 3x3 for a separable one.
            fpn.layer_blocks[i] = nn.Sequential(*separable_conv(width, width, bias=False), block[1])
    return fpn
