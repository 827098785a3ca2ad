"""Checks of a downloaded or unpacked file (or folder), and the tables that override them.

A check is one word, ``KIND:VALUE`` or ``-``:

- ``md5:HEX``, ``sha256:HEX``: the file's digest;
- ``gz-md5:HEX``, ``gz-sha256:HEX``: the digest of the file's gunzipped content (a mirror may
  re-gzip a file: its .gz bytes then differ, its content does not);
- ``jpgs:CxN``: a folder holding exactly C class folders of N ``.jpg`` files each;
- ``-``: presence only (no published checksum).

A list of checks passes when the path exists, every structure check (``jpgs``) passes and, if
there are digest checks, at least one of them matches (a file may have several accepted forms).

An override table (``--checksums``) holds lines as ``md5sum``/``sha256sum`` write them
(``HEX  NAME``: 32 hex digits md5, 64 sha256) or ``CHECK  NAME``; NAME is a file name of the
catalog, optionally ``DATASET/NAME``. All lines for a name replace all its built-in checks.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

__all__ = ["KINDS", "Verdict", "parse_check", "describe", "digest", "verify", "load_overrides", "effective",
           "is_digest"]

CHUNK = 1 << 20
# digest kinds: name -> (hashlib algorithm, of the gunzipped content?)
_DIGESTS = {"md5": ("md5", False), "sha256": ("sha256", False), "gz-md5": ("md5", True), "gz-sha256": ("sha256", True)}


def _count_jpgs(path: Path, spec: str) -> str:
    """``spec`` (``CxN``) if ``path`` holds exactly C class folders of N .jpg each, else what it holds."""
    want_c, want_n = (int(x) for x in spec.split("x"))
    classes = sorted((e for e in os.scandir(path) if e.is_dir()), key=lambda e: e.name) if path.is_dir() else []
    bad = []
    for c in classes:
        n = sum(1 for f in os.scandir(c.path) if f.is_file() and f.name.endswith(".jpg"))
        if n != want_n:
            bad.append(f"{c.name}:{n}")
    if len(classes) == want_c and not bad:
        return spec
    return f"{len(classes)} class folders" + (f", wrong counts {' '.join(bad)}" if bad else "")


# structure kinds: name -> (check(path, value) -> what was found (== value when it passes), description)
_STRUCTURES: dict[str, tuple[Callable[[Path, str], str], Callable[[str], str]]] = {
    "jpgs": (_count_jpgs, lambda v: f"{v.split('x')[0]} class folders of {v.split('x')[1]} .jpg each"),
}
KINDS = (*_DIGESTS, *_STRUCTURES, "-")


def parse_check(word: str) -> str:
    """``word`` if it is a valid check; else ValueError naming it and the allowed kinds."""
    if word == "-":
        return word
    kind, _, value = word.partition(":")
    ok = bool(value) and (
        (kind in _DIGESTS and all(c in "0123456789abcdefABCDEF" for c in value)) or
        (kind == "jpgs" and len(value.split("x")) == 2 and all(p.isdigit() for p in value.split("x"))))
    if not ok:
        raise ValueError(f"bad check {word!r}; expected KIND:VALUE with KIND one of "
                         f"{', '.join(k for k in KINDS if k != '-')} (jpgs:CxN), or '-'")
    return f"{kind}:{value.lower()}" if kind in _DIGESTS else word


def is_digest(check: str) -> bool:
    return check.partition(":")[0] in _DIGESTS


def describe(checks: Iterable[str]) -> str:
    """Human words for a list of checks: ``md5 X or md5 Y of the gunzipped content``."""
    out = []
    for c in checks:
        kind, _, value = c.partition(":")
        if c == "-":
            out.append("(no published checksum; presence only)")
        elif kind in _STRUCTURES:
            out.append(_STRUCTURES[kind][1](value))
        elif _DIGESTS[kind][1]:
            out.append(f"{_DIGESTS[kind][0]} {value} of the gunzipped content")
        else:
            out.append(f"{kind} {value}")
    return " or ".join(out)


def digest(path: str | os.PathLike, kind: str = "sha256") -> str:
    """Hex digest of a file (kind: md5, sha256, gz-md5, gz-sha256); ``not-gzip-data`` for a gz-
    kind on a file that does not gunzip."""
    algo, gunzip = _DIGESTS[kind]
    h = hashlib.new(algo)
    try:
        with (gzip.open if gunzip else open)(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    except (gzip.BadGzipFile, EOFError, zlib.error):
        return "not-gzip-data"
    return h.hexdigest()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    got: str = ""       # what was found when it failed: "md5 abc, gz-md5 def", "missing", ...
    matched: str = ""   # the check that matched, described


def verify(path: str | os.PathLike, checks: Sequence[str]) -> Verdict:
    """Check ``path`` against ``checks`` (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        return Verdict(False, "missing")
    digests: dict[str, str] = {}
    found, structure_ok, matched = [], True, ""
    for c in checks:
        kind, _, value = c.partition(":")
        if kind in _STRUCTURES:
            got = _STRUCTURES[kind][0](path, value)
            if got != value:
                structure_ok = False
                found.append(got)
        elif kind in _DIGESTS:
            if kind not in digests:
                digests[kind] = digest(path, kind)
            if digests[kind] == value and not matched:
                matched = describe([c])
    has_digest = bool(digests)
    ok = structure_ok and (not has_digest or bool(matched))
    found += [f"{k} {v}" for k, v in digests.items()]
    return Verdict(ok, "" if ok else ", ".join(found), matched)


def load_overrides(path: str | os.PathLike) -> dict[str, tuple[str, ...]]:
    """An override table as ``{name: checks}``; ValueError naming the file and line it cannot read."""
    table: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            words = line.split("#", 1)[0].split(maxsplit=1)
            if len(words) < 2:
                continue
            check, name = words[0], words[1].strip().lstrip("*")   # `*`: md5sum's binary-mode marker
            if ":" not in check and check != "-":
                kind = {32: "md5", 64: "sha256"}.get(len(check))
                if kind is None:
                    raise ValueError(f"checksum file {path}, line {lineno}: cannot read {line.strip()!r} "
                                     f"(expected a 32- or 64-digit hex digest, or KIND:VALUE, then a name)")
                check = f"{kind}:{check}"
            try:
                table.setdefault(name, []).append(parse_check(check))
            except ValueError as e:
                raise ValueError(f"checksum file {path}, line {lineno}: {e}") from None
    return {k: tuple(v) for k, v in table.items()}


def effective(dataset: str, name: str, builtin: Sequence[str],
              overrides: Mapping[str, Sequence[str]]) -> tuple[tuple[str, ...], bool]:
    """The checks that apply to file ``name`` of ``dataset``, and whether an override supplied them."""
    for key in (f"{dataset}/{name}", name):
        if key in overrides:
            return tuple(overrides[key]), True
    return tuple(builtin), False
