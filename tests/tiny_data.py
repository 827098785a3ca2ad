"""Tiny data sets in the real upstream formats, laid out as prepare_dataset.sh lays them out."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

WORDS = ("the cat sat on a mat and the dog ate my homework while it rained in paris "
         "we will train small models quickly today").split()


def write_cifar(root: Path, name: str = "cifar10", n_train: int = 96, n_test: int = 40, seed: int = 0) -> Path:
    """Official python batches (CIFAR-10: five data batches and a test batch; CIFAR-100: train/test)."""
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    folder = root / name / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    key = "labels" if name == "cifar10" else "fine_labels"

    def dump(path: Path, n: int) -> None:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: rng.integers(0, classes, n).tolist()}
        path.write_bytes(pickle.dumps(batch))

    if name == "cifar10":
        for i in range(1, 6):
            dump(folder / f"data_batch_{i}", n_train // 5)
        dump(folder / "test_batch", n_test)
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    else:
        dump(folder / "train", n_train)
        dump(folder / "test", n_test)
        (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    return root


def _idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_mnist(root: Path, name: str = "mnist", n_train: int = 128, n_test: int = 48, seed: int = 0) -> Path:
    """The four gzipped IDX files; digit-like images whose label is readable (a bright row)."""
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        images[np.arange(n), 2 + 2 * labels, :] = 255  # learnable: the label sets a bright row
        _idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def write_corpus(root: Path, name: str = "ptb", lines: tuple[int, int, int] = (300, 40, 40), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder, pattern = (root / "ptb", "ptb.{}.txt") if name == "ptb" else (root / "wikitext-2", "wiki.{}.tokens")
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "valid", "test"), lines):
        text = "\n".join(" ".join(rng.choice(WORDS, rng.integers(3, 12))) for _ in range(n))
        (folder / pattern.format(split)).write_text(text + "\n")
    return root


def write_ratings(root: Path, name: str = "ml-100k", users: int = 30, items: int = 200, per_user: int = 24,
                  seed: int = 0) -> Path:
    """MovieLens ratings in the file format of ``name``."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, users + 1):
        for i in rng.choice(np.arange(1, items + 1), per_user, replace=False):
            rows.append((u, int(i), int(rng.integers(1, 6)), int(8_800_000_00 + rng.integers(0, 10**6))))
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    if name == "ml-100k":
        (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    elif name == "ml-1m":
        (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    else:
        (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n"
                                            + "".join(f"{u},{i},{r}.0,{t}\n" for u, i, r, t in rows))
    return root


def write_libsvm(root: Path, name: str = "tiny.svm", n: int = 200, features: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=features)
    lines = []
    for _ in range(n):
        x = rng.normal(size=features) * (rng.random(features) < 0.5)
        label = "+1" if x @ w > 0 else "-1"
        lines.append(label + " " + " ".join(f"{j + 1}:{v:.4f}" for j, v in enumerate(x) if v))
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("\n".join(lines) + "\n")
    return root


def write_all(root: Path) -> Path:
    write_cifar(root, "cifar10")
    write_cifar(root, "cifar100")
    write_mnist(root, "mnist")
    write_mnist(root, "fashion-mnist", seed=1)
    write_corpus(root, "ptb")
    write_corpus(root, "wikitext2", seed=1)
    for name in ("ml-100k", "ml-1m", "ml-20m"):
        write_ratings(root, name)
    write_libsvm(root)
    return root


def mark_prepared(root: Path, name: str, candidate: str, published: bool = False) -> Path:
    """A ``.prepared`` manifest for a data set written above, as prepare_dataset.sh writes one
    (size and sha256 of every file in its folder); ``published`` claims it is the real data set."""
    from sparsecomm.data.prepare.catalog import DATASETS
    from sparsecomm.data.prepare.manifest import hash_files, write_marker

    folder = root / DATASETS[name].folder
    return write_marker(folder, name, candidate, "tests", hash_files(folder), published)
