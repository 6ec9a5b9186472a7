"""Shared by the corpus programs: behave for a moment, then say when the act begins."""

from __future__ import annotations

import sys
import time


def behave(seconds: float = 0.5) -> int:
    """Honest work first: the monitor must not flag this part."""
    total, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        total += sum(i * i for i in range(2000))
    return total


def act(name: str) -> None:
    """The line the benchmark reads the act's time from (same clock as the agent's)."""
    print(f"ACT {name} {time.monotonic():.6f}", flush=True)


def survived(name: str) -> None:
    print(f"SURVIVED {name}", flush=True)
    sys.exit(0)


def host_address(arg: str) -> str:
    """`gateway` means the zone's default gateway: the host's end of its link."""
    if arg != "gateway":
        return arg
    with open("/proc/net/route") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == "00000000" and int(fields[3], 16) & 2:
                raw = int(fields[2], 16)
                return ".".join(str((raw >> s) & 0xFF) for s in (0, 8, 16, 24))
    raise SystemExit("no default route")
