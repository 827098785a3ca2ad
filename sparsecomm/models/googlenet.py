"""GoogLeNet (Inception v1, Szegedy et al., CVPR 2015) for 32x32 images.

The CIFAR variant of the widely used pytorch-cifar code: the ImageNet stem is replaced by one
3x3 convolution to 192 channels; then inception modules 3a-3b, a stride-2 max-pool, 4a-4e,
another, 5a-5b (8x8 maps, 1024 channels), global average pooling and a linear classifier; no
auxiliary heads. Every convolution is followed by BatchNorm and ReLU, and the "5x5" branch is
two 3x3 convolutions. Convolutions keep their bias, as in that code, so parameter counts match.
"""
from __future__ import annotations

import torch
from torch import nn

from ..validate import positive_int
from .registry import register_model

__all__ = ["Inception", "CifarGoogLeNet", "googlenet"]


def _conv_bn_relu(in_planes: int, out_planes: int, kernel_size: int) -> list[nn.Module]:
    return [nn.Conv2d(in_planes, out_planes, kernel_size, padding=kernel_size // 2),
            nn.BatchNorm2d(out_planes), nn.ReLU(inplace=True)]


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: 1x1; 1x1 then 3x3; 1x1 then two 3x3;
    3x3 max-pool then 1x1."""

    def __init__(self, in_planes: int, n1x1: int, n3x3_reduce: int, n3x3: int, n5x5_reduce: int, n5x5: int,
                 pool_proj: int) -> None:
        super().__init__()
        self.branch1 = nn.Sequential(*_conv_bn_relu(in_planes, n1x1, 1))
        self.branch2 = nn.Sequential(*_conv_bn_relu(in_planes, n3x3_reduce, 1), *_conv_bn_relu(n3x3_reduce, n3x3, 3))
        self.branch3 = nn.Sequential(*_conv_bn_relu(in_planes, n5x5_reduce, 1), *_conv_bn_relu(n5x5_reduce, n5x5, 3),
                                     *_conv_bn_relu(n5x5, n5x5, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *_conv_bn_relu(in_planes, pool_proj, 1))
        self.out_planes = n1x1 + n3x3 + n5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


# (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection) per module, from the paper's Table 1;
# None marks a stride-2 max-pool.
MODULES: list[tuple[int, int, int, int, int, int] | None] = [
    (64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), None,
    (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64),
    (112, 144, 288, 32, 64, 64), (256, 160, 320, 32, 128, 128), None,
    (256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128),
]


class CifarGoogLeNet(nn.Module):
    """3x3 stem to 192 channels, nine inception modules, global average pooling, linear classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        num_classes = positive_int("num_classes", num_classes)
        self.stem = nn.Sequential(*_conv_bn_relu(3, 192, 3))
        layers: list[nn.Module] = []
        channels = 192
        for spec in MODULES:
            if spec is None:
                layers.append(nn.MaxPool2d(3, stride=2, padding=1))
            else:
                module = Inception(channels, *spec)
                layers.append(module)
                channels = module.out_planes
        self.inception = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inception(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


@register_model("googlenet")
def googlenet(num_classes: int = 10) -> CifarGoogLeNet:
    """GoogLeNet, CIFAR variant."""
    return CifarGoogLeNet(num_classes)
