"""Benchmark data: loaders for the files ``prepare_dataset.sh`` writes, and per-worker sharding.

One module per job:

- :mod:`.sharding`: disjoint, equal, reshuffled training shards; disjoint evaluation ranges.
- :mod:`.images`: CIFAR-10/100 (official batches or an image folder), MNIST, Fashion-MNIST in memory.
- :mod:`.augment`: the published training augmentation, normalisation, and a Dataset per split.
- :mod:`.corpus`: WikiText-2 and Penn Treebank at word level; batchify, column shards, BPTT windows.
- :mod:`.movielens`: MovieLens ratings for NCF: leave-latest-out split, test and training negatives, HR/NDCG.
- :mod:`.libsvm`: LIBSVM-format classification data as dense tensors.

Everything reads from a data directory laid out as ``prepare_dataset.sh`` writes it (see each
module); nothing here downloads.
"""
from .augment import NORMALIZATION, TRAIN_AUGMENTATION, Augmentation, ImageDataset, augment, normalize
from .corpus import Corpus, Dictionary, batchify, bptt_batches, shard_columns
from .images import IMAGE_DATASETS, ImageSet, load_cifar, load_images, load_mnist, read_idx
from .libsvm import load_libsvm
from .movielens import NCFData, hit_rate_ndcg, load_ncf, load_ratings, preprocess, training_negatives
from .sharding import ShardSampler, eval_range, shard_indices

__all__ = [
    "shard_indices", "eval_range", "ShardSampler",
    "ImageSet", "IMAGE_DATASETS", "load_images", "load_cifar", "load_mnist", "read_idx",
    "Augmentation", "NORMALIZATION", "TRAIN_AUGMENTATION", "augment", "normalize", "ImageDataset",
    "Corpus", "Dictionary", "batchify", "shard_columns", "bptt_batches",
    "NCFData", "load_ratings", "preprocess", "load_ncf", "training_negatives", "hit_rate_ndcg",
    "load_libsvm",
]
