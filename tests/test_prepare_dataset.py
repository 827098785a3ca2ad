"""Tests of prepare_dataset.sh (python -m sparsecomm.data.prepare): fetch, verify, unpack, lay out,
record a manifest and re-check it.

A local HTTP server on 127.0.0.1 serves SMALL files in the real upstream formats (CIFAR python
batches in a tar.gz, gzipped IDX files, zips of WikiText-2, PTB and MovieLens, a JPEG image-folder
tarball). Their checksums are not the published ones, so every run passes the script a checksum
override table (--checksums / SPARSECOMM_CHECKSUMS). Tests marked "real" use the REAL files of the
shared data folder with the built-in (published) checksums, and the loaders' checks on them.
"""

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import shutil
import socket
import struct
import subprocess
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import tiny_data
from sparsecomm.data.prepare.manifest import read_marker

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "prepare_dataset.sh"
SHARED = (REPO / ".." / "shared" / "data").resolve()
NAMES = ["cifar10", "cifar100", "mnist", "fashion-mnist", "wikitext2", "ptb", "ml-100k", "ml-1m", "ml-20m"]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# ----------------------------------------------------------------------------------------------
# tiny files in the real formats

def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _tar_gz(members: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _idx_images(n, seed):
    rng = np.random.default_rng(seed)
    return struct.pack(">IIII", 2051, n, 28, 28) + rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes()


def _idx_labels(n, seed):
    rng = np.random.default_rng(seed)
    return struct.pack(">II", 2049, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes()


def _cifar_batch(n, seed, fine=False):
    rng = np.random.default_rng(seed)
    d = {b"batch_label": b"tiny batch", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         b"filenames": [b"img_%d.png" % i for i in range(n)]}
    if fine:
        d[b"fine_labels"] = rng.integers(0, 100, n).tolist()
        d[b"coarse_labels"] = rng.integers(0, 20, n).tolist()
    else:
        d[b"labels"] = rng.integers(0, 10, n).tolist()
    return pickle.dumps(d, protocol=2)


def _jpeg(seed):
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow comes with torchvision
        return b"\xff\xd8\xff\xe0tiny-jpeg-%d\xff\xd9" % seed
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=75)
    return buf.getvalue()


def build_tiny(root: Path):
    """Write a mirror of tiny files into root; return the checksum override lines."""
    sums = []  # (checksum, name)

    def put(rel, data, key=None):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        sums.append((md5(data), key or p.name))

    # CIFAR-10 / CIFAR-100: python batches in the upstream tarballs (top level of the mirror)
    c10 = {f"data_batch_{i}": _cifar_batch(4, i) for i in range(1, 6)}
    c10["test_batch"] = _cifar_batch(4, 9)
    c10["batches.meta"] = pickle.dumps({b"label_names": [c.encode() for c in CLASSES],
                                        b"num_cases_per_batch": 4, b"num_vis": 3072}, protocol=2)
    for k, v in c10.items():
        sums.append((md5(v), f"cifar-10-batches-py/{k}"))
    put("cifar-10-python.tar.gz", _tar_gz({f"cifar-10-batches-py/{k}": v for k, v in c10.items()}))
    c100 = {"train": _cifar_batch(5, 1, fine=True), "test": _cifar_batch(3, 2, fine=True),
            "meta": pickle.dumps({b"fine_label_names": [b"c%d" % i for i in range(100)],
                                  b"coarse_label_names": [b"s%d" % i for i in range(20)]}, protocol=2)}
    for k, v in c100.items():
        sums.append((md5(v), f"cifar-100-python/{k}"))
    put("cifar-100-python.tar.gz", _tar_gz({f"cifar-100-python/{k}": v for k, v in c100.items()}))

    # MNIST and Fashion-MNIST: same file names, so in subfolders and keyed <dataset>/<name>
    for ds, seed in (("mnist", 0), ("fashion-mnist", 100)):
        for split, n in (("train", 6), ("t10k", 3)):
            put(f"{ds}/{split}-images-idx3-ubyte.gz", gzip.compress(_idx_images(n, seed + n), mtime=0),
                key=f"{ds}/{split}-images-idx3-ubyte.gz")
            put(f"{ds}/{split}-labels-idx1-ubyte.gz", gzip.compress(_idx_labels(n, seed + n), mtime=0),
                key=f"{ds}/{split}-labels-idx1-ubyte.gz")

    # WikiText-2 zip
    wt = {s: (" = Tiny %s = \n \n the cat sat on the mat . \n" % s).encode() for s in ("train", "valid", "test")}
    for s, v in wt.items():
        sums.append((md5(v), f"wiki.{s}.tokens"))
    put("wikitext-2-v1.zip", _zip({f"wikitext-2/wiki.{s}.tokens": v for s, v in wt.items()}))

    # PTB: the three upstream text files, loose (upstream form) and zipped (mirror form)
    ptb = {s: (" the <unk> %s sentence \n a N b \n" % s).encode() for s in ("train", "valid", "test")}
    for s, v in ptb.items():
        put(f"ptb.{s}.txt", v)
    put("ptb/ptb.zip", _zip({f"ptb/ptb.{s}.txt": v for s, v in ptb.items()}))

    # MovieLens 100K / 1M / 20M zips
    udata = b"196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n"
    sums.append((md5(udata), "u.data"))
    put("movielens-100k/ml-100k.zip", _zip({
        "ml-100k/u.data": udata, "ml-100k/u.item": b"1|Toy Story (1995)|01-Jan-1995||\n",
        "ml-100k/u.user": b"1|24|M|technician|85711\n", "ml-100k/README": b"tiny\n"}))
    put("ml-1m.zip", _zip({"ml-1m/ratings.dat": b"1::1193::5::978300760\n",
                           "ml-1m/movies.dat": b"1193::One Flew (1975)::Drama\n",
                           "ml-1m/users.dat": b"1::F::1::10::48067\n"}))
    put("ml-20m.zip", _zip({"ml-20m/ratings.csv": b"userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n",
                            "ml-20m/movies.csv": b"movieId,title,genres\n2,Jumanji (1995),Adventure\n"}))
    return sums


def build_folder_mirror(root: Path):
    """A tiny mirror shaped like the shared data folder (local-mirror forms only)."""
    sums = build_tiny(root)
    for name in ("cifar-10-python.tar.gz", "cifar-100-python.tar.gz", "wikitext-2-v1.zip", "ml-1m.zip", "ml-20m.zip",
                 "ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"):
        (root / name).unlink()
    shutil.rmtree(root / "fashion-mnist")
    # CIFAR-10 as JPEG image folders, 2 train / 1 test image per class
    members = {}
    for c_i, c in enumerate(CLASSES):
        for k in range(2):
            members[f"train/{c}/{k:04d}.jpg"] = _jpeg(10 * c_i + k)
        members[f"test/{c}/0000.jpg"] = _jpeg(1000 + c_i)
    data = _tar_gz(members)
    (root / "cifar10-jpeg").mkdir()
    (root / "cifar10-jpeg" / "cifar10-jpeg-q75.tar.gz").write_bytes(data)
    sums += [(md5(data), "cifar10-jpeg-q75.tar.gz"), ("jpgs:10x2", "cifar10/train"), ("jpgs:10x1", "cifar10/test")]
    return sums


def write_sums(path: Path, sums, replace=None):
    replace = replace or {}
    with open(path, "w") as f:
        f.write("# test checksum overrides\n")
        for s, name in sums:
            f.write(f"{replace.get(name, s)}  {name}\n")
    return path


# ----------------------------------------------------------------------------------------------
# a local HTTP server that counts requests

class Handler(http.server.SimpleHTTPRequestHandler):
    log = []          # (path, status)
    slow = {}         # path suffix -> seconds to wait before answering
    truncate = set()  # path suffixes answered with a short body

    def log_message(self, *args):
        pass

    def log_request(self, code="-", size="-"):
        Handler.log.append((self.path, int(code) if str(code).isdigit() else code))

    def do_GET(self):
        for suffix, secs in Handler.slow.items():
            if self.path.endswith(suffix):
                time.sleep(secs)
        if any(self.path.endswith(s) for s in Handler.truncate):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 100)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirror")
    sums = build_tiny(root)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    sums_file = write_sums(tmp_path_factory.mktemp("sums") / "checksums.txt", sums)
    yield {"url": f"http://127.0.0.1:{httpd.server_address[1]}", "root": root, "sums": sums, "sums_file": sums_file}
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _reset_handler():
    Handler.log.clear()
    Handler.slow.clear()
    Handler.truncate.clear()
    yield


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATA_DIR", "SPARSECOMM_DATA_URL", "SPARSECOMM_CHECKSUMS")}
    env.update(SPARSECOMM_CONNECT_TIMEOUT="5", SPARSECOMM_LOCK_TIMEOUT="60")
    env.update(extra)
    return env


def run(args, cwd=REPO, timeout=120, **env):
    p = subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=cwd, env=clean_env(**env),
                       capture_output=True, text=True, timeout=timeout)
    p.out = p.stdout + p.stderr
    return p


def part_files(data_dir: Path):
    return [p for p in data_dir.rglob("*") if ".part." in p.name]


def assert_layout(d: Path, names, jpeg=False):
    expect = {
        "cifar10": ([f"cifar10/{s}/{c}" for s in ("train", "test") for c in CLASSES] if jpeg else
                    [f"cifar10/cifar-10-batches-py/{f}" for f in
                     [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]]),
        "cifar100": [f"cifar100/cifar-100-python/{f}" for f in ("train", "test", "meta")],
        "mnist": [f"mnist/{s}-{k}.gz" for s in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte")],
        "fashion-mnist": [f"fashion-mnist/{s}-{k}.gz" for s in ("train", "t10k")
                          for k in ("images-idx3-ubyte", "labels-idx1-ubyte")],
        "wikitext2": [f"wikitext-2/wiki.{s}.tokens" for s in ("train", "valid", "test")],
        "ptb": [f"ptb/ptb.{s}.txt" for s in ("train", "valid", "test")],
        "ml-100k": ["ml-100k/u.data", "ml-100k/u.item", "ml-100k/u.user", "ml-100k/README"],
        "ml-1m": ["ml-1m/ratings.dat", "ml-1m/movies.dat", "ml-1m/users.dat"],
        "ml-20m": ["ml-20m/ratings.csv", "ml-20m/movies.csv"],
    }
    for name in names:
        for rel in expect[name]:
            assert (d / rel).exists(), f"{rel} missing"
        folder = {"wikitext2": "wikitext-2"}.get(name, name)
        assert (d / folder / ".prepared").is_file()
    assert not part_files(d)


# ----------------------------------------------------------------------------------------------
# usage

def test_no_name_prints_usage_with_all_names(tmp_path):
    p = run(["--data-dir", tmp_path / "d"])
    assert p.returncode == 2
    for name in NAMES + ["all"]:
        assert name in p.out
    assert not (tmp_path / "d").exists()


def test_unknown_name_exits_2_naming_it_and_the_allowed_ones(tmp_path):
    p = run(["--data-dir", tmp_path / "d", "ptb", "imagenet"])
    assert p.returncode == 2
    lines = [ln for ln in p.out.splitlines() if "imagenet" in ln]
    assert len(lines) == 1 and all(n in lines[0] for n in NAMES)
    assert not (tmp_path / "d").exists()


def test_help_exits_0():
    p = run(["--help"])
    assert p.returncode == 0 and "--base-url" in p.out and "--checksums" in p.out


# ----------------------------------------------------------------------------------------------
# fetching over HTTP

def test_all_over_http_then_rerun_is_a_no_op(server, tmp_path):
    d = tmp_path / "data"
    p = run(["--base-url", server["url"], "--data-dir", d, "--checksums", server["sums_file"], "all"])
    assert p.returncode == 0, p.out
    assert_layout(d, NAMES)
    assert Handler.log, "nothing was fetched"
    assert all(status in (200, 404) for _, status in Handler.log)
    # archives are kept in the download cache, under their names
    for rel in ("cifar10/cifar-10-python.tar.gz", "mnist/train-images-idx3-ubyte.gz",
                "fashion-mnist/train-images-idx3-ubyte.gz", "ptb/ptb.train.txt", "ml-100k/ml-100k.zip"):
        assert (d / ".downloads" / rel).is_file()
    # MNIST and Fashion-MNIST keep their own (different) files
    assert (d / "mnist/train-images-idx3-ubyte.gz").read_bytes() == (server["root"] / "mnist/train-images-idx3-ubyte.gz").read_bytes()
    assert (d / "fashion-mnist/train-images-idx3-ubyte.gz").read_bytes() == (server["root"] / "fashion-mnist/train-images-idx3-ubyte.gz").read_bytes()
    # the zip's folder became the dataset folder
    assert (d / "ml-100k/u.data").read_bytes().startswith(b"196\t242")
    assert not (d / "ml-100k/ml-100k").exists()

    Handler.log.clear()
    p2 = run(["--base-url", server["url"], "--data-dir", d, "--checksums", server["sums_file"], "all"])
    assert p2.returncode == 0, p2.out
    assert Handler.log == [], "a rerun must not contact the server"
    assert p2.out.count("already prepared") == len(NAMES)


def test_download_cache_is_reused_without_requests(server, tmp_path):
    d = tmp_path / "data"
    args = ["--base-url", server["url"], "--data-dir", d, "--checksums", server["sums_file"], "mnist", "ml-100k", "ptb"]
    assert run(args).returncode == 0
    for folder in ("mnist", "ml-100k", "ptb"):
        shutil.rmtree(d / folder)
    Handler.log.clear()
    p = run(args)
    assert p.returncode == 0, p.out
    assert Handler.log == []
    assert "download cache" in p.out
    assert_layout(d, ["mnist", "ml-100k", "ptb"])


def test_existing_files_without_marker_are_verified_and_adopted(server, tmp_path):
    d = tmp_path / "data"
    args = ["--base-url", server["url"], "--data-dir", d, "--checksums", server["sums_file"], "ptb"]
    assert run(args).returncode == 0
    (d / "ptb/.prepared").unlink()
    shutil.rmtree(d / ".downloads")
    Handler.log.clear()
    p = run(args)
    assert p.returncode == 0 and Handler.log == []
    assert "found complete" in p.out and (d / "ptb/.prepared").is_file()


def test_wrong_checksum_fails_and_leaves_no_file_under_the_final_name(server, tmp_path):
    d = tmp_path / "data"
    wrong = "0" * 32
    sums = write_sums(tmp_path / "sums.txt", server["sums"], replace={"ml-1m.zip": wrong})
    real = md5((server["root"] / "ml-1m.zip").read_bytes())
    p = run(["--base-url", server["url"], "--data-dir", d, "--checksums", sums, "ml-1m"])
    assert p.returncode != 0
    line = next(ln for ln in p.out.splitlines() if "checksum mismatch" in ln)
    assert "ml-1m.zip" in line and f"expected md5 {wrong}" in line and f"got md5 {real}" in line
    assert not (d / ".downloads/ml-1m/ml-1m.zip").exists()
    assert not (d / "ml-1m/ratings.dat").exists() and not (d / "ml-1m/.prepared").exists()
    assert not part_files(d)


def test_wrong_checksum_of_an_extracted_file_fails(server, tmp_path):
    d = tmp_path / "data"
    sums = write_sums(tmp_path / "sums.txt", server["sums"], replace={"u.data": "f" * 32})
    p = run(["--base-url", server["url"], "--data-dir", d, "--checksums", sums, "ml-100k"])
    assert p.returncode != 0
    assert "u.data" in p.out and "f" * 32 in p.out
    assert not (d / "ml-100k/u.data").exists() and not (d / "ml-100k/.prepared").exists()
    assert not (d / ".tmp").exists() or not list((d / ".tmp").iterdir())   # staging removed


def _assert_offline_message(out, d, name, url, checksum):
    assert "could not obtain" in out
    assert url in out, out
    assert checksum in out
    assert str(d / ".downloads" / name) in out
    assert "--base-url" in out
    assert "SPARSECOMM_DATA_URL=FOLDER ./run.sh" in out   # run.sh takes no --base-url


def test_missing_file_gives_the_offline_message(server, tmp_path):
    d = tmp_path / "data"
    p = run(["--base-url", server["url"] + "/nothing-here", "--data-dir", d, "wikitext2", "ml-20m"])
    assert p.returncode == 1
    assert any(status == 404 for _, status in Handler.log)
    _assert_offline_message(p.out, d, "wikitext2",
                            "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
                            "542ccefacc6c27f945fb54453812b3cd")
    _assert_offline_message(p.out, d, "ml-20m", "https://files.grouplens.org/datasets/movielens/ml-20m.zip",
                            "cd245b17a1ae2cc31bb14903e1204af3")
    assert "FAILED: wikitext2 ml-20m" in p.out
    assert not part_files(d)


def test_unreachable_port_gives_the_offline_message(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # closed again when the block ends: nothing listens there
    d = tmp_path / "data"
    t0 = time.monotonic()
    p = run(["--base-url", f"http://127.0.0.1:{port}", "--data-dir", d, "cifar10", "mnist"])
    assert p.returncode == 1
    assert time.monotonic() - t0 < 30
    _assert_offline_message(p.out, d, "cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                            "c58f30108f718f92721af3b95e74349a")
    assert "cifar10-jpeg/cifar10-jpeg-q75.tar.gz" in p.out           # the local-mirror alternative
    _assert_offline_message(p.out, d, "mnist", "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz",
                            "ec29112dd5afa0611ce80d1b7f02629c")
    assert not part_files(d)


def test_truncated_download_leaves_no_file_under_the_final_name(server, tmp_path):
    d = tmp_path / "data"
    Handler.truncate.add("ml-20m.zip")
    p = run(["--base-url", server["url"], "--data-dir", d, "--checksums", server["sums_file"], "ml-20m"],
            SPARSECOMM_FETCH_RETRIES="0")
    assert p.returncode == 1
    assert not (d / ".downloads/ml-20m/ml-20m.zip").exists()
    assert not part_files(d)


def test_concurrent_runs_fetch_once(server, tmp_path):
    d = tmp_path / "data"
    Handler.slow["ml-100k.zip"] = 1.0
    args = ["bash", str(SCRIPT), "--base-url", server["url"], "--data-dir", str(d),
            "--checksums", str(server["sums_file"]), "ml-100k"]
    procs = [subprocess.Popen(args, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [pr.communicate(timeout=60)[0] for pr in procs]
    assert [pr.returncode for pr in procs] == [0, 0], outs
    assert sum(1 for path, status in Handler.log if path.endswith("ml-100k.zip") and status == 200) == 1
    assert sum("already prepared" in o for o in outs) == 1
    assert_layout(d, ["ml-100k"])


# ----------------------------------------------------------------------------------------------
# the manifest: re-checked before "already prepared"; old markers

def _lines(out, *words):
    return [ln for ln in out.splitlines() if all(w in ln for w in words)]


def test_manifest_lists_every_installed_file(server, tmp_path):
    d = tmp_path / "data"
    p = run(["--base-url", server["url"], "--data-dir", d, "--checksums", server["sums_file"], "ml-100k"])
    assert p.returncode == 0, p.out
    marker = read_marker(d / "ml-100k")
    assert marker.dataset == "ml-100k" and marker.candidate == "zip"
    assert not marker.published, "prepared with a checksum override: not the published data set"
    assert set(marker.files) == {"u.data", "u.item", "u.user", "README"}
    data = (d / "ml-100k/u.data").read_bytes()
    assert marker.files["u.data"] == (len(data), hashlib.sha256(data).hexdigest())


def test_truncated_files_are_caught_by_the_rerun_and_prepared_again(server, tmp_path):
    d = tmp_path / "data"
    args = ["--base-url", server["url"], "--data-dir", d, "--checksums", server["sums_file"], "ml-100k", "mnist"]
    assert run(args).returncode == 0
    udata, images = d / "ml-100k/u.data", d / "mnist/train-images-idx3-ubyte.gz"
    good_u, good_i = udata.read_bytes(), images.read_bytes()
    udata.write_bytes(b"".join(good_u.splitlines(keepends=True)[:2]))      # cut at a line boundary
    images.write_bytes(good_i[:-10])
    Handler.log.clear()
    p = run(args)
    assert p.returncode == 0, p.out
    assert "already prepared" not in p.out
    cut = len(b"".join(good_u.splitlines(keepends=True)[:2]))
    assert _lines(p.out, "[ml-100k] WARNING", str(udata), f"size {cut:,}, expected {len(good_u):,}")
    assert _lines(p.out, "[mnist] WARNING", str(images), f"size {len(good_i) - 10:,}, expected {len(good_i):,}")
    assert Handler.log == [], "prepared again from the download cache"
    assert udata.read_bytes() == good_u and images.read_bytes() == good_i
    assert run(args).out.count("already prepared") == 2

    # a changed file (same size) is found by its sha256
    udata.write_bytes(good_u.replace(b"196\t242\t3", b"196\t242\t5"))
    p = run(args[:-1])
    assert _lines(p.out, "[ml-100k] WARNING", "u.data changed since it was prepared (sha256")
    assert udata.read_bytes() == good_u

    # no download cache and no source: one line names the file and how it differs, then the offline help
    udata.write_bytes(good_u[:40])
    shutil.rmtree(d / ".downloads")
    p = run(["--base-url", server["url"] + "/nothing-here", "--data-dir", d, "ml-100k"])
    assert p.returncode == 1
    assert _lines(p.out, "[ml-100k] ERROR", str(udata), f"size 40, expected {len(good_u):,}",
                  "cannot be prepared again")
    assert "could not obtain" in p.out


def test_old_marker_is_verified_and_upgraded(server, tmp_path):
    d = tmp_path / "data"
    args = ["--base-url", server["url"], "--data-dir", d, "--checksums", server["sums_file"], "ptb"]
    assert run(args).returncode == 0
    (d / "ptb/.prepared").write_text("dataset=ptb\ncandidate=txt\nsource=x\nprepared=2024-01-01T00:00:00Z\n")
    Handler.log.clear()
    p = run(args)
    assert p.returncode == 0 and Handler.log == []
    assert _lines(p.out, "already prepared", "upgraded to a manifest")
    marker = read_marker(d / "ptb")
    assert marker.candidate == "txt" and set(marker.files) == {"ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"}

    # an old marker over a damaged file: prepared again from the download cache
    good = (d / "ptb/ptb.valid.txt").read_bytes()
    (d / "ptb/ptb.valid.txt").write_bytes(good[:5])
    (d / "ptb/.prepared").write_text("dataset=ptb\ncandidate=txt\n")
    p = run(args)
    assert p.returncode == 0 and "already prepared" not in p.out
    assert _lines(p.out, "WARNING", "ptb.valid.txt does not match the checksum tables")
    assert (d / "ptb/ptb.valid.txt").read_bytes() == good and read_marker(d / "ptb").files


def test_hand_written_old_marker_over_tiny_files_is_accepted(tmp_path):
    """Other tests (launchers) write a tiny MNIST and an old-style marker by hand: it must stay
    prepared (with a warning), without a network attempt and without a manifest being made up."""
    root = tiny_data.write_mnist(tmp_path / "data", n_train=8, n_test=4)
    (root / "mnist/.prepared").write_text("dataset=mnist\ncandidate=idx\n")
    p = run(["--data-dir", root, "mnist"], SPARSECOMM_DATA_URL="http://127.0.0.1:9")
    assert p.returncode == 0, p.out
    assert "fetching" not in p.out and "copying" not in p.out
    assert _lines(p.out, "[mnist] WARNING", "accepted as its old marker says", "--force")
    assert (root / "mnist/.prepared").read_text() == "dataset=mnist\ncandidate=idx\n"


def test_data_dir_with_a_mirror_layout_is_named(tmp_path):
    mirror = tmp_path / "looks-like-shared"
    (mirror / "movielens-100k").mkdir(parents=True)
    (mirror / "movielens-100k/ml-100k.zip").write_bytes(b"PK not really")
    (mirror / "ptb").mkdir()
    (mirror / "ptb/ptb.zip").write_bytes(b"PK not really")
    p = run(["--data-dir", mirror, "ml-100k"])
    assert p.returncode == 1
    line, = _lines(p.out, "looks like a mirror")
    assert f"DATA_DIR {mirror}" in line and "movielens-100k/ml-100k.zip" in line
    assert f"SPARSECOMM_DATA_URL={mirror}" in line and "separate DATA_DIR" in line
    assert sorted(x.name for x in mirror.iterdir()) == ["movielens-100k", "ptb"], "nothing written into a mirror"


# ----------------------------------------------------------------------------------------------
# local mirrors: plain folder, file:// URL, environment variables

@pytest.fixture(scope="module")
def folder_mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder-mirror")
    sums = build_folder_mirror(root)
    return root, write_sums(tmp_path_factory.mktemp("fsums") / "checksums.txt", sums)


def test_base_url_plain_relative_folder(folder_mirror, tmp_path):
    root, sums = folder_mirror
    rel = os.path.relpath(root, tmp_path)
    p = run(["--base-url", rel, "--data-dir", "data", "--checksums", sums, "ptb", "mnist", "ml-100k", "cifar10"],
            cwd=tmp_path)
    assert p.returncode == 0, p.out
    d = tmp_path / "data"
    assert_layout(d, ["ptb", "mnist", "ml-100k"])
    assert_layout(d, ["cifar10"], jpeg=True)
    assert len(list((d / "cifar10/train/cat").glob("*.jpg"))) == 2
    assert (d / ".downloads/cifar10/cifar10-jpeg-q75.tar.gz").is_file()


def test_base_url_file_url_and_environment_variables(folder_mirror, tmp_path):
    root, sums = folder_mirror
    d = tmp_path / "data"
    p = run(["ptb", "ml-100k"], DATA_DIR=str(d), SPARSECOMM_DATA_URL=f"file://{root}", SPARSECOMM_CHECKSUMS=str(sums))
    assert p.returncode == 0, p.out
    assert_layout(d, ["ptb", "ml-100k"])


def test_folder_mirror_without_a_dataset_fails_with_the_offline_message(folder_mirror, tmp_path):
    root, sums = folder_mirror
    d = tmp_path / "data"
    (root / "wikitext-2").mkdir(exist_ok=True)
    (root / "wikitext-2" / "wiki.valid.tokens").write_text("valid only\n")
    p = run(["--base-url", root, "--data-dir", d, "wikitext2"])
    assert p.returncode == 1
    _assert_offline_message(p.out, d, "wikitext2",
                            "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
                            "542ccefacc6c27f945fb54453812b3cd")


# ----------------------------------------------------------------------------------------------
# the real files of the shared data folder, with the built-in (published) checksums

REAL_MD5 = {  # torchtext penntreebank.py; pralab/secml MNIST (md5 of the uncompressed IDX files)
    "ptb/ptb.train.txt": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "ptb/ptb.valid.txt": "aa0affc06ff7c36e977d7cd49e3839bf",
    "ptb/ptb.test.txt": "8b80168b89c18661a38ef683c0dc3721",
}
REAL_GUNZIP_MD5 = {
    "mnist/train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
    "mnist/train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
    "mnist/t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
    "mnist/t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
}


def _need_shared(*rels):
    missing = [r for r in rels if not (SHARED / r).is_file()]
    if missing:
        print(f"skipping: shared data files missing under {SHARED}: {missing}")
        pytest.skip(f"shared data not available ({SHARED}: {', '.join(missing)} missing)")


def test_real_shared_data_ptb_mnist_ml100k(tmp_path):
    _need_shared("ptb/ptb.zip", "movielens-100k/ml-100k.zip", *REAL_GUNZIP_MD5)
    d = tmp_path / "data"
    rel = os.path.relpath(SHARED, REPO)   # ../shared/data, as a developer would type it
    p = run(["--base-url", rel, "--data-dir", d, "ptb", "mnist", "ml-100k"])
    assert p.returncode == 0, p.out
    assert "override" not in p.out
    assert_layout(d, ["ptb", "mnist", "ml-100k"])
    for rel_path, want in REAL_MD5.items():
        assert md5((d / rel_path).read_bytes()) == want
    for rel_path, want in REAL_GUNZIP_MD5.items():
        assert md5(gzip.decompress((d / rel_path).read_bytes())) == want
    u = (d / "ml-100k/u.data").read_bytes()
    assert hashlib.sha256(u).hexdigest() == "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490"
    assert u.count(b"\n") == 100_000
    p2 = run(["--base-url", rel, "--data-dir", d, "ptb", "mnist", "ml-100k"])
    assert p2.returncode == 0 and p2.out.count("already prepared") == 3
    # the manifests say these are the published data sets, and the loaders' count checks agree
    from sparsecomm.data.corpus import Corpus
    from sparsecomm.data.images import load_mnist

    assert all(read_marker(d / f).published for f in ("ptb", "mnist", "ml-100k"))
    assert [len(load_mnist(d, "mnist", split)) for split in ("train", "test")] == [60_000, 10_000]
    c = Corpus(d, "ptb")
    assert (len(c.train), len(c.valid), len(c.test)) == (929_589, 73_760, 82_430)


def test_real_truncated_u_data_is_caught_by_the_rerun_and_by_the_loader(tmp_path):
    """The issue: a u.data cut at a line boundary trained on half the users, and the script said
    'already prepared'."""
    from sparsecomm.data.movielens import load_ratings

    _need_shared("movielens-100k/ml-100k.zip")
    d = tmp_path / "data"
    args = ["--base-url", SHARED, "--data-dir", d, "ml-100k"]
    assert run(args).returncode == 0
    assert read_marker(d / "ml-100k").published
    udata = d / "ml-100k/u.data"
    good = udata.read_bytes()
    half = b"".join(good.splitlines(keepends=True)[:50_000])
    udata.write_bytes(half)
    fix = f"./prepare_dataset.sh --data-dir {d} --force ml-100k"
    with pytest.raises(ValueError) as e:                      # the manifest's size
        load_ratings(udata)
    assert str(udata) in str(e.value) and f"{len(half):,} bytes" in str(e.value) and f"{len(good):,}" in str(e.value)
    assert fix in str(e.value)
    (d / "ml-100k/.prepared").unlink()                        # without a manifest: u.info still tells
    with pytest.raises(ValueError, match=r"u\.data: 50,000 ratings, \d{3} users, [\d,]+ items, but u\.info beside it "
                                         r"says 100,000 ratings, 943 users, 1,682 items"):
        load_ratings(udata)
    (d / "ml-100k/.prepared").write_text("dataset=ml-100k\ncandidate=zip\n")   # an old marker
    p = run(args)
    assert p.returncode == 0 and "already prepared" not in p.out
    assert _lines(p.out, "WARNING", "u.data does not match the checksum tables", "sha256")
    assert udata.read_bytes() == good and read_marker(d / "ml-100k").published
    assert len(load_ratings(udata)) == 100_000


@pytest.mark.skipif(os.environ.get("SPARSECOMM_TEST_CIFAR_JPEG") != "1",
                    reason="unpacking the real 60,000-image CIFAR-10 JPEG tarball took 4 s to 75 s on the "
                           "project machine (file-system dependent); set SPARSECOMM_TEST_CIFAR_JPEG=1 to run it")
def test_real_shared_data_cifar10_jpeg(tmp_path):
    _need_shared("cifar10-jpeg/cifar10-jpeg-q75.tar.gz")
    d = tmp_path / "data"
    p = run(["--base-url", SHARED, "--data-dir", d, "cifar10"], timeout=300)
    assert p.returncode == 0, p.out
    assert_layout(d, ["cifar10"], jpeg=True)
    for c in CLASSES:
        assert len(list((d / "cifar10/train" / c).glob("*.jpg"))) == 5000
        assert len(list((d / "cifar10/test" / c).glob("*.jpg"))) == 1000
    assert len(read_marker(d / "cifar10").files) == 60_000
    t0 = time.monotonic()   # the rerun re-checks all 60,000 files (sizes, then sha256): about 1 s here
    p2 = run(["--base-url", SHARED, "--data-dir", d, "cifar10"])
    print(f"re-checking 60,000 JPEG files took {time.monotonic() - t0:.1f} s")
    assert p2.returncode == 0 and "already prepared" in p2.out and time.monotonic() - t0 < 60
