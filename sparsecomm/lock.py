"""One job's claim on something on disk (a run directory, a sweep): a lock file that works on
the shared file systems clusters use and that a dead job cannot hold forever.

The lock is a small JSON file saying who holds it: host, pid, the process's start time (so a
reused pid is not mistaken for the holder), the host's boot id, when, the command and the SLURM
job. It is made atomically, also on NFS and Lustre: the record is written to a temporary file
of its own, which is then hard-linked to the lock's name (``link`` fails if the name exists,
as ``O_EXCL`` does; where hard links are not supported, ``O_CREAT | O_EXCL`` is used). While
held, a thread touches the file every :data:`HEARTBEAT_S` seconds.

A lock whose holder is dead is taken over, with one log line saying whose it was. On the
holder's own host, dead means no process with that pid and start time; seen from another host
(or after the holder's host restarted), dead means no heartbeat for :data:`STALE_S` seconds,
measured on the file system's own clock (the modification time of a file just written beside
it), so the hosts' clocks need not agree.

Importing this module does not import torch.
"""
from __future__ import annotations

import atexit
import dataclasses
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RunLock", "Holder", "Held", "LockError", "HEARTBEAT_S", "STALE_S", "HOST"]

log = logging.getLogger(__name__)

HEARTBEAT_S = 15.0  # how often a held lock's file is touched
STALE_S = 180.0  # a lock of another host untouched this long is a dead job's
HOST = socket.gethostname()
_ATTEMPTS = 10  # a lock that changes while we look at it (released, taken over) is looked at again

# link() errors that mean "no hard links here" rather than "cannot write here"
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}


class LockError(Exception):
    """The lock cannot be taken because its file cannot be written (one line: path and OS error)."""


class Held(Exception):
    """The lock is held by a live job, :attr:`holder`."""

    def __init__(self, holder: "Holder") -> None:
        super().__init__(holder.describe())
        self.holder = holder


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its file says; ``alive`` why it counts as alive (or why not)."""

    host: str
    pid: int
    since: float
    start: int | None = None  # process start time, clock ticks after boot (/proc/<pid>/stat)
    boot: str | None = None
    command: str = ""
    slurm_job: str | None = None
    token: str = ""
    alive: str = ""

    def describe(self) -> str:
        """``pid 1234 on host node1 since 2026-12-06 20:58:12 (alive; SLURM job 42)``."""
        notes = "; ".join(n for n in (self.alive, self.slurm_job and f"SLURM job {self.slurm_job}") if n)
        notes = f" ({notes})" if notes else ""
        if not self.pid:
            return f"a job whose lock file cannot be read{notes}"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on host {self.host} since {when}{notes}"

    def how_to_stop(self) -> str:
        """``scancel 42``, ``kill 1234``, ``kill 1234 on node1``."""
        if self.slurm_job:
            return f"scancel {self.slurm_job}"
        if not self.pid:
            return "remove the lock file if no job is running"
        return f"kill {self.pid}" + ("" if self.host == HOST else f" on {self.host}")


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot); None when there is none, or it is a
    zombie. Raises OSError where /proc cannot tell."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _is_alive(pid: int, start: int | None) -> bool:
    """Is process ``pid`` of this host still the one that started at ``start``?"""
    try:
        now = _start_time(pid)
    except (OSError, ValueError, IndexError):  # no /proc: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return now is not None and (start is None or now == start)


def _slurm_job() -> str | None:
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or None


class RunLock:
    """The lock file at ``path``, for ``what`` (``run directory runs/x``: the messages name it).

    :meth:`acquire` takes it or raises :class:`Held` (a live job holds it) or :class:`LockError`
    (its file cannot be written); :meth:`release` gives it back (also at interpreter exit);
    :meth:`holder` says, without writing anything, which live job holds it."""

    def __init__(self, path: Path, what: str, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.path = Path(path)
        self.what = what
        self.heartbeat_s = heartbeat_s
        self.token = uuid.uuid4().hex
        self.held = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # ------------------------------------------------------------------ reading
    def _read(self) -> tuple[Holder, float] | None:
        """The holder the file names and the file's modification time (its last heartbeat);
        None when there is no lock. A file that cannot be parsed (being written where hard links
        are not supported, or damaged) names an unknown holder."""
        try:
            with open(self.path, "rb") as f:
                text, beat = f.read(), os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
            return Holder(str(record["host"]), int(record["pid"]), float(record["since"]), record.get("start"),
                          record.get("boot"), str(record.get("command", "")), record.get("slurm_job"),
                          str(record.get("token", ""))), beat
        except (ValueError, TypeError, KeyError):
            return Holder("", 0, 0.0), beat

    @staticmethod
    def _judge(holder: Holder, beat: float, now: float) -> tuple[bool, str]:
        """Is the holder alive, and why (or why not)?"""
        if holder.host == HOST and holder.boot == _boot_id():
            if _is_alive(holder.pid, holder.start):
                return True, "alive"
            return False, "that process is gone"
        age = now - beat
        if age > STALE_S:
            return False, f"its heartbeat stopped {age / 60:.0f} min ago"
        return True, f"heartbeat {max(age, 0):.0f} s ago"

    def holder(self) -> Holder | None:
        """The live job holding the lock, or None (no lock, or a dead job's); writes nothing."""
        found = self._read()
        if found is None:
            return None
        holder, beat = found
        alive, why = self._judge(holder, beat, time.time())
        return dataclasses.replace(holder, alive=why) if alive else None

    # ------------------------------------------------------------------ taking
    def _record(self) -> bytes:
        start = None
        try:
            start = _start_time(os.getpid())
        except (OSError, ValueError, IndexError):
            pass
        return json.dumps({"host": HOST, "pid": os.getpid(), "start": start, "boot": _boot_id(), "since": time.time(),
                           "command": " ".join(sys.argv), "slurm_job": _slurm_job(), "token": self.token}).encode()

    def _fail(self, exc: OSError, path: Path) -> LockError:
        name = errno.errorcode.get(exc.errno or 0, "")
        return LockError(f"cannot lock the {self.what}: writing {path} failed: {exc.strerror or exc}"
                         f"{f' ({name})' if name else ''}; make room or make it writable, or choose another "
                         f"--output-dir (OUTPUT_DIR)")

    def _write(self, path: Path, flags: int) -> None:
        """Create ``path`` (``flags`` add to O_CREAT | O_WRONLY) holding this job's record, durably."""
        data = self._record()
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | flags, 0o644)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        os.close(fd)

    def _try_once(self) -> tuple[Holder, float, float] | None:
        """Try to create the lock: None when this job now holds it, else the holder, its last
        heartbeat, and the file system's time now."""
        candidate = self.path.with_name(f".{self.path.name}.{HOST}.{os.getpid()}.{self.token[:8]}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write(candidate, os.O_EXCL)
        except FileNotFoundError:  # the folder was removed by a job releasing its lock: the caller tries again
            raise
        except OSError as exc:
            raise self._fail(exc, self.path) from None
        try:
            now = os.stat(candidate).st_mtime
            try:
                os.link(candidate, self.path)
                return None
            except FileExistsError:
                pass
            except OSError as exc:
                if os.stat(candidate).st_nlink == 2:  # NFS: made, though the reply was lost
                    return None
                if exc.errno not in _NO_LINKS:
                    raise
                try:
                    self._write(self.path, os.O_EXCL)
                    return None
                except FileExistsError:
                    pass
        except OSError as exc:
            raise self._fail(exc, self.path) from None
        finally:
            _unlink(candidate)
        found = self._read()
        return None if found is None else (*found, now)

    def acquire(self) -> None:
        """Take the lock, taking it over from a dead holder (one log line); :class:`Held` when a
        live job holds it, :class:`LockError` when it cannot be written."""
        taken_from = None
        for _ in range(_ATTEMPTS):
            try:
                found = self._try_once()
            except FileNotFoundError:
                continue
            if found is None:
                if self._mine():
                    self._hold()
                    if taken_from is not None:
                        log.warning("took over the lock of the %s from %s: %s", self.what, taken_from[0].describe(),
                                    taken_from[1])
                    return
                continue
            holder, beat, now = found
            alive, why = self._judge(holder, beat, now)
            if alive:
                raise Held(dataclasses.replace(holder, alive=why))
            if self._remove(holder):
                taken_from = (holder, why)
        raise LockError(f"cannot lock the {self.what}: {self.path} changed under this job {_ATTEMPTS} times "
                        f"(many jobs starting on it at once?); start it again")

    def _mine(self) -> bool:
        found = self._read()
        return found is not None and found[0].token == self.token

    def _remove(self, stale: Holder) -> bool:
        """Remove the dead holder's lock, and only that: it is renamed to a name of this job's
        first (one job wins), then checked; a live lock taken meanwhile is put back."""
        moved = self.path.with_name(f".{self.path.name}.stale.{self.token[:8]}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._fail(exc, self.path) from None
        try:
            with open(moved, "rb") as f:
                token = json.loads(f.read()).get("token", "")
        except (OSError, ValueError, AttributeError):
            token = ""
        if token == stale.token:
            _unlink(moved)
            return True
        try:  # another job took the lock between our look and the rename: give it back
            os.link(moved, self.path)
        except OSError:
            pass
        _unlink(moved)
        return False

    def _hold(self) -> None:
        self.held = True
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lock {self.path.name}", daemon=True)
        self._beat.start()
        atexit.register(self.release)

    def _heartbeat(self) -> None:
        warned = False
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._mine():
                    found = self._read()
                    log.error("the lock of the %s is no longer this job's (%s): another job took it over; this "
                              "job's records and checkpoints may now mix with that job's", self.what,
                              "removed" if found is None else found[0].describe())
                    return
                os.utime(self.path)
            except OSError as exc:
                if not warned:
                    log.warning("cannot refresh the lock %s (%s); other hosts take it over after %.0f s without",
                                self.path, exc, STALE_S)
                    warned = True

    # ------------------------------------------------------------------ releasing
    def release(self) -> None:
        """Give the lock back (remove its file if it is still this job's, and its folder if empty)."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._beat is not None and self._beat is not threading.current_thread():
            self._beat.join(timeout=5)
        atexit.unregister(self.release)
        try:
            if self._mine():
                _unlink(self.path)
            self.path.parent.rmdir()
        except OSError:
            pass

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
