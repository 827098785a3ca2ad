"""A small CNN for 28x28 grey images (MNIST, Fashion-MNIST): quick CPU runs.

The network of the PyTorch examples' MNIST script: two 3x3 convolutions (32, 64 channels)
with ReLU, a 2x2 max-pool, dropout 0.25, a 128-unit hidden layer with ReLU and dropout 0.5,
and a linear classifier. It returns logits (the script returns log-probabilities); train it
with ``CrossEntropyLoss``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..validate import positive_int
from .registry import register_model

__all__ = ["MnistCNN"]


@register_model("mnist_cnn")
class MnistCNN(nn.Module):
    """conv(1,32,3)-ReLU-conv(32,64,3)-ReLU-maxpool2-dropout-Linear(9216,128)-ReLU-dropout-Linear(128,classes);
    1,199,882 parameters for 10 classes. Input [N, 1, 28, 28]."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        num_classes = positive_int("num_classes", num_classes)
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True),
            nn.MaxPool2d(2), nn.Dropout(0.25),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * 12 * 12, 128), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
