"""Word-level language-model corpora (WikiText-2, Penn Treebank) without torchtext.

Both come pre-tokenised, one sentence or paragraph per line, rare words already ``<unk>``.
Following PyTorch's word_language_model example, every line (empty lines included) is split on
whitespace and closed with an ``<eos>`` token, and one dictionary is built over the splits in
the order train, valid, test. Each split becomes one 1-D LongTensor of token ids, which
:func:`batchify` folds into ``[steps, batch]`` columns of continuous text.

Distributed training: batchify with the global batch (per-worker batch x world), then
:func:`shard_columns` gives each worker its own disjoint columns (whole text streams) and the
same number of steps; evaluate the test split the same way, so each token is scored once.

Checks (the rule of :mod:`.prepared`): a file listed in its folder's ``.prepared`` manifest must
keep its recorded size; when the manifest says the folder holds the published corpus, each
split must have its published numbers of lines and tokens (:data:`PUBLISHED_COUNTS`), so a file
cut at a line boundary is caught even where no size was recorded.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .prepare.manifest import check_file, prepare_command

__all__ = ["CORPORA", "PUBLISHED_COUNTS", "EOS", "Dictionary", "Corpus", "batchify", "shard_columns",
           "bptt_batches"]

log = logging.getLogger(__name__)

EOS = "<eos>"
SPLITS = ("train", "valid", "test")
# name -> (folder under the data directory, file name pattern, prepare_dataset.sh argument)
CORPORA = {
    "wikitext2": ("wikitext-2", "wiki.{}.tokens", "wikitext2"),
    "ptb": ("ptb", "ptb.{}.txt", "ptb"),
}
# (lines, tokens with one <eos> per line) of the published files. PTB: counted on the files whose
# md5s torchtext publishes (929,589 / 73,760 / 82,430 are the usual 929k/73k/82k). WikiText-2:
# valid/test counted on the shared copies (md5s in the catalog); train from Merity et al. (2016),
# 2,088,628 tokens, and its 36,718 lines as the Hugging Face wikitext-2-v1 card lists them.
PUBLISHED_COUNTS = {
    "ptb": {"train": (42_068, 929_589), "valid": (3_370, 73_760), "test": (3_761, 82_430)},
    "wikitext2": {"train": (36_718, 2_088_628), "valid": (3_760, 217_646), "test": (4_358, 245_569)},
}


class Dictionary:
    """Word <-> id, ids in order of first appearance."""

    def __init__(self) -> None:
        self.word2idx: dict[str, int] = {}
        self.idx2word: list[str] = []

    def add_word(self, word: str) -> int:
        if word not in self.word2idx:
            self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return self.word2idx[word]

    def __len__(self) -> int:
        return len(self.idx2word)


class Corpus:
    """The splits of corpus ``name`` ('wikitext2' or 'ptb') under ``root`` as token-id tensors.

    ``root`` is the data directory (holding ``wikitext-2/`` or ``ptb/``) or the corpus folder
    itself. ``splits`` picks which files to read (WikiText-2's train split may be absent);
    the dictionary covers exactly the splits read, so ids equal those of a full load only
    when all three are read. Splits not read are ``None``.
    """

    def __init__(self, root: str | os.PathLike, name: str, splits: Sequence[str] = SPLITS) -> None:
        if name not in CORPORA:
            raise ValueError(f"unknown corpus {name!r}; expected one of {sorted(CORPORA)}")
        bad = [s for s in splits if s not in SPLITS]
        if bad or not splits or len(set(splits)) != len(splits):
            raise ValueError(f"bad splits {tuple(splits)!r}; expected distinct names among {SPLITS}")
        self.name = name
        self.folder = self._folder(Path(root), name)
        self.dictionary = Dictionary()
        self.train: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.test: torch.Tensor | None = None
        for split in SPLITS:  # dictionary order: train, valid, test, whatever order was asked for
            if split in splits:
                setattr(self, split, self.tokenize(self.folder / CORPORA[name][1].format(split)))

    @staticmethod
    def _folder(root: Path, name: str) -> Path:
        folder, pattern, _ = CORPORA[name]
        if not (root / folder).is_dir() and any((root / pattern.format(s)).is_file() for s in SPLITS):
            return root
        return root / folder

    def tokenize(self, path: Path) -> torch.Tensor:
        """Add the words of ``path`` to the dictionary; return its token ids (``<eos>`` closing each line)."""
        dataset = CORPORA[self.name][2]
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; {self.name} expects "
                                    f"{', '.join(CORPORA[self.name][1].format(s) for s in SPLITS)} in {path.parent}; "
                                    f"run `{prepare_command(path.parent.parent, dataset)}`")
        marker = check_file(path.parent, path, dataset)
        add = self.dictionary.add_word
        ids: list[int] = []
        lines = 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                ids.extend(add(w) for w in line.split())
                ids.append(add(EOS))
                lines += 1
        split = next((s for s in SPLITS if path.name == CORPORA[self.name][1].format(s)), None)
        if marker is not None and marker.is_published(dataset) and split is not None:
            want = PUBLISHED_COUNTS[self.name][split]
            if (lines, len(ids)) != want:
                raise ValueError(f"{path}: {lines:,} lines and {len(ids):,} tokens, but the published {self.name} "
                                 f"{split} file has {want[0]:,} lines and {want[1]:,} tokens (<eos> included; "
                                 f"{marker.path}); run `{prepare_command(path.parent.parent, dataset, force=True)}`")
        log.info("%s: %d tokens, dictionary now %d words", path, len(ids), len(self.dictionary))
        return torch.tensor(ids, dtype=torch.long)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(t)}" for s in SPLITS if (t := getattr(self, s)) is not None)
        return f"Corpus({self.name!r}, {sizes}, vocab={len(self.dictionary)})"


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Fold a 1-D token stream into ``[steps, batch_size]`` columns, dropping the last ``len mod batch_size`` tokens."""
    if data.dim() != 1:
        raise ValueError(f"batchify expects a 1-D token tensor, got shape {tuple(data.shape)}")
    if batch_size < 1 or data.numel() < batch_size:
        raise ValueError(f"batch_size must be in [1, {data.numel()}] for {data.numel()} tokens, got {batch_size}")
    steps = data.numel() // batch_size
    return data[:steps * batch_size].view(batch_size, steps).t().contiguous()


def shard_columns(batched: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Columns ``rank::world`` of ``[steps, batch]`` data: disjoint text streams, equal steps on every worker.

    ``batch`` must divide evenly by ``world`` so every worker's batch has the same size.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world - 1}] for world={world}, got {rank}")
    if batched.dim() != 2 or batched.shape[1] % world:
        raise ValueError(f"expected [steps, batch] with batch divisible by world={world}, got {tuple(batched.shape)}")
    return batched[:, rank::world].contiguous()


def bptt_batches(source: torch.Tensor, bptt: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(input, target)`` windows of ``[<= bptt, batch]`` rows; target is input shifted one token on.

    The last window is shorter when ``steps - 1`` is not a multiple of ``bptt``.
    """
    if bptt < 1:
        raise ValueError(f"bptt must be >= 1, got {bptt}")
    for i in range(0, source.shape[0] - 1, bptt):
        n = min(bptt, source.shape[0] - 1 - i)
        yield source[i:i + n], source[i + 1:i + 1 + n]
