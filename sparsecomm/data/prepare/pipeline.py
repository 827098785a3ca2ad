"""Preparing one data set: check what is there, fetch what is missing, unpack, verify, mark.

Per data set, under a lock (``DATA_DIR/.locks/<name>.lock``, flock) so that one rank of a
multi-process job prepares while the others wait:

1. Already prepared? With a manifest marker (:mod:`.prepared`) every listed file is checked
   again (size, then sha256): all match, stop; one differs, say which and how, and prepare the
   data set again (steps 2-3). An old marker without a manifest: its candidate's files are
   checked against the tables of :mod:`.catalog`; they pass, the marker becomes a manifest,
   stop; they fail, the data set is prepared again if the download cache holds verified sources,
   and otherwise accepted as the old marker says, with a warning (tests write such markers by
   hand for tiny data). Expected files present without a marker (copied by hand)? Verify them,
   write the manifest, stop.
2. Take the first candidate whose source files all sit verified in ``DATA_DIR/.downloads/<name>/``;
   otherwise fetch the candidates in order (from the mirror, or upstream without one), each file
   into a temporary file that is verified before it is renamed into the cache.
3. Unpack into a staging folder, verify the extracted files, record the manifest, move them into
   place, write the marker last.

A data set that cannot be prepared raises :class:`Failed` after logging why (for a missing
source: what to download and where to put it).
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from .catalog import DATASETS, SOURCES, candidates, installed, sources
from .checks import describe, effective, is_digest, verify
from .fetch import Unavailable, locations, obtain
from .manifest import MARKER, hash_files, read_marker, verify_files, write_marker
from .unpack import UnpackError, unpack

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["Settings", "Failed", "prepare", "mirror_evidence"]

logger = logging.getLogger(__name__)


@dataclass
class Settings:
    """Where and how to prepare (see ``prepare_dataset.sh --help``)."""

    data_dir: Path
    base: str | None = None          # a mirror: http(s) URL or absolute folder; None: upstream
    overrides: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    force: bool = False
    retries: int = 3
    timeout: float = 20.0
    lock_timeout: float = 7200.0

    @property
    def downloads(self) -> Path:
        return self.data_dir / ".downloads"


class Failed(Exception):
    """The data set could not be prepared; the reason has been logged."""


def prepare(name: str, s: Settings) -> None:
    """Make data set ``name`` ready in ``s.data_dir`` (see the module docstring)."""
    log = logging.LoggerAdapter(logger, {"dataset": name})
    target = s.data_dir / DATASETS[name].folder
    try:
        if not (target / MARKER).exists():
            evidence = mirror_evidence(s.data_dir)
            if evidence:
                d = shlex.quote(str(s.data_dir))
                log.error("DATA_DIR %s looks like a mirror (holds %s), not a data directory; use it as "
                          "SPARSECOMM_DATA_URL=%s (or --base-url %s) and a separate DATA_DIR, e.g. "
                          "`SPARSECOMM_DATA_URL=%s DATA_DIR=./data ./run.sh`", s.data_dir, ", ".join(evidence[:3]),
                          d, d, d)
                raise Failed(name)
        with _locked(s, name, log):
            _prepare_locked(s, name, target, log)
    except OSError as e:
        log.error("cannot prepare it: %s", e)
        raise Failed(name) from None


def mirror_evidence(data_dir: Path) -> list[str]:
    """Source files that sit in ``data_dir`` where a mirror holds them (``movielens-100k/ml-100k.zip``)
    and where no prepared data set puts them."""
    found = []
    for src in SOURCES:
        installed_at = f"{DATASETS[src.dataset].folder}/{src.file}" if src.unpack == "copy" else None
        for rel in (f"{src.mirror_dir}/{src.file}", src.file):
            if rel != installed_at and rel not in found and (data_dir / rel).is_file():
                found.append(rel)
    return found


def _prepare_locked(s: Settings, name: str, target: Path, log) -> None:
    problem = None
    if not s.force:
        done, problem = _check_prepared(s, name, target, log)
        if done or (problem is None and _adopt(s, name, target, log)):
            return
    _remove_stale(s, name)
    for cand in candidates(name):  # a candidate complete in the download cache needs no network
        if _cached(s, name, cand):
            log.info("all %s source files are in the download cache %s", cand, s.downloads / name)
            _install(s, name, cand, target, log)
            return
    attempts: list[str] = []
    for cand in candidates(name):
        if _fetch(s, name, cand, attempts, log):
            _install(s, name, cand, target, log)
            return
    if problem:
        log.error("%s, and it cannot be prepared again:", problem)
    _offline_message(s, name, attempts, log)
    raise Failed(name)


# --- what is there already -----------------------------------------------------------------

def _checks(s: Settings, name: str, file: str, builtin) -> tuple[str, ...]:
    return effective(name, file, builtin, s.overrides)[0]


def _overridden(s: Settings, name: str, cand: str) -> bool:
    keys = [r.file for r in sources(name, cand)] + [i.path for i in installed(name, cand)]
    return any(effective(name, k, (), s.overrides)[1] for k in keys)


def _present(name: str, cand: str, root: Path) -> bool:
    return all((root / i.path).exists() for i in installed(name, cand))


def _first_bad(s: Settings, name: str, cand: str, root: Path):
    """The first installed path of ``cand`` under ``root`` that fails its checks, as
    ``(path, expected, got)``; None when all pass."""
    for i in installed(name, cand):
        checks = _checks(s, name, i.path, i.checks)
        verdict = verify(root / i.path, checks)
        if not verdict.ok:
            return i.path, describe(checks), verdict.got
    return None


def _published_in_place(s: Settings, name: str, cand: str) -> bool:
    """Files verified where they are count as the published data set when no override was
    involved and a published digest vouched for them (theirs, or their cached sources')."""
    if _overridden(s, name, cand):
        return False
    return any(is_digest(c) for i in installed(name, cand) for c in i.checks) or _cached(s, name, cand)


def _mark_in_place(s: Settings, name: str, cand: str, target: Path, source: str) -> None:
    files = hash_files(target, [i.path for i in installed(name, cand)], desc=f"[{name}] recording")
    write_marker(target, name, cand, source, files, _published_in_place(s, name, cand))


def _check_prepared(s: Settings, name: str, target: Path, log) -> tuple[bool, str | None]:
    """(ready, problem): ready when the marker's files check out; ``problem`` names the file
    that does not when the data set must be prepared again."""
    marker = read_marker(target)
    if marker is None:
        return False, None
    if marker.files is not None:
        problems = verify_files(target, marker.files, desc=f"[{name}] verifying")
        if not problems:
            log.info("already prepared in %s (%s files match its manifest)", target, f"{len(marker.files):,}")
            return True, None
        rel, how = problems[0]
        more = f"; {len(problems) - 1} more file(s) differ" if len(problems) > 1 else ""
        problem = f"{target / rel} changed since it was prepared ({how}{more})"
        log.warning("%s; preparing it again", problem)
        return False, problem
    cand = marker.candidate
    if cand not in candidates(name) or not _present(name, cand, target):
        return False, None
    bad = _first_bad(s, name, cand, target)
    if bad is None:
        _mark_in_place(s, name, cand, target, marker.fields.get("source", "old marker"))
        log.info("already prepared in %s (files of its old marker verified; marker upgraded to a manifest)", target)
        return True, None
    path, expected, got = bad
    problem = f"{target / path} does not match the checksum tables (expected {expected}, got {got})"
    if any(_cached(s, name, c) for c in candidates(name)):
        log.warning("%s; preparing it again", problem)
        return False, problem
    log.warning("%s, and no verified download is cached to prepare it again; accepted as its old marker says "
                "(run with --force to replace it)", problem)
    return True, None


def _adopt(s: Settings, name: str, target: Path, log) -> bool:
    """Complete files already there without a marker (copied by hand)? Verify them and mark them."""
    if not target.is_dir():
        return False
    for cand in candidates(name):
        if not _present(name, cand, target):
            continue
        bad = _first_bad(s, name, cand, target)
        if bad is None:
            _mark_in_place(s, name, cand, target, "existing files")
            log.info("found complete %s files in %s (verified where checksums are known); marked as prepared",
                     cand, target)
            return True
        log.warning("existing %s files in %s do not verify (%s: got %s); preparing again", cand, target, bad[0], bad[2])
    return False


# --- fetching ------------------------------------------------------------------------------

def _remove_stale(s: Settings, name: str) -> None:
    """Leftovers of an interrupted run (we hold the lock, so nobody else is working)."""
    for p in [*(s.data_dir / ".tmp").glob(f"{name}.*"), *(s.downloads / name).glob(".*.part.*")]:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _cached(s: Settings, name: str, cand: str) -> bool:
    """Every source file of ``cand`` present and verified in the download cache (no network)."""
    return all(verify(s.downloads / name / r.file, _checks(s, name, r.file, r.checks)).ok
               for r in sources(name, cand))


def _fetch(s: Settings, name: str, cand: str, attempts: list[str], log) -> bool:
    """Make every source file of ``cand`` present and verified in the download cache. False when
    a file cannot be obtained (``attempts`` says where it was looked for); Failed on a checksum
    mismatch."""
    cache_dir = s.downloads / name
    cache_dir.mkdir(parents=True, exist_ok=True)
    mode = 0o666 & ~_umask()
    for src in sources(name, cand):
        cache = cache_dir / src.file
        checks = _checks(s, name, src.file, src.checks)
        if cache.is_file():
            verdict = verify(cache, checks)
            if verdict.ok:
                log.info("using cached %s", cache)
                continue
            log.error("cached %s does not match: expected %s, got %s; removing it", cache, describe(checks),
                      verdict.got)
            cache.unlink()
        for loc in locations(s.base, src.mirror_dir, src.file, src.url):
            fd, tmp_name = tempfile.mkstemp(prefix=f".{src.file}.part.", dir=cache_dir)
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                log.info("%s %s", "fetching" if loc.startswith(("http://", "https://")) else "copying", loc)
                try:
                    obtain(loc, tmp, s.retries, s.timeout)
                except Unavailable as e:
                    log.info("  not available: %s", e)
                    attempts.append(f"{loc}  ({e})")
                    continue
                verdict = verify(tmp, checks)
                if not verdict.ok:
                    log.error("checksum mismatch for %s from %s: expected %s, got %s. The download was deleted.",
                              src.file, loc, describe(checks), verdict.got)
                    raise Failed(name)
                os.chmod(tmp, mode)  # mkstemp made it 0600; use the umask
                os.replace(tmp, cache)
                log.info("verified %s (%s)", src.file, verdict.matched or describe(checks))
                break
            finally:
                tmp.unlink(missing_ok=True)
        else:
            return False
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- installing ----------------------------------------------------------------------------

def _install(s: Settings, name: str, cand: str, target: Path, log) -> None:
    """Unpack ``cand`` from the download cache into a staging folder, verify, record, move into place."""
    (s.data_dir / ".tmp").mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=s.data_dir / ".tmp"))
    try:
        out = stage / "out"
        log.info("unpacking (%s) ...", cand)
        try:
            for src in sources(name, cand):
                unpack(src.unpack, s.downloads / name / src.file, out)
        except UnpackError as e:
            log.error("%s", e)
            raise Failed(name) from None
        bad = _first_bad(s, name, cand, out)
        if bad is not None:
            log.error("extracted file %s does not match: expected %s, got %s", *bad)
            raise Failed(name)
        files = hash_files(out, desc=f"[{name}] recording")
        target.mkdir(parents=True, exist_ok=True)
        (target / MARKER).unlink(missing_ok=True)
        for entry in sorted(out.iterdir()):
            dest = target / entry.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            elif dest.exists() or dest.is_symlink():
                dest.unlink()
            os.replace(entry, dest)
        write_marker(target, name, cand, s.base or "upstream", files, published=not _overridden(s, name, cand))
        log.info("ready: %s", target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# --- locking and messages ------------------------------------------------------------------

@contextmanager
def _locked(s: Settings, name: str, log) -> Iterator[None]:
    """Hold ``DATA_DIR/.locks/<name>.lock`` (flock; the same lock the shell version took)."""
    if fcntl is None:  # pragma: no cover
        log.warning("no flock on this system; preparing without a lock")
        yield
        return
    path = s.data_dir / ".locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        if not _try_lock(f):
            log.info("another process is preparing it (lock %s); waiting up to %gs", path, s.lock_timeout)
            deadline = time.monotonic() + s.lock_timeout
            while not _try_lock(f):
                if time.monotonic() >= deadline:
                    log.error("timed out waiting for %s", path)
                    raise Failed(name)
                time.sleep(0.2)
        yield


def _try_lock(f) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _offline_message(s: Settings, name: str, attempts: list[str], log) -> None:
    lines = [f"could not obtain {DATASETS[name].title} from any source."]
    if attempts:
        lines += ["  tried:"] + [f"    {a}" for a in attempts]
    lines.append("  To prepare it offline, download ONE of these file sets:")
    for n, cand in enumerate(candidates(name), 1):
        rows = sources(name, cand)
        lines.append(f"    ({n}) {cand}  (mirror subfolder: {rows[0].mirror_dir}/)")
        for r in rows:
            where = (f"from {r.url}" if r.url else
                     f"local mirrors only (no public URL), e.g. the shared data folder's {r.mirror_dir}/{r.file}")
            lines.append(f"          {r.file:<28} {where}")
            lines.append(f"          {'':<28} {describe(_checks(s, name, r.file, r.checks))}")
    d = shlex.quote(str(s.data_dir))
    lines += [f"  and put the file(s) either in {s.downloads / name}/ (this data directory's download cache)",
              "  and run again, or in a mirror folder FOLDER (in FOLDER/<subfolder>/ as listed, or in FOLDER/",
              f"  itself) and run `./prepare_dataset.sh --base-url FOLDER --data-dir {d} {name}`, or for a",
              "  training job `SPARSECOMM_DATA_URL=FOLDER ./run.sh` (run.sh has no --base-url option; it passes",
              "  SPARSECOMM_DATA_URL on to prepare_dataset.sh)."]
    log.error("\n".join(lines))
