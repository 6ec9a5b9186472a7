"""Parsing and printing of durations, sizes and CPU sets as policies write them."""

from __future__ import annotations

import re

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "b": 1,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
}


def parse_duration_ms(text: str) -> int:
    """Return milliseconds for '250ms', '5s', '1.5m', '2h'; ValueError otherwise."""
    m = _DURATION_RE.match(text)
    if not m:
        raise ValueError(
            f"{text!r} is not a duration; write a number and a unit: ms, s, m or h (e.g. '30s')"
        )
    return round(float(m.group(1)) * _DURATION_MS[m.group(2)])


def format_duration_ms(ms: float) -> str:
    """Shortest exact-ish rendering: 1500 -> '1.5s', 120000 -> '2m'."""
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms:g}ms"
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size and (ms % size == 0 or unit == "s"):
            return f"{ms / size:g}{unit}"
    return f"{ms / 1000:g}s"


def parse_size(text: str | int) -> int:
    """Return bytes for '512MiB', '1GiB', '1000000', an int; ValueError otherwise."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a size")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"{text} is negative")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size; write e.g. '512MiB', '2GiB' or a byte count")
    unit = (m.group(2) or "b").lower()
    return int(float(m.group(1)) * _SIZE_FACTORS[unit])


def format_size(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return f"{n}B"


def parse_cpuset(text: str) -> frozenset[int]:
    """Return the CPUs of '0-3,6' as a set; ValueError otherwise."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{text!r} is not a CPU list; write e.g. '0', '0-3' or '0,2'")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise ValueError(f"{part!r} is a descending CPU range")
        cpus.update(range(a, b + 1))
    if not cpus:
        raise ValueError(f"{text!r} names no CPU")
    return frozenset(cpus)


def format_cpuset(cpus: frozenset[int] | set[int]) -> str:
    """Kernel style: {0,1,2,5} -> '0-2,5'."""
    out: list[str] = []
    ordered = sorted(cpus)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)
