"""The CPU side of :mod:`~sparsecomm.reducers.select.fused`: a small C loop that writes
``x = m + g``, checks finiteness, applies the threshold and compacts the passing (index, value)
pairs in one pass. Built with the system C compiler on first use (cached by source hash under
``$SPARSECOMM_CACHE`` or ``~/.cache/sparsecomm``; processes starting together build it once)
and called through ctypes.

The loop is single-threaded (one torch thread per process, as the benchmarks run it) and walks
groups of 16 that the compiler vectorises, keeping its flags per lane. Why a C loop and not
``torch.compile`` or ``load_inline``: docs/reducers.md, *Choices*; its speed:
docs/benchmarks.md, *Selection in one pass*.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import torch

__all__ = ["available", "unavailable_reason", "compensate_select", "compensate_select_ranges", "keep_top"]

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
/* x = m + g over [0, n) (m NULL: x = g; x NULL: nothing is written); *bad = 1 when some x is
   NaN or +-Inf; positions i in [start, end) with |x[i]| >= thr (when use_thr) go, ascending,
   to idx/val while fewer than cap are there. Returns how many passed (may exceed cap).
   Groups of 16: one loop the compiler vectorises computes, stores and tests a group (flags
   kept per lane: a branch or a scalar reduction per element would cost twice the time); only
   a group where something passed is scanned again for its positions. */
#define GROUP 16
#define LOOP(T, U, S, EXP, I, ABS, V, MB, XB, STORE, SEL)                                         \
  for (; i + GROUP <= hi; i += GROUP) {                                                         \
    const T *restrict gp = g + i, *restrict mp = MB + i; T *restrict xp = (T *)XB + i;          \
    S hit[GROUP]; S h = 0; T loc[GROUP]; /* loc: stores seed the vectoriser when x is not written */ \
    for (int k = 0; k < GROUP; k++) {                                                           \
      T v = V(k); U b; memcpy(&b, &v, sizeof b); if (STORE) xp[k] = v; else loc[k] = v;          \
      nf[k] |= -(S)((b & EXP) == EXP); hit[k] = SEL ? -(S)(ABS(v) >= thr) : 0;                  \
    }                                                                                           \
    if (SEL) { for (int k = 0; k < GROUP; k++) h |= hit[k]; }                                   \
    if (SEL && h) for (int k = 0; k < GROUP; k++) {                                             \
      T v = STORE ? xp[k] : loc[k];                                                             \
      if (ABS(v) >= thr) { if (c < cap) { idx[c] = (I)(i + k); val[c] = v; } c++; }             \
    }                                                                                           \
  }                                                                                             \
  for (; i < hi; i++) {                                                                         \
    const T *gp = g + i, *mp = MB + i; T *xp = (T *)XB + i;                                     \
    T v = V(0); U b; memcpy(&b, &v, sizeof b); if (STORE) xp[0] = v;                            \
    nf[0] |= -(S)((b & EXP) == EXP);                                                            \
    if (SEL && ABS(v) >= thr) { if (c < cap) { idx[c] = (I)i; val[c] = v; } c++; }              \
  }
#define VM(k) (mp[k] + gp[k])
#define VG(k) (gp[k])
#define REGIONS(T, U, S, EXP, I, ABS, V, MB, XB, STORE)                                           \
  hi = start; LOOP(T, U, S, EXP, I, ABS, V, MB, XB, STORE, 0)                                   \
  hi = end; LOOP(T, U, S, EXP, I, ABS, V, MB, XB, STORE, 1)                                     \
  hi = n; LOOP(T, U, S, EXP, I, ABS, V, MB, XB, STORE, 0)
#define DEFINE(NAME, T, U, S, EXP, I, ABS)                                                        \
int64_t NAME(const T *restrict g, const T *restrict m, T *restrict x, int64_t n, int64_t start, \
             int64_t end, T thr, int use_thr, I *restrict idx, T *restrict val, int64_t cap,    \
             int32_t *bad) {                                                                    \
  int64_t c = 0, i = 0, hi; S nf[GROUP] = {0}, any = 0;                                         \
  if (!use_thr || end <= start) start = end = n;                                                \
  if (m) { REGIONS(T, U, S, EXP, I, ABS, VM, m, x, 1) }                                         \
  else if (x) { REGIONS(T, U, S, EXP, I, ABS, VG, g, x, 1) }                                    \
  else { REGIONS(T, U, S, EXP, I, ABS, VG, g, g, 0) }                                           \
  for (int k = 0; k < GROUP; k++) any |= nf[k];                                                 \
  *bad = any != 0;                                                                              \
  return c;                                                                                     \
}
DEFINE(sc_select_f32_i32, float, uint32_t, int32_t, 0x7f800000u, int32_t, fabsf)
DEFINE(sc_select_f32_i64, float, uint32_t, int32_t, 0x7f800000u, int64_t, fabsf)
DEFINE(sc_select_f64_i32, double, uint64_t, int64_t, 0x7ff0000000000000ull, int32_t, fabs)
DEFINE(sc_select_f64_i64, double, uint64_t, int64_t, 0x7ff0000000000000ull, int64_t, fabs)
/* The same pass over consecutive ranges [lo[r], hi[r]) of one vector, each with its own
   threshold thr[r] (NaN: nothing passes there): range r's passing positions go, ascending,
   to idx/val from slot[r] on while fewer than cap[r] are there; counts[r]: how many passed. */
#define DEFINE_RANGES(NAME, ONE, T, I)                                                           \
void NAME(const T *g, const T *m, T *x, int64_t nr, const int64_t *lo, const int64_t *hi,      \
          const T *thr, I *idx, T *val, const int64_t *slot, const int64_t *cap, int64_t *counts, \
          int32_t *bad) {                                                                       \
  int32_t any = 0;                                                                              \
  for (int64_t r = 0; r < nr; r++) {                                                            \
    int64_t a = lo[r], n = hi[r] - a, c; int32_t b = 0;                                         \
    c = ONE(g + a, m ? m + a : 0, x ? x + a : 0, n, 0, n, thr[r], 1, idx + slot[r], val + slot[r], \
            cap[r], &b);                                                                        \
    for (int64_t j = 0; j < c && j < cap[r]; j++) idx[slot[r] + j] += (I)a;                     \
    counts[r] = c; any |= b;                                                                    \
  }                                                                                             \
  *bad = any != 0;                                                                              \
}
/* The exact top-k's rule over one range's c finite candidates (positions ascending): the k of
   largest |val|, equal ones in their order, kept in place and in order (the first k slots).
   mag: scratch for c values, where a quickselect (Hoare partition) finds the k-th largest. */
#define DEFINE_KEEP(NAME, T, I, ABS)                                                             \
void NAME(I *restrict idx, T *restrict val, int64_t c, int64_t k, T *restrict mag) {            \
  if (k >= c) return;                                                                           \
  for (int64_t j = 0; j < c; j++) mag[j] = ABS(val[j]);                                         \
  int64_t lo = 0, hi = c - 1, want = k - 1;                                                     \
  while (lo < hi) {                                                                             \
    T pivot = mag[lo + (hi - lo) / 2];                                                          \
    int64_t i = lo, j = hi;                                                                     \
    while (i <= j) {                                                                            \
      while (mag[i] > pivot) i++;                                                               \
      while (mag[j] < pivot) j--;                                                               \
      if (i <= j) { T t = mag[i]; mag[i] = mag[j]; mag[j] = t; i++; j--; }                      \
    }                                                                                           \
    if (want <= j) hi = j; else if (want >= i) lo = i; else break;                              \
  }                                                                                             \
  T kth = mag[want];                                                                            \
  int64_t above = 0, out = 0;                                                                   \
  for (int64_t j = 0; j < c; j++) above += ABS(val[j]) > kth;                                   \
  int64_t ties = k - above;                                                                     \
  for (int64_t j = 0; j < c && out < k; j++) {                                                  \
    T a = ABS(val[j]);                                                                          \
    if (a > kth || (a == kth && ties-- > 0)) { idx[out] = idx[j]; val[out] = val[j]; out++; }   \
  }                                                                                             \
}
DEFINE_KEEP(sc_keep_f32_i32, float, int32_t, fabsf)
DEFINE_KEEP(sc_keep_f32_i64, float, int64_t, fabsf)
DEFINE_KEEP(sc_keep_f64_i32, double, int32_t, fabs)
DEFINE_KEEP(sc_keep_f64_i64, double, int64_t, fabs)
DEFINE_RANGES(sc_ranges_f32_i32, sc_select_f32_i32, float, int32_t)
DEFINE_RANGES(sc_ranges_f32_i64, sc_select_f32_i64, float, int64_t)
DEFINE_RANGES(sc_ranges_f64_i32, sc_select_f64_i32, double, int32_t)
DEFINE_RANGES(sc_ranges_f64_i64, sc_select_f64_i64, double, int64_t)
"""

_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c11"]  # no -ffast-math: the sums must be IEEE, as torch's
_DTYPES = {torch.float32: ("f32", ctypes.c_float), torch.float64: ("f64", ctypes.c_double)}
_INDEX = {torch.int32: "i32", torch.int64: "i64"}
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _cache_dir() -> str:
    root = os.environ.get("SPARSECOMM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sparsecomm")
    return os.path.join(root, "fused")


def _compile(compiler: str, folder: str, path: str) -> None:
    fd, src = tempfile.mkstemp(suffix=".c", dir=folder)
    tmp = src[:-2] + ".so"
    try:
        with os.fdopen(fd, "w") as f:
            f.write(_SOURCE)
        done = subprocess.run([compiler, *_FLAGS, src, "-o", tmp, "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    finally:
        for p in (src, tmp):
            if os.path.exists(p):
                os.remove(p)


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    key = hashlib.sha256((_SOURCE + " ".join(_FLAGS) + compiler + sys.platform).encode()).hexdigest()[:16]
    folder = _cache_dir()
    path = os.path.join(folder, f"select-{key}.so")
    if not os.path.exists(path):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError:  # read-only home: build in a private temporary folder
            folder = tempfile.mkdtemp(prefix="sparsecomm-fused-")
            path = os.path.join(folder, f"select-{key}.so")
        with open(os.path.join(folder, f"select-{key}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # processes starting together build it once
            if not os.path.exists(path):
                _compile(compiler, folder, path)
    lib = ctypes.CDLL(path)
    for dname, ctype in _DTYPES.values():
        for iname in ("i32", "i64"):
            fn = getattr(lib, f"sc_select_{dname}_{iname}")
            fn.restype = ctypes.c_int64
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                           ctypes.c_int64, ctype, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                           ctypes.POINTER(ctypes.c_int32)]
            fn = getattr(lib, f"sc_keep_{dname}_{iname}")
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            fn = getattr(lib, f"sc_ranges_{dname}_{iname}")
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 8 + \
                [ctypes.POINTER(ctypes.c_int32)]
    return lib


def _load() -> ctypes.CDLL | None:
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _build()
            except Exception as exc:  # no compiler, a failed build: say why when asked
                _error = f"{type(exc).__name__}: {exc}"
    return _lib


def unavailable_reason(dtype: torch.dtype, index_dtype: torch.dtype) -> str | None:
    """Why this loop cannot serve these dtypes (None when it can); builds it on first call."""
    if dtype not in _DTYPES:
        return f"the compiled CPU path handles float32 and float64 gradients, not {dtype}"
    if index_dtype not in _INDEX:
        return f"index dtype {index_dtype} is not int32 or int64"
    if _load() is None:
        return f"the compiled CPU path could not be built ({_error})"
    return None


def available(dtype: torch.dtype = torch.float32, index_dtype: torch.dtype = torch.int32) -> bool:
    return unavailable_reason(dtype, index_dtype) is None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def compensate_select(g: torch.Tensor, m: torch.Tensor | None, x: torch.Tensor | None, threshold: float | None,
                      start: int, end: int, idx: torch.Tensor, val: torch.Tensor) -> tuple[int, bool]:
    """One pass of the C loop (see :func:`sparsecomm.reducers.select.fused.compensate_select` for the
    contract); writes at most ``idx.numel()`` pairs. Returns (count that passed, all finite)."""
    lib = _load()
    assert lib is not None, _error
    dname, ctype = _DTYPES[g.dtype]
    fn = getattr(lib, f"sc_select_{dname}_{_INDEX[idx.dtype]}")
    bad = ctypes.c_int32(0)
    count = fn(g.data_ptr(), _ptr(m), _ptr(x), g.numel(), start, end, ctype(0.0 if threshold is None else threshold),
               threshold is not None, idx.data_ptr(), val.data_ptr(), idx.numel(), ctypes.byref(bad))
    return int(count), bad.value == 0


def compensate_select_ranges(g: torch.Tensor, m: torch.Tensor | None, x: torch.Tensor | None,
                             bounds: torch.Tensor, thresholds: torch.Tensor, idx: torch.Tensor, val: torch.Tensor,
                             slots: torch.Tensor, caps: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """One pass of the C loop over consecutive ranges that tile ``g`` (``bounds``: an int64
    tensor of rows ``[lo, hi)``), each with its own threshold (``thresholds``, in g's dtype;
    NaN selects nothing there): x written as :func:`compensate_select` writes it, and range
    r's passing positions (absolute, ascending) with x there at ``idx``/``val`` from
    ``slots[r]``, at most ``caps[r]`` of them. Returns (int64 counts that passed per range,
    all finite)."""
    lib = _load()
    assert lib is not None, _error
    dname, _ = _DTYPES[g.dtype]
    fn = getattr(lib, f"sc_ranges_{dname}_{_INDEX[idx.dtype]}")
    lo, hi = bounds[:, 0].contiguous(), bounds[:, 1].contiguous()  # kept alive through the call
    slots, caps = slots.contiguous(), caps.contiguous()
    thresholds = thresholds.to(g.dtype).contiguous()
    counts = torch.zeros(bounds.shape[0], dtype=torch.int64)
    bad = ctypes.c_int32(0)
    fn(g.data_ptr(), _ptr(m), _ptr(x), bounds.shape[0], lo.data_ptr(), hi.data_ptr(), thresholds.data_ptr(),
       idx.data_ptr(), val.data_ptr(), slots.data_ptr(), caps.data_ptr(), counts.data_ptr(), ctypes.byref(bad))
    return counts, bad.value == 0


def keep_top(idx: torch.Tensor, val: torch.Tensor, k: int, scratch: torch.Tensor) -> None:
    """The exact top-k's rule over one range's finite candidates (contiguous ``idx``/``val``,
    positions ascending), in place: their first ``k`` slots become the k of largest ``|val|``
    (equal ones, the first), in order. ``scratch``: at least ``val.numel()`` values of val's dtype."""
    lib = _load()
    assert lib is not None, _error
    dname, _ = _DTYPES[val.dtype]
    getattr(lib, f"sc_keep_{dname}_{_INDEX[idx.dtype]}")(idx.data_ptr(), val.data_ptr(), val.numel(), k,
                                                         scratch.data_ptr())
