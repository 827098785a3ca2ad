"""Image loaders (CIFAR batches, image folders, IDX files) and the training augmentation."""
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as tvf

from sparsecomm.data import images as images_mod
from sparsecomm.data.augment import (NORMALIZATION, TRAIN_AUGMENTATION, Augmentation, ImageDataset, augment,
                                     normalize, sample_uniforms)
from sparsecomm.data.images import ImageSet, load_cifar, load_images, load_mnist, read_idx
import tiny_data
from shared_data import SHARED_DATA, need


# --- CIFAR official python batches -------------------------------------------------------

def _cifar_rows(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _write_cifar10(root: Path, rng, per_batch=3, n_test=2):
    folder = root / "cifar10" / "cifar-10-batches-py"
    train_rows, train_labels = [], []
    for b in range(1, 6):
        rows, labels = _cifar_rows(rng, per_batch), rng.integers(0, 10, per_batch).tolist()
        _dump(folder / f"data_batch_{b}", {"batch_label": f"training batch {b} of 5", "labels": labels, "data": rows,
                                           "filenames": [f"f{i}.png" for i in range(per_batch)]})
        train_rows.append(rows)
        train_labels += labels
    test_rows, test_labels = _cifar_rows(rng, n_test), rng.integers(0, 10, n_test).tolist()
    _dump(folder / "test_batch", {"labels": test_labels, "data": test_rows})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072})
    return np.concatenate(train_rows), train_labels, test_rows, test_labels


def test_cifar10_batches(tmp_path, accept_tiny_cifar):
    rows, labels, test_rows, test_labels = _write_cifar10(tmp_path, np.random.default_rng(0))
    train = load_images(tmp_path, "cifar10", "train")
    assert train.images.shape == (15, 32, 32, 3) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == labels and train.labels.dtype == torch.int64
    assert train.classes[:3] == ("airplane", "automobile", "bird") and len(train.classes) == 10
    # a row is three 32x32 planes R, G, B; images are [N, H, W, C]
    k, y, x = 7, 5, 30
    assert [int(train.images[k, y, x, c]) for c in range(3)] == [int(rows[k, c * 1024 + y * 32 + x]) for c in range(3)]
    test = load_cifar(tmp_path, "cifar10", "test")
    assert test.images.shape == (2, 32, 32, 3) and test.labels.tolist() == test_labels
    assert torch.equal(test.images[1].permute(2, 0, 1).reshape(-1), torch.from_numpy(test_rows[1]))


def test_cifar100_batches(tmp_path, accept_tiny_cifar):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar100" / "cifar-100-python"
    rows = _cifar_rows(rng, 4)
    fine, coarse = [99, 0, 42, 7], [19, 0, 3, 1]
    _dump(folder / "train", {"filenames": ["a"] * 4, "batch_label": "training batch 1 of 1", "fine_labels": fine,
                             "coarse_labels": coarse, "data": rows})
    _dump(folder / "test", {"fine_labels": [5], "coarse_labels": [2], "data": _cifar_rows(rng, 1)})
    _dump(folder / "meta", {"fine_label_names": [f"c{i:02d}" for i in range(100)],
                            "coarse_label_names": [f"s{i}" for i in range(20)]})
    train = load_images(tmp_path, "cifar100", "train")
    assert train.images.shape == (4, 32, 32, 3) and train.labels.tolist() == fine  # fine, not coarse, labels
    assert len(train.classes) == 100 and train.classes[99] == "c99"
    assert load_cifar(tmp_path, "cifar100", "test").labels.tolist() == [5]


def test_cifar_batches_that_do_not_verify_are_refused(tmp_path):
    _write_cifar10(tmp_path, np.random.default_rng(0))  # tiny files: not the published md5 sums
    with pytest.raises(ValueError, match=r"cifar-10-batches-py/\{data_batch_1.*do not verify"):
        load_cifar(tmp_path, "cifar10", "train")


def test_cifar_corrupt_batch_names_file(tmp_path, accept_tiny_cifar):
    folder = tmp_path / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    (folder / "test").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cifar-100-python/test"):
        load_cifar(tmp_path, "cifar100", "test")


def test_cifar_missing_names_folder_files_and_script(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_cifar(tmp_path, "cifar10", "train")
    msg = str(e.value)
    assert str(tmp_path / "cifar10") in msg and "data_batch_1" in msg and "train/<class>" in msg
    assert f"./prepare_dataset.sh --data-dir {tmp_path} cifar10" in msg
    with pytest.raises(FileNotFoundError, match=r"prepare_dataset\.sh --data-dir \S+ cifar100"):
        load_cifar(tmp_path, "cifar100", "test")
    with pytest.raises(ValueError, match="unknown image data set 'svhn'"):
        load_images(tmp_path, "svhn", "train")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_cifar(tmp_path, "cifar10", "val")


# --- CIFAR image folder ------------------------------------------------------------------

def _write_folder(root: Path, split: str, classes: dict, rng, suffix=".png"):
    from PIL import Image

    arrays = {}
    for cls, names in classes.items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for name in names:
            a = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / split / cls / f"{name}{suffix}")
            arrays[(cls, name)] = a
    return arrays


def test_image_folder_loads_caches_and_reloads(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    root = tmp_path / "cifar10"
    # folder names sorted give the labels; files in natural order (2 before 10)
    arrays = _write_folder(root, "train", {"cat": ["10", "2"], "airplane": ["0"], "bird": ["1", "0"]}, rng)
    (root / "train" / "bird" / "notes.txt").write_text("ignored")
    data = load_cifar(tmp_path, "cifar10", "train")
    assert data.classes == ("airplane", "bird", "cat")
    assert data.labels.tolist() == [0, 1, 1, 2, 2]
    expected = [arrays[k] for k in [("airplane", "0"), ("bird", "0"), ("bird", "1"), ("cat", "2"), ("cat", "10")]]
    assert np.array_equal(data.images.numpy(), np.stack(expected))  # PNG is lossless
    cache = root / ".cache" / "cifar10-train-v1.npz"
    assert cache.is_file()

    # reloaded from the cache: nothing decoded
    decoded = []
    real_decode = images_mod._decode
    monkeypatch.setattr(images_mod, "_decode", lambda *a: decoded.append(1) or real_decode(*a))
    again = load_cifar(tmp_path, "cifar10", "train")
    assert torch.equal(again.images, data.images) and torch.equal(again.labels, data.labels)
    assert decoded == []

    # a cache older than the image folder is rebuilt
    os.utime(cache, (1, 1))
    assert torch.equal(load_cifar(tmp_path, "cifar10", "train").images, data.images)
    assert decoded == [1] and cache.stat().st_mtime > 1

    # a cache that no longer matches the folder's files is rebuilt, even if newer
    _write_folder(root, "train", {"airplane": ["1"]}, rng)
    os.utime(cache, (2e9, 2e9))
    grown = load_cifar(tmp_path, "cifar10", "train")
    assert grown.labels.tolist() == [0, 0, 1, 1, 2, 2] and decoded == [1, 1]

    # an unreadable cache is rebuilt too
    cache.write_bytes(b"garbage")
    os.utime(cache, (2e9, 2e9))
    assert load_cifar(tmp_path, "cifar10", "train").labels.tolist() == [0, 0, 1, 1, 2, 2] and decoded == [1, 1, 1]


def test_image_folder_jpeg_and_custom_cache_dir(tmp_path):
    rng = np.random.default_rng(3)
    arrays = _write_folder(tmp_path / "cifar100", "test", {"apple": ["0"], "zebra": ["0", "1"]}, rng, ".jpg")
    cache_dir = tmp_path / "elsewhere"
    data = load_cifar(tmp_path, "cifar100", "test", cache_dir=cache_dir, progress=False)
    assert data.images.shape == (3, 32, 32, 3) and data.labels.tolist() == [0, 1, 1]
    assert (cache_dir / "cifar100-test-v1.npz").is_file()
    assert not (tmp_path / "cifar100" / ".cache").exists()
    # lossy, but close on average
    err = np.abs(data.images[0].numpy().astype(int) - arrays[("apple", "0")].astype(int)).mean()
    assert err < 60


def test_image_folder_mixed_sizes_named(tmp_path):
    from PIL import Image

    _write_folder(tmp_path / "cifar10", "test", {"cat": ["0"]}, np.random.default_rng(4))
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "cifar10" / "test" / "cat" / "1.png")
    with pytest.raises(ValueError, match=r"1\.png: image of shape \(16, 16, 3\)"):
        load_cifar(tmp_path, "cifar10", "test")


# --- IDX (MNIST, Fashion-MNIST) ----------------------------------------------------------

def _idx_bytes(a: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def _write_mnist(folder: Path, rng, n_train=5, n_test=3, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for stem, a in ((f"{prefix}-images-idx3-ubyte", imgs), (f"{prefix}-labels-idx1-ubyte", labels)):
            if gz:
                with gzip.open(folder / f"{stem}.gz", "wb") as f:
                    f.write(_idx_bytes(a))
            else:
                (folder / stem).write_bytes(_idx_bytes(a))
        out[prefix] = (imgs, labels)
    return out


@pytest.mark.parametrize("name,gz", [("mnist", False), ("mnist", True), ("fashion-mnist", True)])
def test_idx_raw_and_gz(tmp_path, name, gz):
    written = _write_mnist(tmp_path / name, np.random.default_rng(5), gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        data = load_images(tmp_path, name, split)
        imgs, labels = written[prefix]
        assert data.images.shape == (len(labels), 28, 28, 1) and data.images.dtype == torch.uint8
        assert np.array_equal(data.images[..., 0].numpy(), imgs)
        assert data.labels.tolist() == labels.tolist() and data.labels.dtype == torch.int64
    assert len(data.classes) == 10
    if name == "fashion-mnist":
        assert data.classes[9] == "Ankle boot"


def test_read_idx_int32(tmp_path):
    a = np.arange(6, dtype=">i4").reshape(2, 3)
    path = tmp_path / "x-idx2-int"
    path.write_bytes(struct.pack(">BBBB", 0, 0, 0x0C, 2) + struct.pack(">2I", 2, 3) + a.tobytes())
    out = read_idx(path)
    assert out.dtype == np.int32 and out.tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_names_file(tmp_path, gz):
    _write_mnist(tmp_path / "mnist", np.random.default_rng(6), gz=gz)
    stem = "t10k-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / "mnist" / stem
    raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    path.write_bytes(gzip.compress(raw[:-100]) if gz else raw[:-100])
    with pytest.raises(ValueError, match=f"{stem}.*truncated"):
        load_mnist(tmp_path, "mnist", "test")
    if gz:  # a cut-off gzip stream
        path.write_bytes(gzip.compress(raw)[:50])
        with pytest.raises(ValueError, match=stem):
            load_mnist(tmp_path, "mnist", "test")


def test_bad_idx_magic_and_count_mismatch(tmp_path):
    _write_mnist(tmp_path / "mnist", np.random.default_rng(7))
    (tmp_path / "mnist" / "train-labels-idx1-ubyte").write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 5) + bytes(5))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte: not an IDX file"):
        load_mnist(tmp_path, "mnist", "train")
    (tmp_path / "mnist" / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(ValueError, match="labels for 5 images"):
        load_mnist(tmp_path, "mnist", "train")


def test_idx_files_checked_against_the_manifest_and_published_counts(tmp_path):
    root = tiny_data.write_mnist(tmp_path, n_train=12, n_test=4)
    tiny_data.mark_prepared(root, "mnist", "idx")                        # tiny, not published: loads
    assert len(load_mnist(root, "mnist", "train")) == 12
    tiny_data.mark_prepared(root, "mnist", "idx", published=True)        # claims to be the real MNIST
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: 12 images of 28x28, but the published mnist "
                                         r"train split has 60,000 of 28x28 .*--data-dir \S+ --force mnist`"):
        load_mnist(root, "mnist", "train")
    path = root / "mnist" / "t10k-labels-idx1-ubyte.gz"                  # cut after it was prepared
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match=rf"t10k-labels-idx1-ubyte\.gz: {size - 3} bytes, but it had {size} when it "
                                         rf"was prepared .*prepare_dataset\.sh --data-dir {root} --force mnist`"):
        load_mnist(root, "mnist", "test")


def test_image_folder_checked_against_the_manifest(tmp_path):
    _write_folder(tmp_path / "cifar10", "train", {"cat": ["0", "1", "2"], "dog": ["0", "1", "2"]},
                  np.random.default_rng(3))
    tiny_data.mark_prepared(tmp_path, "cifar10", "jpeg")
    assert len(load_cifar(tmp_path, "cifar10", "train")) == 6
    (tmp_path / "cifar10" / "train" / "dog" / "2.png").unlink()
    with pytest.raises(ValueError, match=r"train/dog: 2 images, but .*\.prepared recorded 3; run"):
        load_cifar(tmp_path, "cifar10", "train")


def test_missing_idx_mentions_script(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match=rf"train-images-idx3-ubyte.*\./prepare_dataset\.sh --data-dir {tmp_path} fashion-mnist`"):
        load_mnist(tmp_path, "fashion-mnist", "train")


def test_real_mnist_test_split():
    need(SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz")
    data = load_mnist(SHARED_DATA, "mnist", "test")
    assert data.images.shape == (10_000, 28, 28, 1)
    assert data.labels.tolist()[:10] == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert data.labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --- augmentation and datasets -----------------------------------------------------------

def _cifar_set(name="cifar10", n=6, seed=8):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(name, "train", torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g),
                    torch.arange(n) % 10, tuple(str(i) for i in range(10)))


def test_augment_equals_torchvision_ops_with_drawn_parameters():
    data = _cifar_set("cifar100")
    x = data.images.permute(0, 3, 1, 2)
    u = sample_uniforms(3, 1, torch.arange(6), 4)
    out = augment(x, TRAIN_AUGMENTATION["cifar100"], u)
    for k in range(6):
        dy, dx = int(u[k, 0] * 9), int(u[k, 1] * 9)
        ref = tvf.crop(tvf.pad(x[k], [4]), dy, dx, 32, 32)
        if u[k, 2] < 0.5:
            ref = tvf.horizontal_flip(ref)
        ref = tvf.rotate(ref, float((2 * u[k, 3] - 1) * 15.0))
        assert torch.equal(out[k], ref)


def test_dataset_deterministic_per_seed_epoch_index():
    data = _cifar_set()
    ds = ImageDataset(data, train=True, seed=1)
    batch_x, batch_y = ds.batch(torch.tensor([4, 0, 2]))
    assert batch_x.shape == (3, 3, 32, 32) and batch_x.dtype == torch.float32
    assert batch_y.tolist() == [4, 0, 2]
    x4, y4 = ds[4]
    assert torch.equal(x4, batch_x[0]) and y4 == 4  # same sample, however batched
    assert torch.equal(ImageDataset(data, train=True, seed=1)[4][0], x4)  # same in a fresh dataset
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i][0], ImageDataset(data, train=True, seed=1)[i][0]) for i in range(6))
    assert any(not torch.equal(ImageDataset(data, train=True, seed=2)[i][0], ds[i][0]) for i in range(6))


def test_eval_is_normalisation_only():
    data = _cifar_set()
    ds = ImageDataset(data, train=False)
    mean, std = NORMALIZATION["cifar10"]
    x, y = ds[3]
    ref = (data.images[3].permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]) \
        / torch.tensor(std)[:, None, None]
    assert torch.allclose(x, ref, atol=1e-6) and y == 3
    assert torch.equal(normalize(data.images[3].permute(2, 0, 1), mean, std), x)


def test_mnist_training_is_normalisation_only():
    data = ImageSet("mnist", "train", torch.randint(0, 256, (3, 28, 28, 1), dtype=torch.uint8),
                    torch.tensor([1, 2, 3]), tuple("0123456789"))
    assert TRAIN_AUGMENTATION["mnist"].identity
    x_train, _ = ImageDataset(data, train=True).batch([0, 1, 2])
    x_eval, _ = ImageDataset(data, train=False).batch([0, 1, 2])
    assert x_train.shape == (3, 1, 28, 28) and torch.equal(x_train, x_eval)


def test_unknown_dataset_needs_normalisation():
    data = ImageSet("svhn", "train", torch.zeros(1, 32, 32, 3, dtype=torch.uint8), torch.zeros(1), ())
    with pytest.raises(ValueError, match="no default normalisation for data set 'svhn'"):
        ImageDataset(data, train=False)
    ds = ImageDataset(data, train=True, normalization=((0.5,) * 3, (0.5,) * 3), augmentation=Augmentation(4, True))
    assert ds[0][0].shape == (3, 32, 32)


def test_dataloader_workers_see_the_same_augmentation():
    data = _cifar_set(n=8)
    ds = ImageDataset(data, train=True, seed=9)
    ds.set_epoch(2)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    xs = torch.cat([x for x, _ in loader])
    assert torch.equal(xs, ds.batch(torch.arange(8))[0])
