"""Error feedback: the residual each worker carries from one step to the next.

Each worker compresses ``x = g + m`` instead of its gradient ``g``; after the exchange
``m`` becomes what did not get across (Seide et al. 2014; Karimireddy et al. 2019). With
error feedback off, ``x = g`` and ``m`` stays zero.

Two flat buffers alternate: ``x`` is built in one while ``m`` is kept in the other, so a
step that is abandoned (for example skipped for a non-finite gradient) leaves ``m``
untouched, and no step allocates. Gradients that already form one flat vector are read in one
pass; with error feedback off and the caller's permission, ``x`` is that vector itself.

Two ways to hold less between steps, for sharded training where the residual is the memory
that matters: ``residual_dtype`` keeps ``m`` in a narrower dtype than ``x`` (float16 or
bfloat16 for float32 gradients: half the bytes; ``x`` is still built and selected in the
gradients' dtype, and the commit rounds the new residual once into ``m``, saturated at the
narrow dtype's largest finite value, so what rounding and saturation drop there is lost to
error feedback), and ``keep_spare=False`` lets :meth:`ErrorFeedback.release` drop ``x``'s
buffer at the end of each step (it is allocated again by the next step: one allocation per
step, no change to any value).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .comm.exchange import fill_at, put_at
from .layout import Layout

__all__ = ["ErrorFeedback"]


_HALF = (torch.float16, torch.bfloat16)


class ErrorFeedback:
    """Residual memory ``m`` and the compensated vector ``x`` of one worker. With ``wide``, both
    are kept in float32 when the gradients are float16/bfloat16 (for methods whose dense
    residual would lose too much to 16-bit rounding). ``residual_dtype``: ``m``'s dtype when it
    is to differ from ``x``'s (see the module's docstring); ``keep_spare``: keep ``x``'s buffer
    from one step to the next."""

    def __init__(self, enabled: bool, wide: bool = False, residual_dtype: torch.dtype | None = None,
                 keep_spare: bool = True) -> None:
        self.enabled = bool(enabled)
        self.wide = bool(wide)
        self.residual_dtype = residual_dtype
        self.keep_spare = bool(keep_spare)
        self._shape: tuple[int, torch.dtype, torch.device] | None = None
        self._m_dtype: torch.dtype | None = None
        self._m: torch.Tensor | None = None
        self._x: torch.Tensor | None = None

    def allocate(self, layout: Layout, residual: torch.Tensor | None = None) -> None:
        """(Re)create the buffers for ``layout``, optionally starting from a saved residual. With
        error feedback off nothing is allocated until a step needs a copy of the gradient."""
        d = layout.numel
        dtype = torch.float32 if self.wide and layout.dtype in _HALF else layout.dtype
        self._shape = (d, dtype, layout.device)
        self._m_dtype = self.residual_dtype or dtype
        self._m = self._x = None
        if self.enabled:
            self._m = torch.zeros(d, dtype=self._m_dtype, device=layout.device)
            if self.keep_spare:
                self._x = torch.empty(d, dtype=dtype, device=layout.device)
            if residual is not None:
                if residual.numel() != d:
                    raise ValueError(f"saved residual has {residual.numel()} elements, the gradients {d}")
                self._m.copy_(residual.reshape(-1))

    @property
    def residual(self) -> torch.Tensor:
        """The flat residual ``m`` (fresh zeros each time when error feedback is off)."""
        if self._shape is None:
            raise RuntimeError("no residual yet: reduce() has not been called")
        if self._m is None:
            d, _, device = self._shape
            zeros = torch.zeros(d, dtype=self._m_dtype, device=device)
            if not self.enabled:  # nothing kept for a reducer without error feedback
                return zeros
            self._m = zeros
        return self._m

    @property
    def allocated(self) -> bool:
        return self._shape is not None

    def _spare(self) -> torch.Tensor:
        """The buffer ``x`` is built in."""
        if self._x is None:
            assert self._shape is not None
            d, dtype, device = self._shape
            self._x = torch.empty(d, dtype=dtype, device=device)
        return self._x

    def compensate(self, grads: Sequence[torch.Tensor], layout: Layout,
                   tensors: Sequence[int] | None = None) -> torch.Tensor:
        """Build and return the flat ``x = g + m`` (``x = g`` when off), for all tensors or only
        those numbered in ``tensors``. ``x`` is an internal buffer: valid until the next commit,
        not to be handed to users."""
        x = self._spare()
        segments = layout.segments
        for i in range(len(segments)) if tensors is None else tensors:
            (a, b), g = segments[i], grads[i]
            if self.enabled:
                torch.add(self._m[a:b], g.reshape(-1), out=x[a:b])
            else:
                x[a:b].copy_(g.reshape(-1))
        return x

    def compensate_flat(self, g: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        """Build ``x = g + m`` from the whole flat gradient ``g`` in one pass. With error
        feedback off, ``x`` is ``g`` itself when ``overwrite`` allows the step to write into it
        (and the dtypes agree), else a copy."""
        if not self.enabled and overwrite and g.dtype == self._shape[1]:
            return g
        x = self._spare()
        if self.enabled:
            torch.add(self._m, g, out=x)
        else:
            x.copy_(g)
        return x

    def operands(self, g: torch.Tensor, overwrite: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What :meth:`compensate_flat` would read and write, for a caller that builds ``x`` itself
        (a fused selection pass): ``(m, buffer)``, ``x = g + m`` to be written into ``buffer``; m
        None: ``x`` is a copy of ``g`` in ``buffer``; both None: ``x`` is ``g`` itself. ``m`` may
        have another dtype than ``buffer`` (``residual_dtype``)."""
        if not self.enabled and overwrite and g.dtype == self._shape[1]:
            return None, None
        return (self._m if self.enabled else None), self._spare()

    def commit_sparse(self, x: torch.Tensor, sent: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        """The step went through: the new residual is ``x`` with the ``sent`` positions zeroed
        (set to ``kept`` when given: what rounding left of the values sent there)."""
        if self.enabled:
            if sent.numel():
                if kept is None:  # int32 positions converted a piece at a time, not all at once
                    fill_at(x, sent, 0)
                else:
                    put_at(x, sent, kept.to(x.dtype))
            self._swap(x)

    def commit_all(self, x: torch.Tensor) -> None:
        """Everything was sent: the residual becomes zero."""
        if self.enabled:
            x.zero_()
            self._swap(x)

    def commit_dense(self, x: torch.Tensor, approximation: torch.Tensor) -> None:
        """A dense approximation was sent: the residual is ``x - approximation``."""
        if self.enabled:
            x.sub_(approximation)
            self._swap(x)

    def commit_in_place(self, x: torch.Tensor) -> None:
        """``x`` already is the new residual (the caller subtracted what was sent)."""
        if self.enabled:
            self._swap(x)

    def _swap(self, x: torch.Tensor) -> None:
        """``x`` (the spare buffer) becomes the residual: the buffers trade places, or, for a
        residual of another dtype, ``x`` is rounded into ``m``."""
        if self._x is None or x.data_ptr() != self._x.data_ptr():
            raise RuntimeError("commit expects the buffer returned by compensate()")
        if self._m.dtype != x.dtype:
            self._m.copy_(x)
            if torch.finfo(self._m.dtype).max < torch.finfo(x.dtype).max:  # saturated, never inf
                top = torch.finfo(self._m.dtype).max
                self._m.nan_to_num_(nan=0.0, posinf=top, neginf=-top)
        else:
            self._m, self._x = self._x, self._m

    def release(self) -> None:
        """The step is over: drop ``x``'s buffer unless it is kept (``keep_spare``)."""
        if not self.keep_spare:
            self._x = None
