"""Getting one file from a mirror or upstream: where to look, and the transfer itself.

A location is an ``http(s)://`` URL or an absolute path (a plain folder or ``file://`` mirror).
Downloads follow torchvision's ``download_url`` (urllib, a tqdm progress bar on a terminal) with
what preparing many ranks' data on flaky links needs and it lacks: one request per file (it first
probes redirects with an extra GET), a timeout on connecting and on stalls, retries of
transient failures, a check of the received length against Content-Length, and no silent
retry of an https URL over plain http. The caller verifies the result before using it.
"""
from __future__ import annotations

import http.client
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from ...progress import byte_progress

__all__ = ["Unavailable", "locations", "obtain"]

log = logging.getLogger(__name__)

USER_AGENT = "sparsecomm-prepare/1 (python-urllib)"
CHUNK = 1 << 16
RETRY_DELAY_S = 2.0
RETRY_HTTP = (408, 429, 500, 502, 503, 504)  # curl --retry's transient HTTP answers


class Unavailable(Exception):
    """The location cannot give the file; the message says why."""


class _Transient(Exception):
    """A failure worth retrying: a timeout, a transient HTTP status, a cut-off transfer."""


def locations(base: str | None, mirror_dir: str, file: str, url: str | None) -> list[str]:
    """Where to look for ``file``: with a mirror ``base``, its ``mirror_dir`` subfolder, then its
    top level (upstream is not contacted); without one, the upstream ``url`` if there is one."""
    if base:
        sep = "/" if base.startswith(("http://", "https://")) else os.sep
        return [f"{base}{sep}{mirror_dir}{sep}{file}", f"{base}{sep}{file}"]
    return [url] if url else []


def obtain(location: str, dest: Path, retries: int = 3, timeout: float = 20.0) -> None:
    """Write the file at ``location`` to ``dest``; :class:`Unavailable` if it cannot."""
    if not location.startswith(("http://", "https://")):
        src = Path(location)
        if not src.is_file():
            raise Unavailable("no such file")
        try:
            with open(src, "rb") as f:
                _copy(f, dest, src.stat().st_size, src.name)
        except OSError as e:
            raise Unavailable(f"copy failed: {e}") from None
        return
    for attempt in range(retries + 1):
        try:
            _download(location, dest, timeout)
            return
        except _Transient as e:
            if attempt == retries:
                raise Unavailable(f"{e} (tried {retries + 1} time(s))") from None
            log.info("  %s; retrying in %.0f s (%d of %d)", e, RETRY_DELAY_S, attempt + 1, retries)
            time.sleep(RETRY_DELAY_S)


def _download(url: str, dest: Path, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code in RETRY_HTTP:
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        raise Unavailable(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
            raise _Transient(f"no connection within {timeout:g} s") from None
        raise Unavailable(str(e.reason)) from None
    except (socket.timeout, TimeoutError):
        raise _Transient(f"no answer within {timeout:g} s") from None
    except (OSError, http.client.HTTPException) as e:
        raise Unavailable(f"{type(e).__name__}: {e}") from None
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        try:
            got = _copy(response, dest, total, os.path.basename(url))
        except (socket.timeout, TimeoutError):
            raise _Transient(f"the transfer stalled for {timeout:g} s") from None
        except (OSError, http.client.HTTPException) as e:
            raise _Transient(f"the transfer failed ({type(e).__name__}: {e})") from None
    if total is not None and got != total:
        raise _Transient(f"the transfer ended after {got:,} of {total:,} bytes")


def _copy(src: BinaryIO, dest: Path, total: int | None, name: str) -> int:
    """Copy a stream to ``dest`` with a progress bar (on a terminal); the number of bytes copied."""
    n = 0
    with open(dest, "wb") as out, byte_progress(total, name, logger=log) as bar:
        while chunk := src.read(CHUNK):
            out.write(chunk)
            n += len(chunk)
            bar.update(len(chunk))
    return n
