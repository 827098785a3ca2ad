"""This host as a job sees it: its names and addresses, whether a port is free on it, and its
CPU cores."""
from __future__ import annotations

import os
import socket
import subprocess

__all__ = ["addresses", "is_this_host", "own_address", "port_is_free", "free_port", "cores"]


def _output(cmd: list[str]) -> str:
    """What ``cmd`` prints, or "" when it cannot run or fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError:
        return ""
    return done.stdout if done.returncode == 0 else ""


def addresses() -> list[str]:
    """This host's addresses other hosts may reach (``hostname -I``: every interface's, no loopback)."""
    return _output(["hostname", "-I"]).split()


def is_this_host(address: str) -> bool:
    """Whether ``address`` names this host: a loopback address, localhost, the host name (whole
    or up to its first dot) or one of :func:`addresses`."""
    name = socket.gethostname()
    return (address.startswith("127.") or address in ("localhost", name, name.split(".")[0])
            or address in addresses())


def own_address() -> str:
    """An address other hosts can reach this one at: the first of :func:`addresses`, else the host name."""
    found = addresses()
    return found[0] if found else socket.gethostname()


def port_is_free(port: str | int) -> bool:
    """Whether TCP ``port`` can be bound on every address of this host (False for a value that
    is not a port number)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", int(port)))
        except (ValueError, OverflowError, OSError):
            return False
    return True


def free_port(host: str = "") -> int:
    """A TCP port free on ``host`` ("": every address) now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cores() -> int:
    """The CPU cores this process may use, as ``nproc`` counts them (its affinity, the limits
    it honours), else as the affinity mask does."""
    text = _output(["nproc"]).strip()
    return int(text) if text.isdigit() else len(os.sched_getaffinity(0))
