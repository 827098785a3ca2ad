"""MovieLens implicit-feedback data for NCF (He et al. 2017, and the MLPerf recommendation set-up).

Every rating counts as a positive interaction. Users with fewer than ``min_ratings`` distinct
rated items are dropped; user and item ids become 0..n-1 (in order of the original ids); each
user's latest interaction is held out for test, ranked against ``test_negatives`` items the
user never rated; every training positive is paired each epoch with ``per_positive`` sampled
items the user has no training positive for. Everything is vectorised with numpy, fast enough
for MovieLens-20M's 20M ratings.

Files, as GroupLens ships them: ``ml-100k/u.data`` (tab-separated, no header),
``ml-1m/ratings.dat`` (``::``-separated, no header), ``ml-20m/ratings.csv`` (header
``userId,movieId,rating,timestamp``).

Checks (the rule of :mod:`.prepared`): a ratings file listed in its folder's ``.prepared``
manifest must keep its recorded size; ML-100K's ``u.data`` must agree with the ``u.info`` that
ships beside it (users, items, ratings) when it is there; and when the manifest says the folder
holds the published data set, the ratings, users and items must be as many as published
(:data:`PUBLISHED_COUNTS`).
"""
from __future__ import annotations

import logging
import os
import time
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .prepare.manifest import check_file, prepare_command

__all__ = ["RATING_FILES", "PUBLISHED_COUNTS", "NCFData", "load_ratings", "preprocess", "load_ncf",
           "training_negatives", "hit_rate_ndcg"]

log = logging.getLogger(__name__)

# file name -> (data set, pandas read_csv arguments)
RATING_FILES = {
    "u.data": ("ml-100k", dict(sep="\t", header=None, usecols=[0, 1, 2, 3])),
    # '::' split on ':' leaves empty columns between the fields; the C parser is much faster than sep='::'.
    "ratings.dat": ("ml-1m", dict(sep=":", header=None, usecols=[0, 2, 4, 6])),
    "ratings.csv": ("ml-20m", dict(sep=",", header=0, usecols=[0, 1, 2, 3])),
}
# (ratings, users, rated items) of the published files: ML-100K's u.info; ML-1M and ML-20M's
# GroupLens READMEs (ratings, users) and public loaders that check all three (1,000,209 / 6,040 /
# 3,706 is also the NCF paper's ML-1M). A published ML-1M/20M is checked by these counts only.
PUBLISHED_COUNTS = {"ml-100k": (100_000, 943, 1_682), "ml-1m": (1_000_209, 6_040, 3_706),
                    "ml-20m": (20_000_263, 138_493, 26_744)}
INFO_FILES = {"u.data": "u.info"}  # ratings file -> its "N users / N items / N ratings" summary
COLUMNS = ("user", "item", "rating", "timestamp")
CACHE_VERSION = 1


@dataclass(frozen=True)
class NCFData:
    """Preprocessed interactions: int64 arrays of 0-based ids; ``test_negatives`` is ``[num_users, n]``."""

    train_users: np.ndarray
    train_items: np.ndarray
    test_users: np.ndarray
    test_items: np.ndarray
    test_negatives: np.ndarray
    num_users: int
    num_items: int


def load_ratings(path: str | os.PathLike) -> pd.DataFrame:
    """A MovieLens ratings file as columns user, item, rating, timestamp (format by name: :data:`RATING_FILES`)."""
    path = Path(path)
    if path.name not in RATING_FILES:
        raise ValueError(f"{path}: unknown ratings file name {path.name!r}; expected one of {sorted(RATING_FILES)}")
    dataset, kwargs = RATING_FILES[path.name]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `{prepare_command(path.parent.parent, dataset)}`")
    marker = check_file(path.parent, path, dataset)
    try:
        df = pd.read_csv(path, engine="c", **kwargs)
        df.columns = list(COLUMNS)
        if df.isna().any().any():
            bad = int(np.flatnonzero(df.isna().any(axis=1).to_numpy())[0])
            raise ValueError(f"rating {bad + 1} lacks a field")
        df = df.astype({"user": np.int64, "item": np.int64, "rating": np.float32, "timestamp": np.int64})
    except (ValueError, pd.errors.ParserError) as e:
        raise ValueError(f"{path}: not a {dataset} ratings file of user, item, rating, timestamp ({e})") from e
    info = path.parent / INFO_FILES[path.name] if path.name in INFO_FILES else None
    has_info = info is not None and info.is_file()
    published = marker is not None and marker.is_published(dataset)
    if has_info or published:
        found = (len(df), df["user"].nunique(), df["item"].nunique())
        fix = f"run `{prepare_command(path.parent.parent, dataset, force=True)}`"
        if has_info:
            said = _read_info(info)
            if any(said.get(k, n) != n for k, n in zip(("ratings", "users", "items"), found)):
                says = ", ".join(f"{said[k]:,} {k}" for k in ("ratings", "users", "items") if k in said)
                raise ValueError(f"{path}: {_counts(found)}, but {info.name} beside it says {says}; {fix}")
        if published and found != PUBLISHED_COUNTS[dataset]:
            raise ValueError(f"{path}: {_counts(found)}, but the published {dataset} has "
                             f"{_counts(PUBLISHED_COUNTS[dataset])} ({marker.path}); {fix}")
    return df


def _counts(found: tuple[int, int, int]) -> str:
    return "{:,} ratings, {:,} users, {:,} items".format(*found)


def _read_info(path: Path) -> dict[str, int]:
    """``u.info`` (lines ``943 users``, ``1682 items``, ``100000 ratings``) as ``{"users": 943, ...}``."""
    out = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        words = line.split()
        if len(words) == 2 and words[0].isdigit() and words[1] in ("users", "items", "ratings"):
            out[words[1]] = int(words[0])
    return out


def _dense_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values of ``ids`` and each element's position among them (0..n-1)."""
    if len(ids) and ids.min() >= 0 and ids.max() < max(1 << 24, 4 * len(ids)):  # MovieLens: small ints, O(n)
        present = np.zeros(int(ids.max()) + 1, dtype=bool)
        present[ids] = True
        rank = np.cumsum(present) - 1
        return np.flatnonzero(present), rank[ids]
    return np.unique(ids, return_inverse=True)


class _PairSet:
    """A set of (user, item) pairs with vectorised membership tests.

    A bitset of num_users x num_items bits (MovieLens-20M: 463 MB) when that fits in 1 GiB,
    otherwise sorted keys and binary search (several times slower on random queries).
    """

    BITSET_LIMIT = 8 << 30  # bits

    def __init__(self, users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> None:
        self.num_items = num_items
        keys = users * num_items + items
        self.bits: np.ndarray | None = None
        self.keys: np.ndarray | None = None
        if num_users * num_items <= self.BITSET_LIMIT:
            self.bits = np.zeros(num_users * num_items // 8 + 1, dtype=np.uint8)
            np.bitwise_or.at(self.bits, keys >> 3, np.left_shift(1, keys & 7).astype(np.uint8))
        else:
            self.keys = np.sort(keys)

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Elementwise: is (user, item) in the set? (users must be < num_users)."""
        q = users * self.num_items + items
        if self.bits is not None:
            return ((self.bits[q >> 3] >> (q & 7).astype(np.uint8)) & 1).astype(bool)
        if not len(self.keys):
            return np.zeros(q.shape, dtype=bool)
        return self.keys[np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)] == q


def preprocess(ratings: pd.DataFrame, min_ratings: int = 20, test_negatives: int = 100, seed: int = 0) -> NCFData:
    """Filter users, re-index ids, hold out each user's latest interaction, draw test negatives.

    The held-out interaction is the one with the largest timestamp; ties go to the later row of
    ``ratings``. A (user, item) pair rated more than once counts once, at its latest rating.
    Training positives keep the order of ``ratings``. Test negatives are distinct within a user
    and never among that user's positives (train or test); they depend only on the data and
    ``seed``.
    """
    if min_ratings < 2:
        raise ValueError(f"min_ratings must be >= 2 (one test, at least one training interaction), got {min_ratings}")
    if test_negatives < 0:
        raise ValueError(f"test_negatives must be >= 0, got {test_negatives}")
    missing = [c for c in ("user", "item", "timestamp") if c not in ratings.columns]
    if missing:
        raise ValueError(f"ratings lack columns {missing}; expected {COLUMNS} (see load_ratings)")
    ts = ratings["timestamp"].to_numpy(np.int64)
    user_ids, u = _dense_ids(ratings["user"].to_numpy(np.int64))
    item_ids, i = _dense_ids(ratings["item"].to_numpy(np.int64))
    rows = np.arange(len(u))
    # One interaction per (user, item) pair, its latest (lexsort is stable: ties in row order).
    pairs = u * len(item_ids) + i
    srt = np.sort(pairs)
    if len(srt) > 1 and (srt[1:] == srt[:-1]).any():
        order = np.lexsort((ts, i, u))
        last = np.ones(len(order), dtype=bool)
        last[:-1] = pairs[order[1:]] != pairs[order[:-1]]
        rows = np.sort(order[last])
    # Users with enough interactions; ids re-indexed over what remains.
    count = np.bincount(u[rows], minlength=len(user_ids))
    rows = rows[count[u[rows]] >= min_ratings]
    if len(rows) == 0:
        raise ValueError(f"no user has >= {min_ratings} rated items ({len(user_ids)} users, "
                         f"the most active with {count.max(initial=0)})")
    _, u = _dense_ids(u[rows])
    _, i = _dense_ids(i[rows])
    ts, num_users, num_items = ts[rows], int(u.max()) + 1, int(i.max()) + 1
    # Each user's latest interaction: largest timestamp, then largest row.
    latest = np.full(num_users, np.iinfo(np.int64).min)
    np.maximum.at(latest, u, ts)
    at_latest = np.flatnonzero(ts == latest[u])
    test_row = np.full(num_users, -1)
    np.maximum.at(test_row, u[at_latest], at_latest)
    train = np.ones(len(u), dtype=bool)
    train[test_row] = False
    negatives = _sample_test_negatives(_PairSet(u, i, num_users, num_items), u, i, num_users, num_items,
                                       test_negatives, np.random.default_rng([seed, 0x7E57]))
    return NCFData(train_users=u[train], train_items=i[train], test_users=np.arange(num_users, dtype=np.int64),
                   test_items=i[test_row], test_negatives=negatives, num_users=num_users, num_items=num_items)


def _sample_test_negatives(positives: _PairSet, users: np.ndarray, items: np.ndarray, num_users: int,
                           num_items: int, n: int, rng: np.random.Generator, chunk: int = 8192) -> np.ndarray:
    """``[num_users, n]`` items per user, distinct, none of them the user's positives.

    ``users``/``items`` are the distinct positive pairs, also held in ``positives``. Rejection
    sampling on blocks of users; a user with few free items (fewer than 4n, or under a quarter
    of all items) or still unfinished after 8 rounds draws from its explicit complement.
    """
    counts = np.bincount(users, minlength=num_users)
    free = num_items - counts
    short = np.flatnonzero(free < n)
    if len(short):
        raise ValueError(f"user {short[0]} has {counts[short[0]]} positives among {num_items} items, "
                         f"leaving fewer than test_negatives={n} to sample")
    out = np.empty((num_users, n), dtype=np.int64)
    if n == 0:
        return out
    easy = (free >= 4 * n) & (free * 4 >= num_items)
    explicit = [np.flatnonzero(~easy)]
    easy_users = np.flatnonzero(easy)
    for lo in range(0, len(easy_users), chunk):
        todo = easy_users[lo:lo + chunk]
        for _ in range(8):
            if not len(todo):
                break
            width = int(np.ceil(n * num_items / free[todo].min() * 1.3)) + 16
            cand = rng.integers(0, num_items, size=(len(todo), width))
            valid = ~positives.contains(todo[:, None], cand)
            # Drop repeats within a row, keeping the first occurrence.
            srt = np.argsort(cand, axis=1, kind="stable")
            sc = np.take_along_axis(cand, srt, axis=1)
            dup = np.zeros_like(valid)
            np.put_along_axis(dup, srt[:, 1:], sc[:, 1:] == sc[:, :-1], axis=1)
            valid &= ~dup
            done = valid.sum(axis=1) >= n
            # The first n valid candidates of each finished row, in draw order.
            pick = np.argsort(~valid[done], axis=1, kind="stable")[:, :n]
            out[todo[done]] = np.take_along_axis(cand[done], pick, axis=1)
            todo = todo[~done]
        explicit.append(todo)
    hard = np.concatenate(explicit)
    if len(hard):
        mine = np.isin(users, hard)
        order = np.argsort(users[mine], kind="stable")
        hard_users, hard_items = users[mine][order], items[mine][order]
        for user in hard:
            lo, hi = np.searchsorted(hard_users, [user, user + 1])
            out[user] = rng.choice(np.setdiff1d(np.arange(num_items), hard_items[lo:hi]), size=n, replace=False)
    return out


def load_ncf(path: str | os.PathLike, min_ratings: int = 20, test_negatives: int = 100, seed: int = 0,
             cache: bool = True) -> NCFData:
    """:func:`load_ratings` then :func:`preprocess`, cached as an .npz next to the ratings file.

    The cache is keyed by the arguments and reused while newer than the ratings file; if the
    folder is read-only the result is simply not cached.
    """
    path = Path(path)
    if path.is_file() and path.name in RATING_FILES:  # a changed file invalidates the cache too
        check_file(path.parent, path, RATING_FILES[path.name][0])
    cache_file = path.with_name(f"{path.name}.ncf-min{min_ratings}-neg{test_negatives}-seed{seed}"
                                f"-v{CACHE_VERSION}.npz")
    if cache and cache_file.is_file() and path.is_file() and cache_file.stat().st_mtime > path.stat().st_mtime:
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                data = NCFData(**{f.name: (int(z[f.name]) if f.name.startswith("num_") else z[f.name])
                                  for f in fields(NCFData)})
            log.info("%s: NCF data from cache %s", path, cache_file)
            return data
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            log.warning("%s: unreadable cache %s (%s); preprocessing again", path, cache_file, e)
    start = time.perf_counter()
    data = preprocess(load_ratings(path), min_ratings, test_negatives, seed)
    log.info("%s: %d users, %d items, %d training positives, preprocessed in %.1f s", path, data.num_users,
             data.num_items, len(data.train_users), time.perf_counter() - start)
    if cache:
        tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **{field.name: getattr(data, field.name) for field in fields(NCFData)})
            os.replace(tmp, cache_file)
        except OSError as e:
            log.warning("%s: could not write cache %s (%s)", path, cache_file, e)
    return data


def training_negatives(train_users: np.ndarray, train_items: np.ndarray, num_items: int, per_positive: int = 4,
                       seed: int = 0, epoch: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One epoch's training examples: each positive followed by ``per_positive`` sampled negatives.

    A negative is an item drawn uniformly among those the user has no training positive for
    (the held-out test item may be drawn, as in He et al. and MLPerf); draws for one positive
    may repeat. Returns ``(users, items, labels)``: int64, int64, float32 arrays of length
    ``P * (1 + per_positive)``, grouped per positive (a positive, then its negatives) so that
    no slice of them is all positives or all negatives. Deterministic given (seed, epoch): every
    rank can compute the same arrays from all positives and take its shard with
    :func:`~sparsecomm.data.sharding.shard_indices` (which also shuffles them).
    """
    users = np.asarray(train_users, dtype=np.int64)
    items = np.asarray(train_items, dtype=np.int64)
    if users.shape != items.shape or users.ndim != 1:
        raise ValueError(f"train_users and train_items must be 1-D of one length, got {users.shape}, {items.shape}")
    if per_positive < 0:
        raise ValueError(f"per_positive must be >= 0, got {per_positive}")
    if len(items) and (items.min() < 0 or items.max() >= num_items or users.min() < 0):
        raise ValueError(f"ids out of range: users must be >= 0 and items in [0, {num_items - 1}]")
    num_users = int(users.max()) + 1 if len(users) else 0
    positives = _PairSet(users, items, num_users, num_items)
    rng = np.random.default_rng([seed, epoch, 0x4E6])
    neg_users = np.repeat(users, per_positive)
    neg_items = rng.integers(0, num_items, size=len(neg_users))
    bad = np.flatnonzero(positives.contains(neg_users, neg_items))
    rounds = 0
    while len(bad):  # redraw the rejected ones only
        rounds += 1
        if rounds == 64:  # slow convergence: is some user positive on every item?
            mine = np.isin(users, neg_users[bad])
            distinct = np.bincount(np.unique(users[mine] * num_items + items[mine]) // num_items,
                                   minlength=num_users)
            if (distinct >= num_items).any():
                raise ValueError(f"user {int(np.argmax(distinct >= num_items))} has every one of the {num_items} "
                                 f"items as a positive; no negative can be drawn")
        neg_items[bad] = rng.integers(0, num_items, size=len(bad))
        bad = bad[positives.contains(neg_users[bad], neg_items[bad])]
    k = 1 + per_positive
    out_items = np.empty((len(users), k), dtype=np.int64)
    out_items[:, 0] = items
    out_items[:, 1:] = neg_items.reshape(len(users), per_positive)
    labels = np.zeros((len(users), k), dtype=np.float32)
    labels[:, 0] = 1
    return np.repeat(users, k), out_items.reshape(-1), labels.reshape(-1)


def hit_rate_ndcg(scores: torch.Tensor | np.ndarray, k: int = 10):
    """Per-user HR@k (0/1) and NDCG@k; column 0 of ``scores`` ``[users, 1 + negatives]`` is the held-out item.

    The held-out item's rank is the number of negatives scoring at least as high: ties count
    against it (pessimistic), and a NaN score on either side ranks it below. Hit = rank < k,
    NDCG = 1 / log2(rank + 2) on a hit, else 0. Returns float arrays of the input's kind
    (torch tensors on the input's device, or numpy arrays).
    """
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be [users, 1 + negatives], got shape {tuple(scores.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if isinstance(scores, torch.Tensor):
        rank = (~(scores[:, 1:] < scores[:, :1])).sum(dim=1)
        hit = (rank < k).to(torch.float32)
        return hit, hit / torch.log2(rank.to(torch.float32) + 2)
    scores = np.asarray(scores)
    rank = (~(scores[:, 1:] < scores[:, :1])).sum(axis=1)
    hit = (rank < k).astype(np.float32)
    return hit, hit / np.log2(rank.astype(np.float32) + 2)
