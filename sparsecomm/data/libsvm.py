"""LIBSVM-format classification data (the convex logistic-regression study), as dense tensors.

One example per line: ``label index:value index:value ...`` with 1-based feature indices;
text after ``#`` is a comment, blank lines are skipped. Files ending in ``.bz2``, ``.gz`` or
``.xz`` (as the LIBSVM data page ships many sets) are decompressed on the fly.

Labels: {-1, +1} become {0, 1}; any other set of integer labels becomes 0..C-1 in sorted
order (so {1, 2} -> {0, 1}, {0, 1} stays). The result is dense, which suits the small and
medium sets of the convex study, not rcv1-sized ones.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["load_libsvm"]

_OPENERS = {".bz2": bz2.open, ".gz": gzip.open, ".xz": lzma.open}


def load_libsvm(path: str | os.PathLike, num_features: int | None = None,
                classes: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, y)``: float32 ``[n, f]`` features and int64 ``[n]`` class labels from a LIBSVM file.

    ``f`` is ``num_features`` if given (an index above it is an error), else the largest index
    in the file. ``classes`` fixes the label values mapped to 0..C-1 in sorted order (pass the
    training file's to read its test file consistently); by default they are the labels found,
    with {-1, +1} (or either alone) meaning {0, 1}. Malformed lines raise ValueError naming the
    file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LIBSVM file {path} not found")
    if num_features is not None and num_features < 1:
        raise ValueError(f"num_features must be >= 1, got {num_features}")
    labels: list[float] = []
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    opener = _OPENERS.get(path.suffix, open)
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            tokens = line.split("#", 1)[0].split()
            if not tokens:
                continue
            where = f"{path}:{lineno}"
            try:
                label = float(tokens[0])
            except ValueError:
                raise ValueError(f"{where}: label {tokens[0]!r} is not a number") from None
            if not label.is_integer():
                raise ValueError(f"{where}: label {tokens[0]!r} is not an integer class (regression data is not "
                                 f"supported)")
            row = len(labels)
            labels.append(label)
            for token in tokens[1:]:
                index, sep, value = token.partition(":")
                try:
                    if not sep:
                        raise ValueError
                    j, v = int(index), float(value)
                except ValueError:
                    raise ValueError(f"{where}: expected index:value, got {token!r}") from None
                if j < 1 or (num_features is not None and j > num_features):
                    raise ValueError(f"{where}: feature index {j} outside [1, {num_features or 'inf'}] "
                                     f"(indices are 1-based)")
                rows.append(row)
                cols.append(j - 1)
                vals.append(v)
    if not labels:
        raise ValueError(f"{path}: no examples")
    width = num_features if num_features is not None else max(cols, default=-1) + 1
    x = np.zeros((len(labels), width), dtype=np.float32)
    x[np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)] = np.asarray(vals, dtype=np.float32)
    raw = np.asarray(labels)
    found = np.unique(raw)
    if classes is None and set(found.tolist()) <= {-1.0, 1.0}:
        return torch.from_numpy(x), torch.from_numpy((raw > 0).astype(np.int64))
    known = np.unique(np.asarray(classes if classes is not None else found, dtype=np.float64))
    unknown = np.setdiff1d(found, known)
    if len(unknown):
        raise ValueError(f"{path}: labels {unknown.tolist()} not among classes {known.tolist()}")
    return torch.from_numpy(x), torch.from_numpy(np.searchsorted(known, raw).astype(np.int64))
