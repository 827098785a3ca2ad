"""MovieLens loading, leave-latest-out preprocessing, negative sampling and HR/NDCG."""
import math
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch

from sparsecomm.data import movielens
from sparsecomm.data.movielens import hit_rate_ndcg, load_ncf, load_ratings, preprocess, training_negatives
import tiny_data
from shared_data import SHARED_DATA, need


ROWS = [(1, 31, 5, 964982703), (1, 1029, 3.5, 964982224), (2, 31, 1, 978300760)]


def _pairs(users, items):
    return set(zip(np.asarray(users).tolist(), np.asarray(items).tolist()))


@pytest.mark.parametrize("name,text", [
    ("u.data", "".join(f"{u}\t{i}\t{int(r)}\t{t}\n" for u, i, r, t in ROWS)),
    ("ratings.dat", "".join(f"{u}::{i}::{int(r)}::{t}\n" for u, i, r, t in ROWS)),
    ("ratings.csv", "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in ROWS)),
])
def test_three_file_formats(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    df = load_ratings(tmp_path / name)
    assert list(df.columns) == ["user", "item", "rating", "timestamp"]
    assert df["user"].tolist() == [1, 1, 2] and df["item"].tolist() == [31, 1029, 31]
    assert df["timestamp"].tolist() == [964982703, 964982224, 978300760]
    expected = [5.0, 3.5, 1.0] if name == "ratings.csv" else [5.0, 3.0, 1.0]
    assert df["rating"].tolist() == expected
    assert df["user"].dtype == np.int64 and df["timestamp"].dtype == np.int64


def test_load_ratings_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown ratings file name 'ratings\.txt'.*u\.data"):
        load_ratings(tmp_path / "ratings.txt")
    with pytest.raises(FileNotFoundError, match=rf"ratings\.dat not found; "
                                                rf"run `\./prepare_dataset\.sh --data-dir {tmp_path.parent} ml-1m`"):
        load_ratings(tmp_path / "ratings.dat")
    (tmp_path / "u.data").write_text("1\t2\t3\t4\n5\tx\t3\t4\n")
    with pytest.raises(ValueError, match=r"u\.data: not a ml-100k ratings file"):
        load_ratings(tmp_path / "u.data")
    (tmp_path / "u.data").write_text("1\t2\t3\t4\n5\t6\t3\n")
    with pytest.raises(ValueError, match=r"u\.data: .*rating 2 lacks a field"):
        load_ratings(tmp_path / "u.data")


def test_u_data_must_agree_with_u_info(tmp_path):
    root = tiny_data.write_ratings(tmp_path, "ml-100k", users=5, items=40, per_user=6)
    n_items = load_ratings(root / "ml-100k" / "u.data")["item"].nunique()
    (root / "ml-100k" / "u.info").write_text(f"5 users\n{n_items} items\n30 ratings\n")
    assert len(load_ratings(root / "ml-100k" / "u.data")) == 30
    lines = (root / "ml-100k" / "u.data").read_text().splitlines(keepends=True)
    (root / "ml-100k" / "u.data").write_text("".join(lines[:12]))       # cut at a line boundary: 2 users left
    with pytest.raises(ValueError, match=rf"u\.data: 12 ratings, 2 users, \d+ items, but u\.info beside it says "
                                         rf"30 ratings, 5 users, {n_items} items; run `\./prepare_dataset\.sh "
                                         rf"--data-dir {root} --force ml-100k`"):
        load_ratings(root / "ml-100k" / "u.data")


def test_published_counts_and_manifest_size(tmp_path):
    root = tiny_data.write_ratings(tmp_path, "ml-1m", users=4, items=30, per_user=5)
    path = root / "ml-1m" / "ratings.dat"
    tiny_data.mark_prepared(root, "ml-1m", "zip")                      # tiny, not published: loads
    assert len(load_ratings(path)) == 20
    tiny_data.mark_prepared(root, "ml-1m", "zip", published=True)      # claims to be the real ML-1M
    with pytest.raises(ValueError, match=r"ratings\.dat: 20 ratings, 4 users, \d+ items, but the published ml-1m has "
                                         r"1,000,209 ratings, 6,040 users, 3,706 items"):
        load_ratings(path)
    size = path.stat().st_size
    path.write_text(path.read_text()[:-30])
    for load in (load_ratings, load_ncf):                               # also before using a cache
        with pytest.raises(ValueError, match=rf"ratings\.dat: {size - 30} bytes, but it had {size} when it was"):
            load(path)


def _table():
    """Users 10 (5 ratings), 3 (2 ratings: dropped at min_ratings=3), 7 (4 ratings, a tie at the latest time)."""
    rows = [
        (10, 500, 4, 100), (3, 600, 5, 50), (10, 501, 3, 300), (7, 502, 2, 10), (10, 503, 1, 200),
        (7, 500, 5, 40), (3, 504, 4, 60), (7, 505, 4, 40), (10, 504, 2, 250), (10, 506, 5, 299),
        (7, 506, 3, 5),
    ]
    return pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])


def test_preprocess_hand_made_table():
    d = preprocess(_table(), min_ratings=3, test_negatives=2, seed=0)
    # users 7 -> 0 and 10 -> 1 (user 3 dropped); items of the kept users, sorted: 500..506 (600 dropped)
    assert (d.num_users, d.num_items) == (2, 7)
    item = {orig: k for k, orig in enumerate(range(500, 507))}
    # latest: user 10 -> item 501 (t=300); user 7 -> tie at t=40 between 500 and 505, the later row (505) wins
    assert d.test_users.tolist() == [0, 1]
    assert d.test_items.tolist() == [item[505], item[501]]
    assert sorted(_pairs(d.train_users, d.train_items)) == sorted(
        [(0, item[i]) for i in (502, 500, 506)] + [(1, item[i]) for i in (500, 503, 504, 506)])
    positives = _pairs(d.train_users, d.train_items) | _pairs(d.test_users, d.test_items)
    for u in range(d.num_users):
        row = d.test_negatives[u].tolist()
        assert len(set(row)) == 2 and not any((u, i) in positives for i in row)


def test_preprocess_counts_items_not_ratings_and_keeps_latest_duplicate():
    df = pd.DataFrame([(1, 1, 5, 10), (1, 2, 5, 20), (1, 1, 3, 30), (1, 3, 3, 25)]
                      + [(2, i, 1, i) for i in range(5)] + [(3, i, 1, i) for i in range(5, 10)],
                      columns=["user", "item", "rating", "timestamp"])
    d = preprocess(df, min_ratings=3, test_negatives=1)
    assert (d.num_users, d.num_items) == (3, 10)
    assert d.test_items[0] == 1  # item 1, re-rated last at t=30, is user 1's held-out item
    assert (0, 1) not in _pairs(d.train_users, d.train_items)  # and its earlier rating no training positive
    assert len(d.train_users) == 2 + 4 + 4
    d = preprocess(df, min_ratings=4, test_negatives=1)
    assert d.num_users == 2  # user 1 has 4 ratings but only 3 distinct items


def _random_table(seed=0, users=60, items=3000, per_user=(20, 80)):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        n = rng.integers(*per_user)
        its = rng.choice(items, size=n, replace=False)
        rows += [(u * 7 + 1, i + 1, 4, t) for i, t in zip(its, rng.integers(0, 10_000, n))]
    return pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])


def test_test_negatives_never_positive_distinct_and_seeded():
    df = _random_table(users=30, per_user=(5, 80))
    d = preprocess(df, min_ratings=20, test_negatives=100, seed=3)
    assert d.test_negatives.shape == (d.num_users, 100) and d.test_negatives.dtype == np.int64
    positives = _pairs(d.train_users, d.train_items) | _pairs(d.test_users, d.test_items)
    for u, row in enumerate(d.test_negatives.tolist()):
        assert len(set(row)) == 100 and all(0 <= i < d.num_items and (u, i) not in positives for i in row)
    again = preprocess(df, min_ratings=20, test_negatives=100, seed=3)
    assert np.array_equal(again.test_negatives, d.test_negatives)
    assert np.array_equal(again.train_items, d.train_items)
    assert not np.array_equal(preprocess(df, min_ratings=20, test_negatives=100, seed=4).test_negatives,
                              d.test_negatives)
    # the held-out item is each user's latest interaction
    ts = df.groupby("user")["timestamp"].max()
    kept = sorted(u for u, n in df.groupby("user").size().items() if n >= 20)
    item_ids = np.unique(df[df["user"].isin(kept)]["item"])
    for k, user in enumerate(kept):
        latest = df[(df["user"] == user) & (df["timestamp"] == ts[user])].iloc[-1]
        assert item_ids[d.test_items[k]] == latest["item"]


def test_test_negatives_for_heavy_users_and_impossible_request():
    # a user who rated nearly everything takes the explicit-complement path
    # (user 1: 150 of 435 items, user 2: 300 of them; both have fewer than 4 x 100 free items)
    rows = [(1, i, 3, i) for i in range(150)] + [(2, i, 3, i) for i in range(0, 3000, 10)]
    df = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    d = preprocess(df, min_ratings=20, test_negatives=100)
    assert d.num_items == 435
    positives = _pairs(d.train_users, d.train_items) | _pairs(d.test_users, d.test_items)
    for u, row in enumerate(d.test_negatives.tolist()):
        assert len(set(row)) == 100 and not any((u, i) in positives for i in row)
    with pytest.raises(ValueError, match="user 1 has 300 positives among 435 items, leaving fewer than test_negatives"):
        preprocess(df, min_ratings=20, test_negatives=200)
    with pytest.raises(ValueError, match="no user has >= 1000 rated items"):
        preprocess(df, min_ratings=1000)


def test_training_negatives():
    d = preprocess(_random_table(seed=1), min_ratings=20, test_negatives=10)
    users, items, labels = training_negatives(d.train_users, d.train_items, d.num_items, per_positive=4, seed=0,
                                              epoch=0)
    p = len(d.train_users)
    assert users.shape == items.shape == labels.shape == (5 * p,)
    assert labels.dtype == np.float32 and labels.reshape(p, 5).tolist() == [[1, 0, 0, 0, 0]] * p
    assert np.array_equal(users.reshape(p, 5)[:, 0], d.train_users)
    assert np.array_equal(items.reshape(p, 5)[:, 0], d.train_items)
    positives = _pairs(d.train_users, d.train_items)
    negatives = _pairs(users[labels == 0], items[labels == 0])
    assert not negatives & positives and all(0 <= i < d.num_items for _, i in negatives)
    same = training_negatives(d.train_users, d.train_items, d.num_items, 4, seed=0, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(same, (users, items, labels)))
    other = training_negatives(d.train_users, d.train_items, d.num_items, 4, seed=0, epoch=1)
    assert not np.array_equal(other[1], items)
    with pytest.raises(ValueError, match="every one of the 3 items"):
        training_negatives(np.array([0, 0, 0, 1]), np.array([0, 1, 2, 0]), 3, seed=0, epoch=0)
    with pytest.raises(ValueError, match="items in"):
        training_negatives(np.array([0]), np.array([5]), 3)


def test_real_movielens_100k(tmp_path, monkeypatch):
    with zipfile.ZipFile(need(SHARED_DATA / "movielens-100k" / "ml-100k.zip")) as z:
        z.extract("ml-100k/u.data", tmp_path)
    path = tmp_path / "ml-100k" / "u.data"
    d = load_ncf(path, min_ratings=20, test_negatives=100, seed=0)
    assert (d.num_users, d.num_items) == (943, 1682)  # every ML-100K user has >= 20 ratings
    assert len(d.train_users) == 100_000 - 943 and len(d.test_items) == 943
    assert d.test_negatives.shape == (943, 100)
    keys = np.concatenate([d.train_users * d.num_items + d.train_items, d.test_users * d.num_items + d.test_items])
    assert len(np.unique(keys)) == 100_000
    neg_keys = (np.arange(943)[:, None] * d.num_items + d.test_negatives).reshape(-1)
    assert not np.isin(neg_keys, keys).any()
    assert all(len(np.unique(row)) == 100 for row in d.test_negatives)
    # cached next to the file, keyed by the arguments, and reused
    assert list(tmp_path.glob("ml-100k/u.data.ncf-min20-neg100-seed0-*.npz"))
    monkeypatch.setattr(movielens, "preprocess", lambda *a, **k: pytest.fail("cache not used"))
    cached = load_ncf(path, min_ratings=20, test_negatives=100, seed=0)
    assert cached.num_users == 943 and isinstance(cached.num_items, int)
    assert np.array_equal(cached.test_negatives, d.test_negatives)
    assert np.array_equal(cached.train_items, d.train_items)


def test_hit_rate_ndcg_hand_made():
    scores = np.array([
        [5.0, 1.0, 2.0, 3.0],        # best: rank 0
        [2.0, 3.0, 1.0, 0.0],        # one negative above: rank 1
        [2.0, 3.0, 2.0, 1.0],        # one above, one tie (counted above): rank 2
        [float("nan"), 1.0, 2.0, 3.0],  # NaN held-out score ranks last
        [1.0, float("nan"), 0.0, 0.0],  # a NaN negative counts above
    ])
    hit, ndcg = hit_rate_ndcg(scores, k=2)
    assert hit.tolist() == [1, 1, 0, 0, 1]
    assert np.allclose(ndcg, [1.0, 1 / math.log2(3), 0.0, 0.0, 1 / math.log2(3)])
    hit3, ndcg3 = hit_rate_ndcg(torch.tensor(scores), k=3)
    assert isinstance(hit3, torch.Tensor) and hit3.tolist() == [1, 1, 1, 0, 1]
    assert torch.allclose(ndcg3, torch.tensor([1.0, 1 / math.log2(3), 0.5, 0.0, 1 / math.log2(3)]))
    with pytest.raises(ValueError, match="scores must be"):
        hit_rate_ndcg(np.zeros(3))
