"""ResNet-18 and ResNet-152 for 32x32 images (the CIFAR variant of He et al., CVPR 2016).

The ImageNet networks with the 7x7 stride-2 stem and the max-pool replaced by one 3x3
stride-1 convolution, as in the CIFAR code most compression papers train. Module names follow
torchvision (``conv1``, ``bn1``, ``layer1``..``layer4``, ``downsample``, ``fc``), so the
parameter list equals torchvision's ResNet with that stem, in the same order.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..validate import positive_int
from .registry import register_model

__all__ = ["BasicBlock", "Bottleneck", "CifarResNet", "resnet18", "resnet152"]


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    """The 1x1 convolution + BatchNorm shortcut where the shape changes (option B), else None."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))


Shortcut = Callable[[int, int, int], "nn.Module | None"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut: the identity where the shape stays,
    else what ``shortcut(in_planes, planes, stride)`` builds (default: the projection)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: Shortcut = _projection) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, with BatchNorm after each."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    """3x3 stem (64 channels), four stages of 64/128/256/512 planes (stride 1, 2, 2, 2),
    global average pooling and a linear classifier."""

    def __init__(self, block: type[BasicBlock | Bottleneck], blocks: Sequence[int], num_classes: int = 10) -> None:
        super().__init__()
        num_classes = positive_int("num_classes", num_classes)
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 64
        stages = []
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks)):
            stage = []
            for j in range(count):
                stage.append(block(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.avgpool(out), 1))


@register_model("resnet18")
def resnet18(num_classes: int = 10) -> CifarResNet:
    """ResNet-18, CIFAR variant: BasicBlocks [2, 2, 2, 2] (11,173,962 parameters for 10 classes)."""
    return CifarResNet(BasicBlock, (2, 2, 2, 2), num_classes)


@register_model("resnet152")
def resnet152(num_classes: int = 10) -> CifarResNet:
    """ResNet-152, CIFAR variant: Bottlenecks [3, 8, 36, 3]."""
    return CifarResNet(Bottleneck, (3, 8, 36, 3), num_classes)
