"""SENet-18 for 32x32 images: ResNet-18 with squeeze-and-excitation (Hu et al., CVPR 2018).

The CIFAR variant used by the widely used pytorch-cifar code: a 3x3 stem with BatchNorm and
ReLU, then pre-activation blocks (BN-ReLU-conv twice, He et al., ECCV 2016) in stages of
[2, 2, 2, 2] with 64/128/256/512 planes; each block rescales its residual branch by channel
weights from global average pooling and a two-layer bottleneck (reduction 16, 1x1 convolutions
with bias) before adding the shortcut, which is a bias-free 1x1 convolution of the
pre-activated input where the shape changes. Like that code there is no final BN-ReLU before
pooling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..validate import positive_int
from .registry import register_model

__all__ = ["SqueezeExcite", "PreActSEBlock", "SENet", "senet18"]


class SqueezeExcite(nn.Module):
    """Channel gates: sigmoid(W2 relu(W1 mean_hw(x))), with W1, W2 as 1x1 convolutions."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.adaptive_avg_pool2d(x, 1)
        w = torch.sigmoid(self.expand(F.relu(self.reduce(w))))
        return x * w


class PreActSEBlock(nn.Module):
    """Pre-activation basic block whose residual branch passes through squeeze-and-excitation."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, reduction: int = 16) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.se = SqueezeExcite(planes, reduction)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return self.se(out) + shortcut


class SENet(nn.Module):
    """3x3 stem, four stages of SE blocks, global average pooling, linear classifier."""

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, reduction: int = 16) -> None:
        super().__init__()
        num_classes = positive_int("num_classes", num_classes)
        reduction = positive_int("reduction", reduction)
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages = []
        in_planes = 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks)):
            stage = []
            for j in range(count):
                stage.append(PreActSEBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1, reduction=reduction))
                in_planes = planes
            stages.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register_model("senet18")
def senet18(num_classes: int = 10) -> SENet:
    """SENet-18, CIFAR variant (reduction 16)."""
    return SENet((2, 2, 2, 2), num_classes)
