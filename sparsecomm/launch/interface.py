"""The network interface a job's collectives use.

Left to themselves, gloo and NCCL take the address the host name resolves to, which is loopback
on many nodes (and in network namespaces): peers then cannot connect. Unless GLOO_SOCKET_IFNAME
or NCCL_SOCKET_IFNAME is set, the job uses the interface that routes to the rendezvous address
(on rank 0's host, the one that holds that address), as ``ip`` tells it.
"""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping

from .launcher import LaunchError

__all__ = ["route_device", "holder", "ipv4_address", "choose", "VARIABLES"]

VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def route_device(route: str) -> str | None:
    """The device of the first route in ``ip -o route get`` output (the last ``dev`` word of its line)."""
    for line in route.splitlines():
        found = re.match(r".* dev ([^ ]*)", line)
        if found:
            return found.group(1)
    return None


def holder(addresses: str, address: str) -> str | None:
    """The interface that holds IPv4 ``address``, from ``ip -o -4 addr show`` output."""
    for line in addresses.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[3].split("/")[0] == address:
            return fields[1]
    return None


def ipv4_address(name: str) -> str | None:
    """The first IPv4 address ``name`` resolves to (as ``getent ahostsv4`` lists them), or None."""
    try:
        found = socket.getaddrinfo(name, None, socket.AF_INET)
    except (OSError, UnicodeError):
        return None
    return str(found[0][4][0]) if found else None


def _ip(*args: str) -> str:
    """What ``ip ARGS`` prints; :class:`LaunchError` with its exit status when it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise LaunchError(f"`ip {' '.join(args)}` failed (exit {done.returncode}): {done.stderr.strip()}",
                          status=done.returncode)
    return done.stdout


def choose(rendezvous: str, env: Mapping[str, str], ip: Callable[..., str] = _ip) -> str | None:
    """The interface for collectives with rank 0 at ``rendezvous`` (a name or an address); None
    when ``env`` already names one, ``ip`` is not installed, the address is a loopback one, or
    the route goes through no other interface. An address that does not resolve, or that
    ``ip`` finds no route to, raises :class:`LaunchError` (the job could not meet there)."""
    if any(env.get(name) for name in VARIABLES) or shutil.which("ip", path=env.get("PATH")) is None:
        return None
    address = ipv4_address(rendezvous)
    if address is None:
        raise LaunchError(f"the rendezvous address {rendezvous} does not resolve to an IPv4 address; set MASTER_ADDR "
                          f"(or hostip) to rank 0's address or host name")
    if address.startswith("127."):
        return None
    device = route_device(ip("-o", "route", "get", address))
    if device == "lo":  # the address is this host's own: the interface that holds it
        device = holder(ip("-o", "-4", "addr", "show"), address)
    return device if device and device != "lo" else None
