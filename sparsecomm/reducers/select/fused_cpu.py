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

__all__ = ["available", "unavailable_reason", "compensate_select", "compensate_select_ranges", "keep_top",
           "keep_top_ranges", "sample_bounds"]

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
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
/* The k-th largest (want = k - 1) of c magnitudes, found in place by a quickselect without
   branches on the data (mag holds no NaN): a Lomuto partition that swaps unconditionally puts
   the values above the pivot (the middle one) first; where the k-th is not among them, a
   second such pass puts the values equal to it next (ties end the search at once). Past
   ROUNDS rounds (random data takes about 2 ln c; an adversarial order could take c) what is
   left is sorted instead. */
#define ROUNDS 128
#define DEFINE_KTH(NAME, T)                                                                      \
static int NAME##_desc(const void *a, const void *b) {                                          \
  T x = *(const T *)a, y = *(const T *)b; return (x < y) - (x > y);                             \
}                                                                                               \
static T NAME(T *restrict mag, int64_t c, int64_t want) {                                       \
  int64_t lo = 0, hi = c, rounds = 0; /* the k-th lies in [lo, hi) */                          \
  while (hi - lo > 1) {                                                                         \
    if (++rounds > ROUNDS) { qsort(mag + lo, (size_t)(hi - lo), sizeof(T), NAME##_desc); return mag[want]; } \
    int64_t mid = lo + (hi - lo) / 2, at = lo;                                                  \
    T p = mag[mid]; mag[mid] = mag[hi - 1]; mag[hi - 1] = p;                                    \
    for (int64_t j = lo; j < hi - 1; j++) {                                                     \
      T v = mag[j]; mag[j] = mag[at]; mag[at] = v; at += v > p;                                 \
    }                                                                                           \
    if (want < at) { hi = at; continue; }                                                       \
    mag[hi - 1] = mag[at]; mag[at] = p; /* the pivot at its place */                            \
    int64_t eq = at + 1;                                                                        \
    for (int64_t j = at + 1; j < hi; j++) {                                                     \
      T v = mag[j]; mag[j] = mag[eq]; mag[eq] = v; eq += v == p;                                \
    }                                                                                           \
    if (want < eq) return p;                                                                    \
    lo = eq;                                                                                    \
  }                                                                                             \
  return mag[lo];                                                                               \
}
DEFINE_KTH(sc_kth_f32, float)
DEFINE_KTH(sc_kth_f64, double)
/* The exact top-k's rule over one range's c finite candidates (positions ascending): the k of
   largest |val|, equal ones in their order, kept in place and in order (the first k slots;
   the slots after them up to c may be overwritten). mag: scratch for c values, where the
   quickselect finds the k-th largest. The compaction too goes without branches on the data. */
#define DEFINE_KEEP(NAME, KTH, T, I, ABS)                                                        \
void NAME(I *restrict idx, T *restrict val, int64_t c, int64_t k, T *restrict mag) {            \
  if (k >= c || k <= 0) return;                                                                 \
  for (int64_t j = 0; j < c; j++) mag[j] = ABS(val[j]);                                         \
  T kth = KTH(mag, c, k - 1);                                                                   \
  int64_t above = 0, out = 0;                                                                   \
  for (int64_t j = 0; j < c; j++) above += ABS(val[j]) > kth;                                   \
  int64_t ties = k - above;                                                                     \
  for (int64_t j = 0; j < c; j++) {                                                             \
    T a = ABS(val[j]); I i = idx[j]; T v = val[j];                                              \
    int64_t eq = a == kth, take = (a > kth) | (eq & (ties > 0));                                \
    ties -= eq & take; idx[out] = i; val[out] = v; out += take;                                 \
  }                                                                                             \
}
/* The rule over consecutive ranges' candidates in one call: range r's counts[r] candidates at
   idx/val from slot[r] keep their min(k[r], counts[r]) of largest |val| (as above), and the
   kept go, range after range, to the front of idx/val. Returns how many were kept. */
#define DEFINE_KEEP_RANGES(NAME, KEEP, T, I)                                                     \
int64_t NAME(I *idx, T *val, int64_t nr, const int64_t *slot, const int64_t *counts,           \
             const int64_t *k, T *mag) {                                                        \
  int64_t out = 0;                                                                              \
  for (int64_t r = 0; r < nr; r++) {                                                            \
    int64_t c = counts[r], kk = k[r] < c ? k[r] : c;                                            \
    if (kk <= 0) continue;                                                                      \
    KEEP(idx + slot[r], val + slot[r], c, kk, mag);                                             \
    memmove(idx + out, idx + slot[r], (size_t)kk * sizeof(I));                                  \
    memmove(val + out, val + slot[r], (size_t)kk * sizeof(T));                                  \
    out += kk;                                                                                  \
  }                                                                                             \
  return out;                                                                                   \
}
/* Each range's bound from its sample in one call: thr[r], the rank[r]-th largest |m + g| (m
   NULL: |g|) over the positions pos[off[r]], ..., pos[off[r] + len[r] - 1] (ascending), or over
   all of [lo[r], hi[r]) when off[r] < 0; NaN (nothing passes) when rank[r] is 0; 0 when rank[r]
   exceeds the sample. A NaN read counts as +Inf (the pass then finds x not finite and the
   bound is not used). mag: scratch for the longest sample. A rank of at most SMALL is kept in
   a sorted array of that many as the sample streams by (the usual case: 12 of 4,096), a
   larger one found by the quickselect. */
#define SMALL 64
#define DEFINE_BOUNDS(NAME, KTH, T, ABS)                                                         \
void NAME(const T *restrict g, const T *restrict m, int64_t nr, const int64_t *lo,             \
          const int64_t *hi, const int64_t *off, const int64_t *len, const int64_t *pos,        \
          const int64_t *rank, T *thr, T *restrict mag) {                                       \
  for (int64_t r = 0; r < nr; r++) {                                                            \
    int64_t c, want = rank[r];                                                                  \
    if (want <= 0) { thr[r] = NAN; continue; }                                                  \
    if (off[r] < 0) {                                                                           \
      const T *gp = g + lo[r], *mp = m ? m + lo[r] : 0; c = hi[r] - lo[r];                      \
      for (int64_t j = 0; j < c; j++) mag[j] = mp ? mp[j] + gp[j] : gp[j];                      \
    } else {                                                                                    \
      const int64_t *p = pos + off[r]; c = len[r];                                              \
      for (int64_t j = 0; j < c; j++) mag[j] = g[p[j]];                                          \
      if (m) for (int64_t j = 0; j < c; j++) mag[j] = m[p[j]] + mag[j];                         \
    }                                                                                           \
    for (int64_t j = 0; j < c; j++) { T a = ABS(mag[j]); mag[j] = a != a ? INFINITY : a; }      \
    if (want > c) { thr[r] = 0; continue; }                                                     \
    if (want > SMALL) { thr[r] = KTH(mag, c, want - 1); continue; }                             \
    T top[SMALL]; int64_t held = 0; /* the want largest so far, descending */                   \
    for (int64_t j = 0; j < c; j++) {                                                           \
      T a = mag[j];                                                                             \
      if (held == want && !(a > top[want - 1])) continue;                                       \
      int64_t at = held < want ? held++ : want - 1;                                             \
      while (at > 0 && top[at - 1] < a) { top[at] = top[at - 1]; at--; }                        \
      top[at] = a;                                                                              \
    }                                                                                           \
    thr[r] = top[want - 1];                                                                     \
  }                                                                                             \
}
DEFINE_KEEP(sc_keep_f32_i32, sc_kth_f32, float, int32_t, fabsf)
DEFINE_KEEP(sc_keep_f32_i64, sc_kth_f32, float, int64_t, fabsf)
DEFINE_KEEP(sc_keep_f64_i32, sc_kth_f64, double, int32_t, fabs)
DEFINE_KEEP(sc_keep_f64_i64, sc_kth_f64, double, int64_t, fabs)
DEFINE_KEEP_RANGES(sc_keep_ranges_f32_i32, sc_keep_f32_i32, float, int32_t)
DEFINE_KEEP_RANGES(sc_keep_ranges_f32_i64, sc_keep_f32_i64, float, int64_t)
DEFINE_KEEP_RANGES(sc_keep_ranges_f64_i32, sc_keep_f64_i32, double, int32_t)
DEFINE_KEEP_RANGES(sc_keep_ranges_f64_i64, sc_keep_f64_i64, double, int64_t)
DEFINE_BOUNDS(sc_bounds_f32, sc_kth_f32, float, fabsf)
DEFINE_BOUNDS(sc_bounds_f64, sc_kth_f64, double, fabs)
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
        fn = getattr(lib, f"sc_bounds_{dname}")
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 8
        for iname in ("i32", "i64"):
            fn = getattr(lib, f"sc_select_{dname}_{iname}")
            fn.restype = ctypes.c_int64
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                           ctypes.c_int64, ctype, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                           ctypes.POINTER(ctypes.c_int32)]
            fn = getattr(lib, f"sc_keep_{dname}_{iname}")
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            fn = getattr(lib, f"sc_keep_ranges_{dname}_{iname}")
            fn.restype = ctypes.c_int64
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 4
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


def keep_top_ranges(idx: torch.Tensor, val: torch.Tensor, slots: torch.Tensor, counts: torch.Tensor,
                    ks: torch.Tensor, scratch: torch.Tensor) -> int:
    """:func:`keep_top` over many ranges' candidates in one call: range r's ``counts[r]``
    candidates at ``idx``/``val`` from ``slots[r]`` (as :func:`compensate_select_ranges` leaves
    them, none past its cap) keep their ``min(ks[r], counts[r])`` by the rule, and the kept go,
    range after range, to the front of ``idx``/``val``. ``slots``, ``counts``, ``ks``:
    contiguous int64; ``scratch``: at least the largest count of values of val's dtype.
    Returns how many were kept."""
    lib = _load()
    assert lib is not None, _error
    dname, _ = _DTYPES[val.dtype]
    fn = getattr(lib, f"sc_keep_ranges_{dname}_{_INDEX[idx.dtype]}")
    return int(fn(idx.data_ptr(), val.data_ptr(), slots.numel(), slots.data_ptr(), counts.data_ptr(),
                  ks.data_ptr(), scratch.data_ptr()))


def sample_bounds(g: torch.Tensor, m: torch.Tensor | None, bounds: torch.Tensor, offsets: torch.Tensor,
                  lengths: torch.Tensor, positions: torch.Tensor, ranks: torch.Tensor, out: torch.Tensor,
                  scratch: torch.Tensor) -> None:
    """Every range's bound in one call: ``out[r]`` (g's dtype), the ``ranks[r]``-th largest
    ``|m + g|`` (m None: ``|g|``) over the ascending ``positions[offsets[r]:offsets[r] +
    lengths[r]]``, or over all of the range ``bounds[r] = [lo, hi)`` where ``offsets[r] < 0``;
    NaN (nothing passes) where ``ranks[r]`` is 0, and 0 where it exceeds the sample. A NaN
    counts as +Inf. Tensors contiguous, int64 but ``out``; ``scratch``: the longest sample."""
    lib = _load()
    assert lib is not None, _error
    dname, _ = _DTYPES[g.dtype]
    fn = getattr(lib, f"sc_bounds_{dname}")
    lo, hi = bounds[:, 0].contiguous(), bounds[:, 1].contiguous()
    fn(g.data_ptr(), _ptr(m), bounds.shape[0], lo.data_ptr(), hi.data_ptr(), offsets.data_ptr(), lengths.data_ptr(),
       positions.data_ptr(), ranks.data_ptr(), out.data_ptr(), scratch.data_ptr())
