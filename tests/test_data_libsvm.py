"""LIBSVM text format: parsing, label mapping, errors naming file and line."""
import bz2

import pytest
import torch

from sparsecomm.data.libsvm import load_libsvm

BINARY = """# a comment line
+1 1:0.5 3:-2 # trailing comment
-1 2:1e-1

-1
+1 3:4.25 1:1
"""


def test_parse_binary(tmp_path):
    path = tmp_path / "a1a.txt"
    path.write_text(BINARY)
    x, y = load_libsvm(path)
    assert x.dtype == torch.float32 and x.shape == (4, 3)
    assert torch.equal(x, torch.tensor([[0.5, 0.0, -2.0], [0.0, 0.1, 0.0], [0, 0, 0], [1.0, 0.0, 4.25]]))
    assert y.dtype == torch.int64 and y.tolist() == [1, 0, 0, 1]  # -1 -> 0, +1 -> 1


def test_num_features_pads_and_bounds(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text(BINARY)
    x, _ = load_libsvm(path, num_features=5)
    assert x.shape == (4, 5) and x[:, 3:].abs().sum() == 0
    with pytest.raises(ValueError, match=r"d\.txt:2: feature index 3 outside \[1, 2\]"):
        load_libsvm(path, num_features=2)


def test_multiclass_labels_sorted(tmp_path):
    path = tmp_path / "iris.scale"
    path.write_text("3 1:1\n1 1:2\n2 2:3\n3 2:1\n")
    _, y = load_libsvm(path)
    assert y.tolist() == [2, 0, 1, 2]
    # the test file of a split, read with the training file's classes
    test = tmp_path / "iris.t"
    test.write_text("3 1:1\n")
    assert load_libsvm(test)[1].tolist() == [0]
    assert load_libsvm(test, classes=[1, 2, 3])[1].tolist() == [2]
    with pytest.raises(ValueError, match=r"labels \[3\.0\] not among classes \[1\.0, 2\.0\]"):
        load_libsvm(test, classes=[1, 2])


def test_zero_one_and_single_sign_labels(tmp_path):
    path = tmp_path / "b.txt"
    path.write_text("0 1:1\n1 1:2\n")
    assert load_libsvm(path)[1].tolist() == [0, 1]
    path.write_text("+1 1:1\n+1 1:2\n")
    assert load_libsvm(path)[1].tolist() == [1, 1]  # a file with only positives still maps +1 -> 1


def test_compressed(tmp_path):
    path = tmp_path / "a1a.bz2"
    path.write_bytes(bz2.compress(BINARY.encode()))
    x, y = load_libsvm(path)
    assert x.shape == (4, 3) and y.tolist() == [1, 0, 0, 1]


@pytest.mark.parametrize("line,match", [
    ("+1 1:0.5 3", r"bad\.txt:2: expected index:value, got '3'"),
    ("+1 1:abc", r"bad\.txt:2: expected index:value, got '1:abc'"),
    ("+1 0:1", r"bad\.txt:2: feature index 0 outside"),
    ("yes 1:1", r"bad\.txt:2: label 'yes' is not a number"),
    ("0.5 1:1", r"bad\.txt:2: label '0\.5' is not an integer class"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, match):
    path = tmp_path / "bad.txt"
    path.write_text(f"-1 1:1\n{line}\n")
    with pytest.raises(ValueError, match=match):
        load_libsvm(path)


def test_empty_and_missing(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="empty.txt: no examples"):
        load_libsvm(path)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_libsvm(tmp_path / "nope.txt")
