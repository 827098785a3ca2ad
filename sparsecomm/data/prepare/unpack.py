"""Unpack steps: a downloaded source file becomes (part of) a data set folder.

``copy`` keeps the file as it is; ``tar`` extracts a tar.gz as it is; ``unzip:PREFIX`` extracts
the ``PREFIX/`` folder of a zip (its contents become the data set folder, the rest of the zip is
left out). Only regular files and folders are unpacked, only inside the output folder, with the
unpacking time as modification time (so caches beside the data see the new files as new) and
permissions from the umask. A progress bar shows on a terminal.
"""
from __future__ import annotations

import logging
import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable

from ...progress import byte_progress

log = logging.getLogger(__name__)

__all__ = ["UNPACKERS", "UnpackError", "unpack"]


class UnpackError(Exception):
    """The source file cannot be unpacked; the message names it and says why."""


def _inside(out: Path, name: str, archive: Path) -> Path:
    """``out/name`` for an archive member name that stays inside ``out``; else UnpackError."""
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
        raise UnpackError(f"{archive.name}: member {name!r} would land outside the data set folder")
    return out.joinpath(*parts)


def _write(src: BinaryIO, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as f:
        shutil.copyfileobj(src, f, 1 << 20)


def _copy(src: Path, out: Path, arg: str) -> None:
    with open(src, "rb") as f:
        _write(f, out / src.name)


class _Counting:
    """A file object that advances a progress bar by the bytes read (compressed bytes of a tar.gz)."""

    def __init__(self, f: BinaryIO, bar) -> None:
        self.f, self.bar = f, bar

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.bar.update(len(data))
        return data


def _untar(src: Path, out: Path, arg: str) -> None:
    try:
        with open(src, "rb") as raw, byte_progress(src.stat().st_size, f"unpacking {src.name}", logger=log) as bar, \
                tarfile.open(fileobj=_Counting(raw, bar), mode="r|*") as tar:
            for member in tar:
                if member.isdir() and not PurePosixPath(member.name).parts:
                    continue  # "./", the archive's own top folder
                dest = _inside(out, member.name, src)
                if member.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                elif member.isfile():
                    _write(tar.extractfile(member), dest)
                else:
                    raise UnpackError(f"{src.name}: member {member.name!r} is not a file or folder")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UnpackError(f"cannot extract {src.name}: {e}") from None


def _unzip(src: Path, out: Path, prefix: str) -> None:
    try:
        with zipfile.ZipFile(src) as z:
            members = [i for i in z.infolist() if PurePosixPath(i.filename).parts[:1] == (prefix,)]
            if not members:
                raise UnpackError(f"{src.name} does not contain the folder {prefix}/")
            with byte_progress(sum(i.file_size for i in members), f"unpacking {src.name}", logger=log) as bar:
                for info in members:
                    rel = PurePosixPath(info.filename).relative_to(prefix)
                    if not rel.parts:
                        continue
                    dest = _inside(out, rel.as_posix(), src)
                    if info.is_dir():
                        dest.mkdir(parents=True, exist_ok=True)
                    else:
                        with z.open(info) as f:
                            _write(f, dest)
                    bar.update(info.file_size)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UnpackError(f"cannot extract {src.name}: {e}") from None


# step name (before any ':') -> function(source file, output folder, argument after the ':')
UNPACKERS: dict[str, Callable[[Path, Path, str], None]] = {"copy": _copy, "tar": _untar, "unzip": _unzip}


def unpack(step: str, src: Path, out: Path) -> None:
    """Apply unpack step ``step`` (``copy``, ``tar`` or ``unzip:PREFIX``) to ``src``, writing into ``out``."""
    kind, _, arg = step.partition(":")
    if kind not in UNPACKERS:
        raise UnpackError(f"unknown unpack step {step!r}; expected one of {', '.join(UNPACKERS)} (unzip:PREFIX)")
    out.mkdir(parents=True, exist_ok=True)
    UNPACKERS[kind](src, out, arg)
