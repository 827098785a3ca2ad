"""Noticing a lost worker within a bounded time.

When a worker dies (killed, crashed, its host gone) and the launcher does not stop the others,
the survivors would block in their next collective until its timeout, often half an hour. The
watchdog avoids that: every rank beats a counter in the job's key-value store (the one
``torch.distributed`` rendezvoused through) every ``interval`` seconds and watches its
successor's counter. A rank whose successor has not beaten for ``timeout`` seconds posts the
news under an abort key; every rank checks that key at each beat, logs which rank was lost and
exits with status 1. If the store itself becomes unreachable (it lives with rank 0 or with
torchrun's agent), every rank exits the same way. A rank that finishes normally marks itself
done first, so its predecessor does not mistake the end of training for a loss.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Callable

__all__ = ["Watchdog", "EXIT_LOST"]

log = logging.getLogger(__name__)

EXIT_LOST = 1
_PREFIX = "sparsecomm/watchdog"


def _exit_now(message: str) -> None:
    log.critical(message)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass
    sys.stderr.flush()
    os._exit(EXIT_LOST)


class Watchdog:
    """Heartbeats of one rank; see the module docstring."""

    def __init__(self, store: Any, rank: int, world: int, interval: float = 2.0, timeout: float = 30.0,
                 on_lost: Callable[[str], None] = _exit_now) -> None:
        if not 0 < interval < timeout:
            raise ValueError(f"need 0 < interval < timeout, got interval={interval}, timeout={timeout}")
        self.store, self.rank, self.world = store, rank, world
        self.interval, self.timeout = interval, timeout
        self.on_lost = on_lost
        self._last_ok = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _key(self, kind: str, rank: int | None = None) -> str:
        return f"{_PREFIX}/{kind}" if rank is None else f"{_PREFIX}/{kind}/{rank}"

    def start(self) -> "Watchdog":
        if self.world > 1 and self._thread is None:
            self.store.add(self._key("beat", self.rank), 1)
            self._last_ok = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="sparsecomm-watchdog", daemon=True)
            self._thread.start()
            threading.Thread(target=self._deadline, name="sparsecomm-watchdog-deadline", daemon=True).start()
        return self

    def _deadline(self) -> None:
        """A store that stops answering (a link down, a host frozen) blocks the beating thread
        instead of failing it: stop when this rank's own beat has not gone through for ``timeout``."""
        while not self._stop.wait(self.interval):
            silent = time.monotonic() - self._last_ok
            if silent > self.timeout:
                return self.on_lost(f"rank {self.rank} lost contact with the job's rendezvous store (rank 0's "
                                    f"host) for {silent:.0f} s: rank 0 or a network link is down")

    def stop(self) -> None:
        """Mark this rank done (its end is not a loss) and stop beating."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=self.interval * 2)
        self._thread = None
        try:
            self.store.set(self._key("done", self.rank), "1")
        except Exception:
            pass

    def lost_ranks(self, wait: float | None = None) -> list[int] | None:
        """Ranks whose heartbeat does not move during ``wait`` seconds (default: three beats),
        excluding ranks marked done; None when the store itself cannot be reached."""
        wait = 3 * self.interval if wait is None else wait

        def counters() -> dict[int, int]:
            out = {}
            for r in range(self.world):
                key = self._key("beat", r)
                if r != self.rank and not self.store.check([self._key("done", r)]):
                    out[r] = int(self.store.get(key)) if self.store.check([key]) else 0
            return out

        try:
            before = counters()
            time.sleep(wait)
            after = counters()
        except Exception:
            return None
        return sorted(r for r in after if after[r] == before.get(r))

    def _run(self) -> None:
        peer = (self.rank + 1) % self.world
        seen: int | None = None
        since = time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                self.store.add(self._key("beat", self.rank), 1)
                if self.store.check([self._key("abort")]):
                    message = self.store.get(self._key("abort")).decode()
                    return self.on_lost(f"rank {self.rank} stops: {message}")
                if self.store.check([self._key("done", peer)]):
                    self._last_ok = time.monotonic()
                    continue
                value = int(self.store.get(self._key("beat", peer))) if \
                    self.store.check([self._key("beat", peer)]) else 0
                self._last_ok = time.monotonic()
            except Exception as exc:  # the store is gone: rank 0 or the launcher's agent died
                if self._stop.is_set():
                    return
                return self.on_lost(f"rank {self.rank} lost contact with the job's rendezvous store "
                                    f"({type(exc).__name__}: {exc}); rank 0 or the launcher is gone")
            now = time.monotonic()
            if value != seen:
                seen, since = value, now
            elif now - since > self.timeout:
                message = (f"rank {peer} is lost: no heartbeat for {now - since:.0f} s (killed, crashed, "
                           f"or its host is down)")
                try:
                    self.store.set(self._key("abort"), message)
                except Exception:
                    pass
                return self.on_lost(f"rank {self.rank} stops: {message}")
