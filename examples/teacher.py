"""What the framework examples train on: random 28x28 images labelled by a fixed random linear
teacher (item i a pure function of i, so every run and every resume sees the same data), and a
short digest of the parameters to compare runs by."""
from __future__ import annotations

import hashlib
from typing import Iterable

import torch
from torch import nn


class Teacher(torch.utils.data.Dataset):
    """``size`` images; item i is ``(x_i, label_i)``, x_i drawn from a generator seeded with i."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.teacher = nn.Linear(784, 10).requires_grad_(False)
        torch.nn.init.normal_(self.teacher.weight, generator=torch.Generator().manual_seed(7))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(1000 + i))
        return x, self.teacher(x.flatten()).argmax()


def digest(params: Iterable[torch.Tensor]) -> str:
    """16 hex digits of the SHA-256 of the parameters' bytes (equal for bit-identical parameters)."""
    flat = torch.cat([p.detach().reshape(-1).cpu() for p in params])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]
