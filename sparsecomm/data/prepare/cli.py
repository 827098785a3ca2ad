"""``prepare_dataset.sh``: fetch, verify, unpack and lay out the benchmark data sets.

    ./prepare_dataset.sh [options] NAME...        (or: python -m sparsecomm.data.prepare ...)

NAME is a data set of :data:`~sparsecomm.data.prepare.catalog.DATASETS`, or ``all``. Options (each also
has an environment variable):

--data-dir DIR     where the data sets go (``DATA_DIR``; default ``<repo>/data`` from the shell
                   script, ``./data`` otherwise)
--base-url URL     a mirror to fetch from instead of the public upstream sources
                   (``SPARSECOMM_DATA_URL``): ``http://...``, ``https://...``, ``file:///abs/path``
                   or a plain folder, holding the upstream file names either in a subfolder named
                   as in the shared data folder (``cifar10-jpeg/``, ``mnist/``, ``ptb/``,
                   ``movielens-100k/``, ``wikitext-2/``, ...; the catalog's MIRROR-DIR column) or
                   at its top level; the subfolder is tried first. With a base URL the public
                   upstream locations are not contacted.
--checksums FILE   a checksum table overriding the built-in one, for tests and for private
                   mirrors holding re-packed files (``SPARSECOMM_CHECKSUMS``; format in
                   :mod:`.checks`)
--force            prepare again even if the data set is complete (the download cache in
                   ``DATA_DIR/.downloads`` is still used)

Environment only: ``SPARSECOMM_FETCH_RETRIES`` (3), ``SPARSECOMM_CONNECT_TIMEOUT`` (20 s, for
connecting and for a stalled transfer), ``SPARSECOMM_LOCK_TIMEOUT`` (7200 s).

What happens per data set: :mod:`.preparation`. Exit status: 0 all requested data sets ready;
1 one or more failed (unreachable, bad checksum); 2 usage error (unknown option or data set
name, no data set named, unreadable checksum table, bad base URL or setting).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Mapping, Sequence

from .catalog import DATASETS, names
from .checks import load_overrides
from .pipeline import Failed, Settings, prepare

__all__ = ["PROG", "main", "build_parser", "configure_logging"]

PROG = "prepare_dataset.sh"
log = logging.getLogger("sparsecomm.data.prepare.cli")  # also when run as __main__


class UsageError(Exception):
    """A bad command line or setting (exit status 2)."""


class Interrupted(Exception):
    """SIGINT/SIGTERM; ``code`` is the exit status (128 + signal)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {d.name:<14} {d.title:<52} -> DIR/{d.folder}/" for d in DATASETS.values())
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{PROG} [--data-dir DIR] [--base-url URL] [--checksums FILE] [--force] NAME...",
        description=("Fetches, verifies (md5/sha256), unpacks and lays out benchmark data sets under DIR\n"
                     "(default: $DATA_DIR; prepare_dataset.sh sets it to <repo>/data when unset).\n\n"
                     f"Data sets (NAME), or `all` for every one:\n{listing}"),
        epilog=("Environment: DATA_DIR, SPARSECOMM_DATA_URL, SPARSECOMM_CHECKSUMS (as the options);\n"
                "SPARSECOMM_FETCH_RETRIES (3), SPARSECOMM_CONNECT_TIMEOUT (20 s), SPARSECOMM_LOCK_TIMEOUT (7200 s).\n"
                "A data set is re-checked against the manifest in DIR/<folder>/.prepared before it is\n"
                "reported as already prepared. Exit status: 0 ready, 1 failed, 2 usage error.\n\n"
                "Example, offline from the shared data folder:\n"
                f"  {PROG} --base-url ../shared/data ptb mnist ml-100k cifar10\n"
                "or for a training job: SPARSECOMM_DATA_URL=../shared/data ./run.sh"))
    parser.add_argument("names", nargs="*", metavar="NAME", help="data sets to prepare, or all")
    parser.add_argument("--data-dir", metavar="DIR", help="target folder (env DATA_DIR)")
    parser.add_argument("--base-url", metavar="URL",
                        help="fetch from a mirror instead of upstream (env SPARSECOMM_DATA_URL): http(s)://host/path, "
                             "file:///abs/path or a plain folder, holding the upstream file names in MIRROR-DIR "
                             "subfolders (cifar10-jpeg/, mnist/, ptb/, movielens-100k/, wikitext-2/, ...) or at its "
                             "top level")
    parser.add_argument("--checksums", metavar="FILE",
                        help="extra checksum table overriding the built-in one, for tests and private mirrors "
                             "(env SPARSECOMM_CHECKSUMS): lines `<hex>  <name>` as md5sum/sha256sum write them, or "
                             "`<kind>:<value>  <name>` with kind md5, sha256, gz-md5, gz-sha256, jpgs (CxN) or `-`")
    parser.add_argument("--force", action="store_true", help="prepare again even when complete")
    return parser


def _base(url: str) -> str:
    """A mirror location as fetch uses it: an http(s) URL without a trailing /, or an absolute folder."""
    if url.startswith(("http://", "https://")):
        return url.rstrip("/")
    if url.startswith("file://"):
        url = url[len("file://"):]
        url = url[len("localhost"):] if url.startswith("localhost") else url
        if not url.startswith("/"):
            raise UsageError(f"file:// URLs need an absolute path: {url!r}")
    elif "://" in url:
        raise UsageError(f"unsupported base URL {url!r} (http://, https://, file:// or a folder)")
    path = os.path.abspath(url)
    if os.path.isdir(path):
        return os.path.realpath(path)
    log.warning("base folder %s does not exist", path)
    return path


def _number(environ: Mapping[str, str], key: str, default: float, kind=int, least: float = 0) -> float:
    """A numeric setting from the environment, at least ``least``; UsageError naming it otherwise."""
    value = environ.get(key) or str(default)
    try:
        number = kind(value)
    except ValueError:
        number = least - 1
    if not number >= least:
        raise UsageError(f"{key} must be a {'whole ' if kind is int else ''}number >= {least:g}, got {value!r}")
    return number


def settings_from(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Settings from the options, falling back on the environment; UsageError when one is bad."""
    base = args.base_url or environ.get("SPARSECOMM_DATA_URL") or None
    checksums = args.checksums or environ.get("SPARSECOMM_CHECKSUMS") or None
    overrides = {}
    if checksums:
        try:
            overrides = load_overrides(checksums)
        except OSError:
            raise UsageError(f"checksum file {checksums!r} not found or not readable") from None
        except ValueError as e:
            raise UsageError(str(e)) from None
        log.info("using %d checksum override(s) from %s", sum(map(len, overrides.values())), checksums)
    return Settings(
        data_dir=Path(os.path.abspath(args.data_dir or environ.get("DATA_DIR") or "data")),
        base=_base(base) if base else None, overrides=overrides, force=args.force,
        retries=int(_number(environ, "SPARSECOMM_FETCH_RETRIES", 3)),
        timeout=_number(environ, "SPARSECOMM_CONNECT_TIMEOUT", 20, float, least=0.1),
        lock_timeout=_number(environ, "SPARSECOMM_LOCK_TIMEOUT", 7200, float))


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the command line; the exit status (0 ready, 1 failed, 2 usage error)."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    try:
        args = parser.parse_intermixed_args(argv)
    except SystemExit as e:  # argparse has printed the usage error (or --help)
        return int(e.code or 0)
    if not args.names:
        parser.print_help(sys.stderr)
        return 2
    selected = []
    for name in args.names:
        if name != "all" and name not in DATASETS:
            parser.print_usage(sys.stderr)
            print(f"{PROG}: unknown dataset {name!r}; allowed: {' '.join(names())} (or all)", file=sys.stderr)
            return 2
        selected += names() if name == "all" else [name]
    try:
        settings = settings_from(args, environ)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    log.info("data directory %s; source %s", settings.data_dir, settings.base or "upstream (public URLs)")
    ready, failed = [], []
    try:
        for name in dict.fromkeys(selected):
            try:
                prepare(name, settings)
                ready.append(name)
            except Failed:
                failed.append(name)
    except (KeyboardInterrupt, Interrupted) as e:
        log.error("interrupted")
        return e.code if isinstance(e, Interrupted) else 130
    if failed:
        log.error("ready: %s; FAILED: %s", " ".join(ready) or "none", " ".join(failed))
        return 1
    log.info("ready: %s", " ".join(ready))
    return 0


class _LineFormatter(logging.Formatter):
    """``[dataset] WARNING: message`` for one data set's events, ``prepare_dataset.sh: message`` otherwise."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        dataset = getattr(record, "dataset", None)
        if dataset is None:
            return f"{PROG}: {'warning: ' if record.levelno == logging.WARNING else ''}{message}"
        level = {logging.WARNING: "WARNING: ", logging.ERROR: "ERROR: "}.get(record.levelno, "")
        return f"[{dataset}] {level}{message}"


def configure_logging() -> None:
    """One line per event: information on stdout, warnings and errors on stderr."""
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(lambda r: r.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    for h in (out, err):
        h.setFormatter(_LineFormatter())
    package = logging.getLogger("sparsecomm.data")
    package.setLevel(logging.INFO)
    package.handlers[:] = [out, err]
    package.propagate = False


def _interrupt(signum: int, frame) -> None:
    raise Interrupted(128 + signum)


def run() -> int:
    """The command: logging for a person, SIGTERM as an interruption, then :func:`main`."""
    configure_logging()
    signal.signal(signal.SIGTERM, _interrupt)
    return main()


if __name__ == "__main__":
    sys.exit(run())
