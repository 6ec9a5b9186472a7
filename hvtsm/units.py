"""Parsing and printing of durations, sizes and CPU sets as policies write them.

Each parser refuses what no zone could use, saying the limit (hvtsm.limits): durations
beyond MAX_DURATION_MS, sizes beyond MAX_SIZE, CPU numbers beyond MAX_CPU. Their cost is
linear in the text, whatever it says (a CPU range is never expanded before it is checked).
"""

from __future__ import annotations

import math
import re

from hvtsm.limits import MAX_CPU, MAX_DURATION_MS, MAX_SIZE, shown

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "b": 1,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "pib": 1024**5,
    "eib": 1024**6,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4, "pb": 1000**5, "eb": 1000**6,
}
_SIZE_UNITS = (("EiB", 1024**6), ("PiB", 1024**5), ("TiB", 1024**4), ("GiB", 1024**3),
               ("MiB", 1024**2), ("KiB", 1024))


def parse_duration_ms(text: str) -> int:
    """Return milliseconds for '250ms', '5s', '1.5m', '2h'; ValueError otherwise."""
    m = _DURATION_RE.match(text)
    if not m:
        raise ValueError(
            f"{shown(text)} is not a duration; write a number and a unit: ms, s, m or h "
            "(e.g. '30s')"
        )
    ms = float(m.group(1)) * _DURATION_MS[m.group(2)]
    if not ms <= MAX_DURATION_MS:  # inf too: a number of 400 digits is one
        raise ValueError(f"{shown(text)} is longer than the {format_duration_ms(MAX_DURATION_MS)}"
                         " (10 years) a duration may be")
    return round(ms)
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
            raise ValueError(f"{shown(text)} is negative")
        size: float = text
    elif isinstance(text, str):
        m = _SIZE_RE.match(text)
        if not m:
            raise ValueError(f"{shown(text)} is not a size; write e.g. '512MiB', '2GiB' or a "
                             "byte count")
        size = float(m.group(1)) * _SIZE_FACTORS[(m.group(2) or "b").lower()]
    else:
        raise ValueError(f"{shown(text)} is not a size; write e.g. '512MiB'")
    if not math.isfinite(size) or size > MAX_SIZE:
        raise ValueError(f"{shown(text)} is more than the {format_size(MAX_SIZE)} any size may be")
    return int(size)


def format_size(n: int) -> str:
    for unit, size in _SIZE_UNITS:
        if n >= size:
            return f"{n / size:g}{unit}"
    return f"{n}B"


def parse_cpuset(text: str) -> frozenset[int]:
    """Return the CPUs of '0-3,6' as a set; ValueError otherwise."""
    ranges: list[tuple[int, int]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{shown(text)} is not a CPU list; write e.g. '0', '0-3' or '0,2'")
        # digits beyond these name no CPU, and int() of thousands of them is slow
        a = int(lo) if len(lo) <= 6 else MAX_CPU + 1
        b = (int(hi) if len(hi) <= 6 else MAX_CPU + 1) if sep else a
        if b < a:
            raise ValueError(f"{shown(part)} is a descending CPU range")
        if b > MAX_CPU:
            raise ValueError(f"{shown(part)} names CPUs beyond {MAX_CPU}, the highest CPU "
                             "number Linux can have")
        ranges.append((a, b))
    if not ranges:
        raise ValueError(f"{shown(text)} names no CPU")
    cpus: set[int] = set()
    end = -1
    for a, b in sorted(ranges):  # overlapping ranges are expanded once
        if b > end:
            cpus.update(range(max(a, end + 1), b + 1))
            end = b
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
