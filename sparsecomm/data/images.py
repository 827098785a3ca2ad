"""Image classification data sets read whole into memory: CIFAR-10/100, MNIST, Fashion-MNIST.

Each split loads as an :class:`ImageSet`: uint8 images ``[N, H, W, C]`` and int64 labels, read
from the layout ``prepare_dataset.sh`` writes under the data directory::

    cifar10/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}   official batches, or
    cifar10/{train,test}/<class>/*.{jpg,png}                                 an image-folder copy
    cifar100/cifar-100-python/{train, test, meta}                            or cifar100/{train,test}/<class>/...
    mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]                  the same for fashion-mnist/

The official CIFAR batches are read by torchvision's ``CIFAR10`` / ``CIFAR100`` classes, which
also check each file's published md5. An image folder is decoded once with PIL and cached as an .npz
file; class labels are the sorted folder names, which for CIFAR-10 and CIFAR-100 is the
official label order. Files inside a class folder are read in natural order (``2.jpg`` before
``10.jpg``), so the JPEG copy keeps the original order within each class.

Checks (the rule of :mod:`.prepared`): an IDX file's payload must be as long as its header's
dimensions say, and a split's images and labels must be as many; files listed in the folder's
``.prepared`` manifest must keep their recorded size, an image folder its recorded number of
images per class; and when the manifest says the folder holds the published MNIST or
Fashion-MNIST, each split must have its published count of 28x28 images (60,000 train, 10,000
test). Errors name the file, what was found and expected, and the command that fixes it.
"""
from __future__ import annotations

import gzip
import logging
import os
import pickle
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from ..progress import progress as progress_bar
from .prepare.manifest import check_file, prepare_command, read_marker

__all__ = ["ImageSet", "IMAGE_DATASETS", "load_images", "load_cifar", "load_mnist", "read_idx"]

log = logging.getLogger(__name__)

IMAGE_DATASETS = ("cifar10", "cifar100", "mnist", "fashion-mnist")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm")
CACHE_VERSION = 1

_CIFAR_BATCHES = {
    "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}),
}
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot")
# Images per split of the published MNIST and Fashion-MNIST (LeCun et al.'s and Zalando's READMEs).
_IDX_COUNTS = {"train": 60_000, "test": 10_000}
_IDX_SHAPE = (28, 28)
# IDX type codes (the third magic byte) and the big-endian dtypes they stand for.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class ImageSet:
    """One split in memory: ``images`` uint8 ``[N, H, W, C]``, ``labels`` int64 ``[N]``."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return self.labels.numel()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def load_images(data_dir: str | os.PathLike, name: str, split: str,
                cache_dir: str | os.PathLike | None = None, progress: bool | None = None) -> ImageSet:
    """Load ``split`` of data set ``name`` (one of :data:`IMAGE_DATASETS`) from ``data_dir``."""
    if name in _CIFAR_BATCHES:
        return load_cifar(data_dir, name, split, cache_dir=cache_dir, progress=progress)
    if name in ("mnist", "fashion-mnist"):
        return load_mnist(data_dir, name, split)
    raise ValueError(f"unknown image data set {name!r}; expected one of {IMAGE_DATASETS}")


# --- CIFAR ---------------------------------------------------------------------------------

def load_cifar(data_dir: str | os.PathLike, name: str, split: str,
               cache_dir: str | os.PathLike | None = None, progress: bool | None = None) -> ImageSet:
    """CIFAR-10 or CIFAR-100 from ``data_dir/name``: official python batches if present, else an image folder.

    ``cache_dir`` holds the decoded image folder (default ``data_dir/name/.cache``); ``progress``
    shows a progress bar while decoding (default: only on a terminal).
    """
    if name not in _CIFAR_BATCHES:
        raise ValueError(f"unknown CIFAR data set {name!r}; expected 'cifar10' or 'cifar100'")
    _check_split(split)
    root = Path(data_dir) / name
    batch_dir, files = _CIFAR_BATCHES[name]
    if all((root / batch_dir / f).is_file() for f in files[split]):
        return _read_cifar_batches(name, split, root, batch_dir, files[split])
    if (root / split).is_dir():
        return _read_image_folder(name, split, root / split, Path(cache_dir) if cache_dir else root / ".cache",
                                  progress)
    raise FileNotFoundError(
        f"no {name} {split} data in {root}: expected the official batches "
        f"{batch_dir}/{{{', '.join(files[split])}}} or an image folder {split}/<class>/*.jpg; "
        f"run `{prepare_command(data_dir, name)}`")


def _read_cifar_batches(name: str, split: str, root: Path, batch_dir: str, files: list[str]) -> ImageSet:
    """The official python batches, read by torchvision's ``CIFAR10`` / ``CIFAR100`` classes
    (which check every file's md5 against the published one)."""
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    where = root / batch_dir / files[0] if len(files) == 1 else f"{root / batch_dir}/{{{','.join(files)}}}"
    try:
        dataset = cls(str(root), train=split == "train", download=False)
    except RuntimeError as exc:  # torchvision's integrity check: a truncated or altered file
        raise ValueError(f"{where}: the official {name} batches do not verify "
                         f"({exc}); run `{prepare_command(root.parent, name, force=True)}`") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{where}: not {name} python batches "
                         f"({type(exc).__name__}: {exc})") from None
    images = torch.from_numpy(np.ascontiguousarray(dataset.data))  # [N, 32, 32, 3] uint8
    return ImageSet(name, split, images, torch.as_tensor(dataset.targets, dtype=torch.int64),
                    tuple(dataset.classes))


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _list_image_folder(folder: Path) -> tuple[list[str], list[list[str]]]:
    """Sorted class folder names and, per class, its image file names in natural order."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    files = [sorted((e.name for e in os.scandir(folder / c) if e.is_file()
                     and e.name.lower().endswith(IMAGE_SUFFIXES)), key=_natural_key) for c in classes]
    if not classes or not any(files):
        raise FileNotFoundError(f"no images in {folder}: expected {folder}/<class>/*.jpg "
                                f"(image types {', '.join(IMAGE_SUFFIXES)})")
    return classes, files


def _folder_mtime(folder: Path, classes: list[str]) -> float:
    """Latest modification time of the split folder and its class folders."""
    return max([folder.stat().st_mtime] + [(folder / c).stat().st_mtime for c in classes])


def _check_folder_counts(name: str, folder: Path, classes: list[str], files: list[list[str]]) -> None:
    """Each class folder holds as many images as the data set's manifest recorded (if it has one)."""
    marker = read_marker(folder.parent)
    if marker is None or not marker.files:
        return
    recorded: dict[str, int] = {}
    for rel in marker.files:
        parts = rel.split("/")
        if len(parts) == 3 and parts[0] == folder.name and parts[2].lower().endswith(IMAGE_SUFFIXES):
            recorded[parts[1]] = recorded.get(parts[1], 0) + 1
    found = dict(zip(classes, map(len, files)))
    for c in sorted(set(recorded) | set(found)):
        if found.get(c, 0) != recorded.get(c, 0):
            raise ValueError(f"{folder / c}: {found.get(c, 0):,} images, but {marker.path} recorded "
                             f"{recorded.get(c, 0):,}; run `{prepare_command(folder.parent.parent, name, force=True)}`")


def _read_image_folder(name: str, split: str, folder: Path, cache_dir: Path, progress: bool | None) -> ImageSet:
    """Decode ``folder/<class>/*`` to uint8 arrays, through an .npz cache in ``cache_dir``."""
    classes, files = _list_image_folder(folder)
    _check_folder_counts(name, folder, classes, files)
    counts = np.array([len(f) for f in files], dtype=np.int64)
    cache = cache_dir / f"{name}-{split}-v{CACHE_VERSION}.npz"
    if cache.is_file() and cache.stat().st_mtime > _folder_mtime(folder, classes):
        try:
            with np.load(cache, allow_pickle=False) as z:
                if list(z["classes"]) == classes and np.array_equal(z["counts"], counts):
                    log.info("%s %s: %d images from cache %s", name, split, len(z["labels"]), cache)
                    return ImageSet(name, split, torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]),
                                    tuple(classes))
            log.info("%s %s: cache %s does not match %s; decoding again", name, split, cache, folder)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            log.warning("%s %s: unreadable cache %s (%s); decoding again", name, split, cache, e)
    images, labels = _decode(folder, classes, files, progress, f"{name} {split}")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels, classes=np.array(classes), counts=counts)
        os.replace(tmp, cache)
    except OSError as e:
        log.warning("%s %s: could not write cache %s (%s); it will be decoded again next time", name, split, cache, e)
    return ImageSet(name, split, torch.from_numpy(images), torch.from_numpy(labels), tuple(classes))


def _decode(folder: Path, classes: list[str], files: list[list[str]], progress: bool | None,
            what: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    paths = [folder / c / f for c, fs in zip(classes, files) for f in fs]
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(f) for f in files])
    start = time.perf_counter()
    images = None
    bar = progress_bar(len(paths), f"decoding {what}", "img", show=progress is not False, logger=log)
    for i, path in enumerate(paths):
        bar.update(1)
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"))
        if images is None:
            images = np.empty((len(paths),) + a.shape, dtype=np.uint8)
        elif a.shape != images.shape[1:]:
            raise ValueError(f"{path}: image of shape {a.shape}, but {paths[0]} has {images.shape[1:]}")
        images[i] = a
    bar.close()
    log.info("%s: decoded %d images from %s in %.1f s", what, len(paths), folder, time.perf_counter() - start)
    return images, labels


# --- MNIST / Fashion-MNIST -----------------------------------------------------------------

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (raw, or gzipped if the name ends in .gz) as a numpy array of its declared type and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz
        raise ValueError(f"{path}: cannot read ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'}; "
                         f"expected 0000 then a type code in {[hex(c) for c in _IDX_DTYPES]} and a rank)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = 4 + 4 * ndim + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, but its header declares shape {shape} of {dtype} "
                         f"({expected} bytes); the file is {'truncated' if len(raw) < expected else 'too long'}")
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_file(folder: Path, stem: str, name: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{folder / stem}(.gz) not found; {name} expects "
                            f"{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte, raw or .gz, in {folder}; "
                            f"run `{prepare_command(folder.parent, name)}`")


def load_mnist(data_dir: str | os.PathLike, name: str, split: str) -> ImageSet:
    """MNIST or Fashion-MNIST ``split`` from the four IDX files in ``data_dir/name``."""
    if name not in ("mnist", "fashion-mnist"):
        raise ValueError(f"unknown IDX data set {name!r}; expected 'mnist' or 'fashion-mnist'")
    _check_split(split)
    folder = Path(data_dir) / name
    image_path = _idx_file(folder, f"{_IDX_PREFIX[split]}-images-idx3-ubyte", name)
    label_path = _idx_file(folder, f"{_IDX_PREFIX[split]}-labels-idx1-ubyte", name)
    fix = f"run `{prepare_command(data_dir, name, force=True)}`"
    marker = check_file(folder, image_path, name)
    check_file(folder, label_path, name)
    try:
        images, labels = read_idx(image_path), read_idx(label_path)
    except ValueError as e:
        raise ValueError(f"{e}; {fix}") from None
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{image_path}: expected uint8 images [n, rows, cols], got {images.dtype} {images.shape}; "
                         f"{fix}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{label_path}: {labels.shape} labels for {len(images)} images in {image_path}; {fix}")
    if marker is not None and marker.is_published(name):
        want = (_IDX_COUNTS[split], *_IDX_SHAPE)
        if images.shape != want:
            raise ValueError(f"{image_path}: {len(images):,} images of {images.shape[1]}x{images.shape[2]}, but the "
                             f"published {name} {split} split has {want[0]:,} of 28x28 ({marker.path}); {fix}")
    classes = _FASHION_CLASSES if name == "fashion-mnist" else tuple(str(i) for i in range(10))
    return ImageSet(name, split, torch.from_numpy(images[..., None]), torch.from_numpy(labels.astype(np.int64)),
                    classes)
