"""Training augmentation and normalisation for the image benchmarks, and the split as a Dataset.

The published CIFAR set-ups (docs/benchmarks.md): random crop 32 with zero padding 4, then a
horizontal flip with probability 1/2, then (CIFAR-100 only) a rotation by a uniform angle in
[-15, 15] degrees, then per-channel normalisation; MNIST and Fashion-MNIST are only
normalised; evaluation is only normalised.

Determinism: a sample's random crop offsets, flip and angle are a hash of
``(seed, epoch, index)`` (splitmix64), not draws from a global generator. A sample is therefore
augmented the same way however it is batched, whichever DataLoader worker reads it and
whatever the world size, and two runs with the same seed see identical inputs. Results are
bit-identical on one device type; the rotation resamples with ``grid_sample`` (nearest), where
CPU and CUDA may disagree on a pixel lying exactly on a rounding boundary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as tvf

from .images import ImageSet

__all__ = ["Augmentation", "NORMALIZATION", "TRAIN_AUGMENTATION", "sample_uniforms", "augment", "normalize",
           "ImageDataset"]

# Per-channel (mean, std) of the training images as the published code uses them:
# CIFAR-10 from kuangliu/pytorch-cifar (the std there is the commonly copied 0.2023, ...),
# CIFAR-100 from weiaicunzai/pytorch-cifar100, MNIST from the PyTorch examples.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}


@dataclass(frozen=True)
class Augmentation:
    """Random crop after zero padding of ``crop_padding``, horizontal flip, rotation by up to +-``rotation`` degrees."""

    crop_padding: int = 0
    hflip: bool = False
    rotation: float = 0.0

    def __post_init__(self) -> None:
        if self.crop_padding < 0 or not 0 <= self.rotation <= 180:
            raise ValueError(f"bad augmentation {self}: crop_padding must be >= 0, rotation in [0, 180] degrees")

    @property
    def identity(self) -> bool:
        return self.crop_padding == 0 and not self.hflip and self.rotation == 0


TRAIN_AUGMENTATION: dict[str, Augmentation] = {
    "cifar10": Augmentation(crop_padding=4, hflip=True),
    "cifar100": Augmentation(crop_padding=4, hflip=True, rotation=15.0),
    "mnist": Augmentation(),
    "fashion-mnist": Augmentation(),
}

_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M
        return x ^ (x >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, indices: torch.Tensor | Sequence[int], count: int) -> np.ndarray:
    """``[len(indices), count]`` float64 numbers in [0, 1), each a hash of (seed, epoch, index, column)."""
    idx = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).astype(np.uint64).reshape(-1)
    key = _splitmix64(_splitmix64(np.full(1, seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)) ^ np.uint64(epoch))
    key = _splitmix64(key ^ idx)[:, None] ^ np.arange(1, count + 1, dtype=np.uint64)[None, :]
    return (_splitmix64(key) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def augment(images: torch.Tensor, aug: Augmentation, uniforms: np.ndarray) -> torch.Tensor:
    """Augment a uint8 batch ``[B, C, H, W]`` with per-sample draws ``uniforms`` ``[B, >= 4]`` (same dtype out)."""
    if aug.identity:
        return images
    b, c, h, w = images.shape
    u = torch.as_tensor(uniforms[:, :4], dtype=torch.float64).to(images.device)
    out = images
    if aug.crop_padding:
        p = aug.crop_padding
        dy = (u[:, 0] * (2 * p + 1)).long().clamp_(max=2 * p)
        dx = (u[:, 1] * (2 * p + 1)).long().clamp_(max=2 * p)
        padded = nnf.pad(images, (p, p, p, p))
        rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
        batch = torch.arange(b, device=images.device)[:, None, None, None]
        chan = torch.arange(c, device=images.device)[None, :, None, None]
        out = padded[batch, chan, rows, cols]
    if aug.hflip:
        out = torch.where((u[:, 2] < 0.5)[:, None, None, None], out.flip(-1), out)
    if aug.rotation:
        out = _rotate(out, (2 * u[:, 3] - 1) * aug.rotation)
    return out


def _rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image counter-clockwise about its centre (nearest, zero fill), as torchvision's ``rotate``."""
    a = degrees.to(images.device) * (math.pi / 180)
    cos, sin = torch.cos(a), torch.sin(a)
    h, w = images.shape[-2:]
    # affine_grid maps output to input coordinates in [-1, 1]; the aspect terms keep square pixels.
    theta = torch.stack([torch.stack([cos, -sin * h / w, torch.zeros_like(a)], -1),
                         torch.stack([sin * w / h, cos, torch.zeros_like(a)], -1)], 1)
    grid = nnf.affine_grid(theta.float(), list(images.shape), align_corners=False)
    out = nnf.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round_().to(images.dtype) if not images.is_floating_point() else out


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (``[..., C, H, W]``) to float32 in [0, 1], then ``(x - mean) / std`` per channel."""
    return tvf.normalize(tvf.to_dtype(images, torch.float32, scale=True), list(mean), list(std))


class ImageDataset(Dataset):
    """One split of an :class:`ImageSet` yielding ``(float32 [C, H, W], label)``, augmented when ``train``.

    ``augmentation`` and ``normalization`` default to the data set's entries in
    :data:`TRAIN_AUGMENTATION` and :data:`NORMALIZATION`. Call :meth:`set_epoch` at the start
    of each epoch (a DataLoader with ``persistent_workers=True`` keeps its own copies and does
    not see it). :meth:`batch` gathers and transforms a whole batch at once, on ``device``.
    """

    def __init__(self, data: ImageSet, train: bool, seed: int = 0, augmentation: Augmentation | None = None,
                 normalization: tuple[Sequence[float], Sequence[float]] | None = None,
                 device: torch.device | str = "cpu") -> None:
        if normalization is None and data.name not in NORMALIZATION:
            raise ValueError(f"no default normalisation for data set {data.name!r} "
                             f"(known: {sorted(NORMALIZATION)}); pass normalization=(mean, std)")
        self.name, self.split, self.train, self.seed, self.epoch = data.name, data.split, train, seed, 0
        self.images = data.images.permute(0, 3, 1, 2).to(device)  # [N, C, H, W] view on CPU
        self.labels = data.labels.to(device)
        self.classes = data.classes
        self.augmentation = (augmentation or TRAIN_AUGMENTATION.get(data.name, Augmentation())) if train \
            else Augmentation()
        self.mean, self.std = normalization or NORMALIZATION[data.name]
        if len(self.mean) != self.images.shape[1] or len(self.std) != self.images.shape[1]:
            raise ValueError(f"normalisation {self.mean}, {self.std} does not fit {self.images.shape[1]} channels")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.labels.numel()

    def batch(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformed images ``[B, C, H, W]`` and labels ``[B]`` of the given examples."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[idx.to(self.images.device)]
        if not self.augmentation.identity:
            x = augment(x, self.augmentation, sample_uniforms(self.seed, self.epoch, idx, 4))
        return normalize(x, self.mean, self.std), self.labels[idx.to(self.labels.device)]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.batch([index])
        return x[0], int(y[0])
