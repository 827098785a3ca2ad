"""Word-level corpora (tiny files and the real PTB / WikiText-2) and LM batching."""
import zipfile
from pathlib import Path

import pytest
import torch

from sparsecomm.data.corpus import EOS, Corpus, batchify, bptt_batches, shard_columns
import tiny_data
from shared_data import SHARED_DATA, need


def _write_ptb(folder: Path, train="a b c\n b a\n", valid=" c d\n\n", test="d e a\n") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"ptb.{split}.txt").write_text(text)


def test_tiny_ptb_dictionary_and_ids(tmp_path):
    _write_ptb(tmp_path / "ptb")
    c = Corpus(tmp_path, "ptb")
    words = c.dictionary.idx2word
    assert words == ["a", "b", "c", EOS, "d", "e"]  # first appearance, train then valid then test
    decode = lambda t: [words[i] for i in t.tolist()]  # noqa: E731
    assert decode(c.train) == ["a", "b", "c", EOS, "b", "a", EOS]
    assert decode(c.valid) == ["c", "d", EOS, EOS]  # the empty line still ends in <eos>
    assert decode(c.test) == ["d", "e", "a", EOS]
    assert c.train.dtype == torch.long and len(c.dictionary) == 6


def test_corpus_folder_given_directly_and_split_subset(tmp_path):
    _write_ptb(tmp_path)  # files directly in root, no ptb/ folder
    c = Corpus(tmp_path, "ptb", splits=("test", "valid"))
    assert c.train is None
    assert c.dictionary.idx2word == ["c", "d", EOS, "e", "a"]  # valid before test, whatever the order asked


def test_tiny_wikitext(tmp_path):
    folder = tmp_path / "wikitext-2"
    folder.mkdir()
    (folder / "wiki.valid.tokens").write_text(" \n = Title = \n \n Some text @-@ here . \n")
    (folder / "wiki.test.tokens").write_text(" <unk> text \n")
    c = Corpus(tmp_path, "wikitext2", splits=("valid", "test"))
    assert len(c.valid) == 1 + 4 + 1 + 6  # per line: its words and one <eos>, blank lines included
    assert [c.dictionary.idx2word[i] for i in c.valid[:5].tolist()] == [EOS, "=", "Title", "=", EOS]
    assert c.test.tolist()[-1] == c.dictionary.word2idx[EOS]


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        Corpus(tmp_path, "wikitext2", splits=("valid",))
    assert "wiki.valid.tokens" in str(e.value)
    assert f"./prepare_dataset.sh --data-dir {tmp_path} wikitext2" in str(e.value)
    _write_ptb(tmp_path / "ptb")
    (tmp_path / "ptb" / "ptb.test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=rf"ptb\.test\.txt.*\./prepare_dataset\.sh --data-dir {tmp_path} ptb`"):
        Corpus(tmp_path, "ptb")
    with pytest.raises(ValueError, match="unknown corpus 'wt103'"):
        Corpus(tmp_path, "wt103")
    with pytest.raises(ValueError, match="bad splits"):
        Corpus(tmp_path, "ptb", splits=("train", "dev"))


def test_published_corpus_counts_and_manifest_sizes(tmp_path):
    root = tiny_data.write_corpus(tmp_path, "ptb", lines=(30, 5, 5))
    tiny_data.mark_prepared(root, "ptb", "txt")                 # tiny, not published: loads
    assert Corpus(root, "ptb").valid is not None
    tiny_data.mark_prepared(root, "ptb", "txt", published=True)  # claims to be the real PTB
    with pytest.raises(ValueError, match=r"ptb\.train\.txt: 30 lines and [\d,]+ tokens, but the published ptb train "
                                         r"file has 42,068 lines and 929,589 tokens .*--force ptb`"):
        Corpus(root, "ptb")
    valid = root / "ptb" / "ptb.valid.txt"
    size = valid.stat().st_size
    valid.write_text("".join(valid.read_text().splitlines(keepends=True)[:4]))   # cut at a line boundary
    with pytest.raises(ValueError, match=rf"ptb\.valid\.txt: [\d,]+ bytes, but it had {size:,} when it was prepared"):
        Corpus(root, "ptb", splits=("valid",))


def test_real_ptb(tmp_path):
    with zipfile.ZipFile(need(SHARED_DATA / "ptb" / "ptb.zip")) as z:
        z.extractall(tmp_path)
    c = Corpus(tmp_path, "ptb")
    assert len(c.dictionary) == 10_000  # 9,999 words (<unk> included) + <eos>
    eos = c.dictionary.word2idx[EOS]
    assert (len(c.train), len(c.valid), len(c.test)) == (929_589, 73_760, 82_430)
    assert [int((t == eos).sum()) for t in (c.train, c.valid, c.test)] == [42_068, 3_370, 3_761]  # one per line
    assert "<unk>" in c.dictionary.word2idx and "N" in c.dictionary.word2idx


def test_real_wikitext2_valid_test():
    need(SHARED_DATA / "wikitext-2" / "wiki.valid.tokens")
    c = Corpus(SHARED_DATA, "wikitext2", splits=("valid", "test"))
    assert c.train is None
    assert (len(c.valid), len(c.test)) == (217_646, 245_569)  # the published WikiText-2 sizes, <eos> included
    eos = c.dictionary.word2idx[EOS]
    assert [int((t == eos).sum()) for t in (c.valid, c.test)] == [3_760, 4_358]
    assert len(c.dictionary) == 18_328


def test_batchify_shapes_and_order():
    data = torch.arange(23)
    b = batchify(data, 4)
    assert b.shape == (5, 4)
    assert b[:, 1].tolist() == [5, 6, 7, 8, 9]  # each column a contiguous stream
    assert sorted(b.reshape(-1).tolist()) == list(range(20))  # remainder dropped
    with pytest.raises(ValueError, match="batch_size"):
        batchify(data, 0)
    with pytest.raises(ValueError, match="1-D"):
        batchify(b, 2)


def test_shard_columns_disjoint_streams_equal_steps():
    b = batchify(torch.arange(120), 6)
    shards = [shard_columns(b, r, 3) for r in range(3)]
    assert all(s.shape == (20, 2) for s in shards)
    flat = torch.cat([s.reshape(-1) for s in shards])
    assert sorted(flat.tolist()) == list(range(120))  # disjoint, complete
    assert torch.equal(shards[1], b[:, 1::3])
    with pytest.raises(ValueError, match="divisible by world=4"):
        shard_columns(b, 0, 4)
    with pytest.raises(ValueError, match="rank"):
        shard_columns(b, 3, 3)


def test_bptt_batches():
    source = batchify(torch.arange(2 * 11), 2)  # [11, 2]
    pairs = list(bptt_batches(source, 4))
    assert [tuple(x.shape) for x, _ in pairs] == [(4, 2), (4, 2), (2, 2)]
    for x, y in pairs:
        assert x.shape == y.shape and torch.equal(y, x + 1)  # target is the next token
    assert torch.cat([x for x, _ in pairs]).tolist() == source[:-1].tolist()
    with pytest.raises(ValueError, match="bptt"):
        list(bptt_batches(source, 0))
