"""Bit packing: unsigned codes of ``width`` bits (1 to 8) stored ``8 / width`` to a byte, so
that quantized values travel at their real size (1 bit per sign, 2 per ternary value, ...).

Format: codes are taken in groups of eight; a group is one little-endian integer of ``width``
bytes in which code j occupies bits ``[width * j, width * (j + 1))``. The last group is padded
with zero codes, so ``n`` codes take ``ceil(n * width / 8)`` bytes and the padding bits are 0.
Plain torch (shifts and masks on uint8; on int64 for widths 3, 5, 6 and 7), the same on CPU
and CUDA; no host round-trip.
"""
from __future__ import annotations

import torch

__all__ = ["packed_bytes", "pack_bits", "unpack_bits", "code_width"]


def code_width(largest: int) -> int:
    """Bits needed for codes 0..largest (at least 1)."""
    return max(1, int(largest).bit_length())


def packed_bytes(n: int, width: int) -> int:
    """Bytes taken by ``n`` codes of ``width`` bits."""
    _check_width(width)
    return (n * width + 7) // 8


def _check_width(width: int) -> None:
    if not 1 <= width <= 8:
        raise ValueError(f"code width must be 1 to 8 bits, got {width}")


def pack_bits(codes: torch.Tensor, width: int) -> torch.Tensor:
    """A uint8 tensor of ``packed_bytes(n, width)`` bytes holding the ``n`` codes (an integer
    tensor, values in ``[0, 2**width)``; higher bits are dropped)."""
    _check_width(width)
    codes = codes.reshape(-1)
    n = codes.numel()
    if width == 8:
        return codes.to(torch.uint8)
    if 8 % width == 0:  # 1, 2, 4: whole codes per byte, all in uint8
        per = 8 // width
        padded = torch.zeros(packed_bytes(n, width) * per, dtype=torch.uint8, device=codes.device)
        padded[:n] = codes
        padded.bitwise_and_((1 << width) - 1)
        cols = padded.view(-1, per)
        out = cols[:, 0].clone()
        for j in range(1, per):
            out.bitwise_or_(cols[:, j] << (width * j))
        return out
    groups = (n + 7) // 8
    padded = torch.zeros(groups * 8, dtype=torch.int64, device=codes.device)
    padded[:n] = codes
    padded.bitwise_and_((1 << width) - 1)
    cols = padded.view(groups, 8)
    acc = cols[:, 0].clone()
    for j in range(1, 8):
        acc.bitwise_or_(cols[:, j] << (width * j))
    out = torch.empty(groups, width, dtype=torch.uint8, device=codes.device)
    for b in range(width):
        out[:, b] = (acc >> (8 * b)).bitwise_and_(0xFF)
    return out.view(-1)[:packed_bytes(n, width)]


def unpack_bits(data: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """The ``n`` codes (uint8) packed in ``data`` by :func:`pack_bits`."""
    _check_width(width)
    if data.numel() < packed_bytes(n, width):
        raise ValueError(f"{data.numel()} bytes cannot hold {n} codes of {width} bits")
    if width == 8:
        return data[:n].clone()
    mask = (1 << width) - 1
    if 8 % width == 0:
        per = 8 // width
        data = data[:packed_bytes(n, width)]
        out = torch.empty(data.numel(), per, dtype=torch.uint8, device=data.device)
        for j in range(per):
            out[:, j] = (data >> (width * j)).bitwise_and_(mask)
        return out.view(-1)[:n]
    groups = (n + 7) // 8
    raw = torch.zeros(groups * width, dtype=torch.int64, device=data.device)
    raw[:packed_bytes(n, width)] = data[:packed_bytes(n, width)]
    rows = raw.view(groups, width)
    acc = rows[:, 0].clone()
    for b in range(1, width):
        acc.bitwise_or_(rows[:, b] << (8 * b))
    out = torch.empty(groups, 8, dtype=torch.uint8, device=data.device)
    for j in range(8):
        out[:, j] = (acc >> (width * j)).bitwise_and_(mask)
    return out.view(-1)[:n]
