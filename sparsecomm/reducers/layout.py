"""The layout of a gradient list: shapes, dtype and device, flattened in parameter order."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["Layout", "bind_flat_gradients"]

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Layout:
    """Shapes and element type of the tensors a reducer is fed, and their flat offsets.

    The flat vector is the concatenation of the tensors in list order; tensor ``i`` occupies
    ``offsets[i]:offsets[i + 1]``. ``fingerprint`` is a 52-bit digest of shapes and dtype (it
    fits exactly in a float64, which is how ranks compare layouts).
    """

    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    device: torch.device
    offsets: tuple[int, ...] = field(init=False)
    fingerprint: int = field(init=False)

    def __post_init__(self) -> None:
        offsets = [0]
        for shape in self.shapes:
            n = 1
            for s in shape:
                n *= s
            offsets.append(offsets[-1] + n)
        object.__setattr__(self, "offsets", tuple(offsets))
        digest = hashlib.sha256(repr((self.shapes, str(self.dtype))).encode()).hexdigest()
        object.__setattr__(self, "fingerprint", int(digest[:13], 16))

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> "Layout":
        """The layout of ``tensors``; raises ``ValueError`` unless they share one floating dtype
        and one device."""
        tensors = list(tensors)
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"gradient {i} is a {type(t).__name__}, not a torch.Tensor")
        dtypes = {t.dtype for t in tensors}
        devices = {t.device for t in tensors}
        if len(dtypes) > 1:
            raise ValueError(f"gradients must share one dtype; got {sorted(map(str, dtypes))}")
        if len(devices) > 1:
            raise ValueError(f"gradients must live on one device; got {sorted(map(str, devices))}")
        dtype = dtypes.pop() if dtypes else torch.float32
        device = devices.pop() if devices else torch.device("cpu")
        if dtype not in _FLOATING:
            raise ValueError(f"gradients must be floating point ({', '.join(map(str, _FLOATING))}); "
                             f"got {dtype}")
        return cls(tuple(tuple(t.shape) for t in tensors), dtype, device)

    @property
    def numel(self) -> int:
        """d: the length of the flat vector."""
        return self.offsets[-1]

    @property
    def sizes(self) -> list[int]:
        return [b - a for a, b in zip(self.offsets, self.offsets[1:])]

    @property
    def segments(self) -> list[tuple[int, int]]:
        return list(zip(self.offsets, self.offsets[1:]))

    @property
    def index_dtype(self) -> torch.dtype:
        """int32 while every position fits (d < 2**31), else int64."""
        return torch.int32 if self.numel < 2**31 else torch.int64

    def describe(self) -> str:
        return f"{len(self.shapes)} tensors, {self.numel} elements, {str(self.dtype).replace('torch.', '')}"

    def difference(self, tensors: Sequence[torch.Tensor]) -> str | None:
        """A sentence naming the first way ``tensors`` differ from this layout, or None."""
        if len(tensors) != len(self.shapes):
            return f"expected {len(self.shapes)} gradients, got {len(tensors)}"
        for i, (t, shape) in enumerate(zip(tensors, self.shapes)):
            if tuple(t.shape) != shape:
                return f"gradient {i} has shape {tuple(t.shape)}, expected {shape}"
            if t.dtype != self.dtype:
                return f"gradient {i} has dtype {t.dtype}, expected {self.dtype}"
            if t.device != self.device:
                return f"gradient {i} is on {t.device}, expected {self.device}"
        return None

    def flatten(self, tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """Concatenate ``tensors`` into one flat vector (into ``out`` when given)."""
        if out is None:
            out = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        for (a, b), t in zip(self.segments, tensors):
            out[a:b].copy_(t.reshape(-1))
        return out

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` shaped like the original tensors."""
        return [flat[a:b].view(shape) for (a, b), shape in zip(self.segments, self.shapes)]

    def flat_view(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The one flat vector ``tensors`` are consecutive, contiguous views of, in this
        layout's order (as :func:`bind_flat_gradients` makes them); None when they are not."""
        if not tensors or self.numel == 0:
            return None
        i = next(i for i, t in enumerate(tensors) if t.numel())
        first = tensors[i]
        storage = first.untyped_storage()
        base = first.storage_offset() - self.offsets[i]
        if base < 0:
            return None
        for (a, _), t in zip(self.segments, tensors):
            if t.numel() == 0:
                continue
            if not t.is_contiguous() or t.untyped_storage().data_ptr() != storage.data_ptr() \
                    or t.storage_offset() != base + a:
                return None
        if storage.nbytes() < (base + self.numel) * first.element_size():
            return None
        return torch.empty(0, dtype=self.dtype, device=self.device).set_(storage, base, (self.numel,))


def bind_flat_gradients(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Give every parameter a ``.grad`` that is a view into one new zeroed flat buffer, in
    order, and return the buffer: backward then accumulates into it, and a reducer reads the
    gradients where backward wrote them (keep them with ``zero_grad(set_to_none=False)``).
    The parameters must share one dtype and device."""
    params = list(params)
    layout = Layout.of(params)
    flat = torch.zeros(layout.numel, dtype=layout.dtype, device=layout.device)
    for p, view in zip(params, layout.split(flat)):
        p.grad = view
    return flat
