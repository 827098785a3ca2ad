"""Benchmark data: loaders for the files ``prepare_dataset.sh`` writes, and per-worker sharding.

One module per job:

- :mod:`.sharding`: disjoint, equal, reshuffled training shards; disjoint evaluation ranges.
- :mod:`.images`: CIFAR-10/100 (official batches or an image folder), MNIST, Fashion-MNIST in memory.
- :mod:`.augment`: the published training augmentation, normalisation, and a Dataset per split.
- :mod:`.corpus`: WikiText-2 and Penn Treebank at word level; batchify, column shards, BPTT windows.
- :mod:`.movielens`: MovieLens ratings for NCF: leave-latest-out split, test and training negatives, HR/NDCG.
- :mod:`.libsvm`: LIBSVM-format classification data as dense tensors.

Preparing the data (``prepare_dataset.sh`` = ``python -m sparsecomm.data.prepare``):

- :mod:`.catalog`: the data sets, their candidate sources and published checksums (tables).
- :mod:`.checks`: checksum and structure checks, and override tables.
- :mod:`.fetch`, :mod:`.unpack`: getting a file from a mirror or upstream; unpacking it.
- :mod:`.prepared`: the ``.prepared`` manifest; the size and count checks loaders make with it.
- :mod:`.preparation`: one data set, step by step; :mod:`.prepare`: the command line.

Everything reads from a data directory laid out as ``prepare_dataset.sh`` writes it (see each
module); no loader downloads. The names below are imported on first use, so that preparing
data (which needs only the standard library and tqdm) does not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# exported name -> submodule that defines it
_EXPORTS = {
    **dict.fromkeys(("shard_indices", "eval_range", "ShardSampler"), "sharding"),
    **dict.fromkeys(("ImageSet", "IMAGE_DATASETS", "load_images", "load_cifar", "load_mnist", "read_idx"), "images"),
    **dict.fromkeys(("Augmentation", "NORMALIZATION", "TRAIN_AUGMENTATION", "augment", "normalize", "ImageDataset"),
                    "augment"),
    **dict.fromkeys(("Corpus", "Dictionary", "batchify", "shard_columns", "bptt_batches"), "corpus"),
    **dict.fromkeys(("NCFData", "load_ratings", "preprocess", "load_ncf", "training_negatives", "hit_rate_ndcg"),
                    "movielens"),
    "load_libsvm": "libsvm",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from .augment import NORMALIZATION, TRAIN_AUGMENTATION, Augmentation, ImageDataset, augment, normalize
    from .corpus import Corpus, Dictionary, batchify, bptt_batches, shard_columns
    from .images import IMAGE_DATASETS, ImageSet, load_cifar, load_images, load_mnist, read_idx
    from .libsvm import load_libsvm
    from .movielens import NCFData, hit_rate_ndcg, load_ncf, load_ratings, preprocess, training_negatives
    from .sharding import ShardSampler, eval_range, shard_indices
