"""VGG-16 and VGG-19 with BatchNorm for 32x32 images (Simonyan and Zisserman, ICLR 2015).

The CIFAR variant: the five convolution stages of the paper, each 3x3 convolution followed by
BatchNorm and ReLU, a 2x2 max-pool after each stage (leaving a 1x1x512 map), and a single
linear classifier in place of the three fully connected layers. Convolutions keep their bias,
as in the widely used CIFAR code, so parameter counts match its published ones.
"""
from __future__ import annotations

import torch
from torch import nn

from ..validate import positive_int
from .registry import register_model

__all__ = ["CifarVGG", "vgg16", "vgg19"]

POOL = "M"
CONFIGS: dict[str, list[int | str]] = {
    "vgg16": [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL],
    "vgg19": [64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL,
              512, 512, 512, 512, POOL],
}


class CifarVGG(nn.Module):
    """Convolution stack built from ``config`` (channel counts, ``"M"`` for a max-pool), then Linear(512, classes)."""

    def __init__(self, config: list[int | str], num_classes: int = 10) -> None:
        super().__init__()
        num_classes = positive_int("num_classes", num_classes)
        layers: list[nn.Module] = []
        channels = 3
        for item in config:
            if item == POOL:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                width = int(item)
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("vgg16")
def vgg16(num_classes: int = 10) -> CifarVGG:
    """VGG-16 with BatchNorm, CIFAR variant (13 convolutions, one linear layer)."""
    return CifarVGG(CONFIGS["vgg16"], num_classes)


@register_model("vgg19")
def vgg19(num_classes: int = 10) -> CifarVGG:
    """VGG-19 with BatchNorm, CIFAR variant (16 convolutions, one linear layer)."""
    return CifarVGG(CONFIGS["vgg19"], num_classes)
