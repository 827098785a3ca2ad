"""The ``.prepared`` marker of a data set folder: the manifest of what was installed.

``prepare_dataset.sh`` writes ``DATA_DIR/<folder>/.prepared`` last, when the data set is
complete, as one JSON object::

    {"format": "sparsecomm.prepared/1", "dataset": "ml-100k", "candidate": "zip",
     "source": "/work/shared/data", "prepared": "2025-01-01T00:00:00Z", "published": true,
     "hash": "sha256",
     "files": {
      "u.data": [1979173, "06416e59..."],
      ...}}

``files`` lists every installed file: its path relative to the folder, its size in bytes and
its sha256. ``published`` is true when the files are the published data set: its sources (or,
for files found in place, the files themselves) matched the built-in published checksums, with
no ``--checksums`` override involved. Before saying "already prepared", the script re-checks
every listed file (size, then sha256).

Markers written before the manifest existed are ``key=value`` lines (``dataset=mnist``,
``candidate=idx``); they carry no file list and count as not published. Tests write such
markers by hand for tiny data sets; ``run.sh``'s waiting ranks only look for the file.

The loaders' rule (:func:`check_file`): a file listed in its folder's manifest must still have
the recorded size (a cheap ``stat``; the script's re-check covers the content). The counts a
published data set fixes (MNIST's 60,000 / 10,000 images, PTB's lines and tokens, ...) are
checked only when the manifest says ``published`` for that data set, so that tiny data sets in
the same formats (tests, hand-made files) load as they are.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ...progress import byte_progress
from .checks import digest

log = logging.getLogger(__name__)

__all__ = ["MARKER", "Marker", "read_marker", "write_marker", "hash_files", "verify_files", "check_file",
           "prepare_command"]

MARKER = ".prepared"
FORMAT = "sparsecomm.prepared/1"
HASH = "sha256"


@dataclass
class Marker:
    """A parsed ``.prepared`` file; ``files`` is None for an old marker without a manifest."""

    path: Path
    dataset: str | None = None
    candidate: str | None = None
    fields: dict = field(default_factory=dict)
    files: dict[str, tuple[int, str]] | None = None
    published: bool = False

    def is_published(self, dataset: str) -> bool:
        """True when this folder holds the published ``dataset`` (the format's fixed counts apply)."""
        return self.published and self.files is not None and self.dataset == dataset


def read_marker(folder: str | os.PathLike) -> Marker | None:
    """The marker of a data set folder, or None when it has none (or an unreadable one)."""
    path = Path(folder) / MARKER
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
            files = {str(k): (int(v[0]), str(v[1])) for k, v in obj.get("files", {}).items()}
        except (ValueError, TypeError, IndexError, AttributeError):
            return Marker(path)  # damaged: no dataset, no candidate -> not prepared
        rest = {k: v for k, v in obj.items() if k not in ("files", "dataset", "candidate", "published")}
        return Marker(path, obj.get("dataset"), obj.get("candidate"), rest, files, obj.get("published") is True)
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return Marker(path, fields.pop("dataset", None), fields.pop("candidate", None), fields)


def write_marker(folder: str | os.PathLike, dataset: str, candidate: str, source: str,
                 files: dict[str, tuple[int, str]], published: bool) -> Path:
    """Write the manifest atomically (a temporary file renamed over ``.prepared``)."""
    folder = Path(folder)
    head = {"format": FORMAT, "dataset": dataset, "candidate": candidate, "source": source,
            "prepared": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "published": published, "hash": HASH}
    entries = [f" {json.dumps(rel)}: [{size}, \"{hexdigest}\"]" for rel, (size, hexdigest) in sorted(files.items())]
    text = json.dumps(head)[:-1] + ',\n "files": {\n' + ",\n".join(entries) + "\n}}\n"
    tmp = folder / f"{MARKER}.{os.getpid()}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, folder / MARKER)
    return folder / MARKER


def _walk(root: Path, rels: Iterable[str] | None) -> list[str]:
    """Relative paths of the files under ``root`` (all of them, or those in/under ``rels``), sorted."""
    starts = [root] if rels is None else [root / r for r in rels]
    out = []
    for start in starts:
        if start.is_file():
            out.append(start.relative_to(root).as_posix())
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            out += [(Path(dirpath) / f).relative_to(root).as_posix() for f in filenames]
    return sorted(set(out) - {MARKER})


def hash_files(root: str | os.PathLike, rels: Iterable[str] | None = None,
               desc: str = "hashing") -> dict[str, tuple[int, str]]:
    """``{relative path: (size, sha256)}`` of every file under ``root`` (or under ``rels``)."""
    root = Path(root)
    paths = _walk(root, rels)
    sizes = {rel: (root / rel).stat().st_size for rel in paths}
    out = {}
    with byte_progress(sum(sizes.values()), desc, logger=log) as bar:
        for rel in paths:
            out[rel] = (sizes[rel], digest(root / rel, HASH))
            bar.update(sizes[rel])
    return out


def verify_files(root: str | os.PathLike, files: dict[str, tuple[int, str]],
                 desc: str = "verifying") -> list[tuple[str, str]]:
    """What differs between the files under ``root`` and a manifest, as ``(path, how)`` pairs
    (``("u.data", "size 989,000, expected 1,979,173")``); empty when every file matches. Sizes
    are compared first, so a truncated file is found without reading anything."""
    root = Path(root)
    problems = []
    for rel, (size, _) in sorted(files.items()):
        try:
            got = (root / rel).stat().st_size
        except OSError:
            problems.append((rel, "missing"))
            continue
        if got != size:
            problems.append((rel, f"size {got:,}, expected {size:,}"))
    if problems:
        return problems
    with byte_progress(sum(s for s, _ in files.values()), desc, logger=log) as bar:
        for rel, (size, want) in sorted(files.items()):
            got = digest(root / rel, HASH)
            if got != want:
                problems.append((rel, f"{HASH} {got}, expected {want}"))
            bar.update(size)
    return problems


def prepare_command(data_dir: str | os.PathLike, name: str, force: bool = False) -> str:
    """The command that prepares data set ``name`` in ``data_dir``."""
    return f"./prepare_dataset.sh --data-dir {shlex.quote(str(data_dir))}{' --force' if force else ''} {name}"


def check_file(folder: str | os.PathLike, path: str | os.PathLike, name: str) -> Marker | None:
    """The marker of data set folder ``folder`` (None if it has none), after checking that
    ``path``, if the manifest lists it, still has the recorded size; ValueError naming the file,
    both sizes and the command that prepares ``name`` again otherwise."""
    folder, path = Path(folder), Path(path)
    marker = read_marker(folder)
    if marker is None or not marker.files:
        return marker
    try:
        rel = path.relative_to(folder).as_posix()
    except ValueError:
        return marker
    if rel in marker.files:
        want, got = marker.files[rel][0], path.stat().st_size
        if got != want:
            raise ValueError(f"{path}: {got:,} bytes, but it had {want:,} when it was prepared ({marker.path}); "
                             f"the file changed (truncated?); run `{prepare_command(folder.parent, name, force=True)}`")
    return marker
