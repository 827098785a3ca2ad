"""ResNet-20: the CIFAR ResNet of He et al., CVPR 2016, section 4.2.

A 3x3 convolution to 16 channels, three stages of 3 BasicBlocks with 16, 32 and 64 channels
on 32x32, 16x16 and 8x8 maps, global average pooling and a linear classifier. Shortcuts are
option A: identity, subsampled by 2 and zero-padded in channels where the stage changes, so
they hold no parameters. Weights start from He (Kaiming) normal initialisation, as in the paper.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..validate import positive_int
from .cifar_resnet import BasicBlock
from .registry import register_model

__all__ = ["PadShortcut", "pad_shortcut", "HeResNet", "resnet20"]


class PadShortcut(nn.Module):
    """Option A shortcut: keep every ``stride``-th pixel and zero-pad the channels evenly."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"a padding shortcut cannot shrink channels ({in_planes} -> {out_planes})")
        self.stride = stride
        self.pad_front = (out_planes - in_planes) // 2
        self.pad_back = out_planes - in_planes - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


def pad_shortcut(in_planes: int, out_planes: int, stride: int) -> PadShortcut | None:
    """Option A where the shape changes, else None (the identity)."""
    if stride == 1 and in_planes == out_planes:
        return None
    return PadShortcut(in_planes, out_planes, stride)


class HeResNet(nn.Module):
    """The 6n+2-layer CIFAR ResNet; ``blocks_per_stage`` is n (3 for ResNet-20)."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        n = positive_int("blocks_per_stage", blocks_per_stage)
        num_classes = positive_int("num_classes", num_classes)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers = []
        in_planes = 16
        for i, planes in enumerate((16, 32, 64)):
            for j in range(n):
                layers.append(BasicBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1, shortcut=pad_shortcut))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register_model("resnet20")
def resnet20(num_classes: int = 10) -> HeResNet:
    """ResNet-20 (269,722 parameters for 10 classes)."""
    return HeResNet(3, num_classes)
