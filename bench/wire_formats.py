"""The sparse methods' wire formats as the benchmark scripts take and report them: the
``--wire values=V,indices=I`` option, the options a method accepts, a format's label, and the
table of bytes sent against the information floor. Shared by bench/reducers.py and
bench/wire.py (which import this, never each other)."""
from __future__ import annotations

import argparse
from typing import Any

from sparsecomm import reducers
from sparsecomm.reducers.comm.wire import WireFormat

WIRE_KEYS = ("values", "indices")


def parse_wire(text: str | None) -> dict[str, str]:
    """``values=fp16,indices=delta`` as options (checked by WireFormat); empty for None or ''.
    Raises argparse.ArgumentTypeError (a command-line argument type)."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part:
            continue
        key, _, value = part.partition("=")
        if key not in WIRE_KEYS or not value:
            raise argparse.ArgumentTypeError(f"takes values=V,indices=I; got {part!r}")
        out[key] = value
    try:
        WireFormat(**out)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return out


def options_for(name: str, wire: dict[str, str]) -> dict[str, str]:
    """The wire options ``name`` accepts (methods without them run unchanged)."""
    accepted = reducers.method_options(name)
    return {k: v for k, v in wire.items() if k in accepted}


def label(wire: dict[str, str]) -> str:
    return f"{wire.get('values', 'full')}/{wire.get('indices', 'int32')}"


def ratio(row: dict[str, Any]) -> float | None:
    sent, floor = row.get("bytes_sent"), row.get("wire_floor_bytes")
    return sent / floor if sent is not None and floor else None


def table(results: dict, title: str = "") -> str:
    """Methods that report ``wire_floor_bytes``: bytes sent, the floor, their ratio (medians)."""
    head = (f"{'model':<16} {'method':<16} {'format':<12} {'local':>8} {'bytes sent':>11} {'floor':>11} "
            f"{'sent/floor':>10} {'reduce ms':>10}")
    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    for model, e in results.items():
        for name, m in e.get("methods", {}).items():
            if "error" in m or m.get("wire_floor_bytes") is None:
                continue
            t = "-" if m.get("t_reduce") is None else f"{m['t_reduce'] * 1e3:.1f}"
            lines.append(f"{model:<16} {m.get('method', name):<16} {m.get('wire', 'full/int32'):<12} "
                         f"{m['local_density']:>8.5f} {m['bytes_sent']:>11,.0f} {m['wire_floor_bytes']:>11,.0f} "
                         f"{ratio(m):>10.3f} {t:>10}")
    return "\n".join(lines)
