"""Test hosts with real links on this machine: ``python -m sparsecomm netlab up N RATE | down | status``.

``up`` makes N hosts as Linux network namespaces (``scnet-h0`` ...), each joined to one bridge
(``scnet0``) by a veth pair, with the address ``10.213.0.<i+1>/24`` (a private range; the bridge
has no address, so traffic goes only between these hosts) and an egress rate limit per host
(``tc`` with the token-bucket filter, ``tbf``). This kernel has no ``netem``, so no delay is
added: latency is what the veth and the bridge give (tens of microseconds) and is modelled
separately (``sparsecomm.tools.costmodel``). ``down`` removes everything ``up`` made; ``up`` removes
what it made so far when it fails or is interrupted. Run commands on a host with
``ip netns exec scnet-h0 CMD`` (or :func:`host_command`). Needs root and iproute2.

RATE is tc's form: ``100mbit``, ``1gbit``, ``2.5gbit``, ``10gbit``, or ``unlimited``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Lab", "NetlabError", "parse_rate", "host_address", "host_name", "host_command", "up", "down",
           "status", "MAX_HOSTS"]

log = logging.getLogger(__name__)

BRIDGE = "scnet0"
PREFIX = "scnet"
SUBNET = "10.213.0"
MAX_HOSTS = 200
STATE = Path(os.environ.get("SPARSECOMM_NETLAB_STATE", "/run/sparsecomm-netlab.json"))
_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_IP_TIMEOUT_S = 30


class NetlabError(RuntimeError):
    """The lab cannot be built or used here; the message says why in one line."""


def parse_rate(text: str) -> float | None:
    """Bits per second of a tc rate (``100mbit``, ``1gbit``), None for ``unlimited``."""
    if text == "unlimited":
        return None
    found = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit|tbit)", text.strip().lower())
    if not found or float(found.group(1)) <= 0:
        raise ValueError(f"rate {text!r} is not a rate; use a number with kbit, mbit, gbit or tbit "
                         f"(100mbit, 1gbit, 10gbit) or unlimited")
    return float(found.group(1)) * _UNITS[found.group(2)]


def host_name(i: int) -> str:
    return f"{PREFIX}-h{i}"


def host_address(i: int) -> str:
    return f"{SUBNET}.{i + 1}"


def host_command(i: int, command: list[str]) -> list[str]:
    """``command`` run on host ``i``."""
    return ["ip", "netns", "exec", host_name(i), *command]


@dataclass
class Lab:
    hosts: int
    rate: str

    @property
    def addresses(self) -> list[str]:
        return [host_address(i) for i in range(self.hosts)]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=_IP_TIMEOUT_S)
    if check and done.returncode != 0:
        raise NetlabError(f"`{' '.join(args)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


def _can_run() -> None:
    if os.geteuid() != 0:
        raise NetlabError("the netlab needs root (network namespaces, veth pairs, a bridge, tc)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetlabError(f"the netlab needs `{tool}` (Debian: apt-get install iproute2)")


def _namespaces() -> list[str]:
    out = _ip("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def status() -> Lab | None:
    """The lab that is up (from its state file), or None."""
    try:
        data = json.loads(STATE.read_text())
        return Lab(int(data["hosts"]), str(data["rate"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def up(hosts: int, rate: str) -> Lab:
    """Build the lab (a no-op when the same lab is up); :class:`NetlabError` if it cannot."""
    parse_rate(rate)
    if not 1 <= hosts <= MAX_HOSTS:
        raise ValueError(f"hosts must be 1 to {MAX_HOSTS} (addresses {SUBNET}.1 to .{MAX_HOSTS}), got {hosts}")
    _can_run()
    lab = Lab(hosts, rate)
    current = status()
    if current == lab and all(host_name(i) in _namespaces() for i in range(hosts)):
        log.info("already up: %d host(s) at %s", hosts, rate)
        return lab
    if current is not None:
        raise NetlabError(f"a netlab is up with {current.hosts} host(s) at {current.rate}; "
                          f"run `python -m sparsecomm netlab down` first")
    taken = [n for n in _namespaces() if n.startswith(PREFIX + "-")]
    if taken or _ip("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        raise NetlabError(f"{', '.join(taken) or BRIDGE} already exist(s) but no netlab state file "
                          f"({STATE}); remove them (`python -m sparsecomm netlab down --force`)")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _build(lab)
        STATE.write_text(json.dumps(asdict(lab)))
    except BaseException:
        _teardown()
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    log.info("up: %d host(s) %s, %s each way", hosts, ", ".join(lab.addresses), rate)
    return lab


def _build(lab: Lab) -> None:
    _ip("ip", "link", "add", BRIDGE, "type", "bridge")
    _ip("ip", "link", "set", BRIDGE, "up")
    for i in range(lab.hosts):
        ns, outside = host_name(i), f"{PREFIX}-v{i}"
        _ip("ip", "netns", "add", ns)
        _ip("ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("ip", "link", "set", outside, "master", BRIDGE, "up")
        _ip("ip", "-n", ns, "addr", "add", f"{host_address(i)}/24", "dev", "eth0")
        _ip("ip", "-n", ns, "link", "set", "eth0", "up")
        _ip("ip", "-n", ns, "link", "set", "lo", "up")
        if lab.rate != "unlimited":
            # burst: at least one MTU and about 1 ms at the rate, as tc's manual suggests for tbf
            burst = max(1600, int(parse_rate(lab.rate) / 8 / 1000))
            _ip("tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", lab.rate,
                "burst", str(burst), "latency", "50ms")


def _teardown() -> None:
    for ns in _namespaces():
        if ns.startswith(PREFIX + "-h"):
            _ip("ip", "netns", "del", ns, check=False)
    for link in _ip("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = link.split(":")[1].strip().split("@")[0] if ":" in link else ""
        if name.startswith(PREFIX + "-v"):
            _ip("ip", "link", "del", name, check=False)
    _ip("ip", "link", "del", BRIDGE, check=False)
    try:
        STATE.unlink()
    except FileNotFoundError:
        pass


def down(force: bool = False) -> bool:
    """Remove the lab; True when there was one. ``force`` also removes leftovers without a state file."""
    _can_run()
    if status() is None and not force:
        leftovers = [n for n in _namespaces() if n.startswith(PREFIX + "-")]
        if not leftovers:
            return False
    _teardown()
    log.info("down")
    return True


def main(argv: list[str] | None = None) -> int:
    from ..commandline import OneLineParser

    p = OneLineParser(prog="python -m sparsecomm netlab", description=__doc__.split("\n\n")[0])
    verbs = p.add_subparsers(dest="verb", required=True)
    make = verbs.add_parser("up", help="make N hosts with links of RATE")
    make.add_argument("hosts", type=int)
    make.add_argument("rate")
    remove = verbs.add_parser("down", help="remove the hosts")
    remove.add_argument("--force", action="store_true", help="also remove leftovers without a state file")
    verbs.add_parser("status", help="say what is up")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="netlab: %(message)s", stream=sys.stderr)
    try:
        if args.verb == "up":
            up(args.hosts, args.rate)
        elif args.verb == "down":
            if not down(args.force):
                log.info("no netlab is up")
        else:
            lab = status()
            print("down" if lab is None else f"up: {lab.hosts} host(s) at {lab.rate}: {', '.join(lab.addresses)}")
    except (NetlabError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
