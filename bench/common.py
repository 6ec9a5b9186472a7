"""Shared bits of the benchmark scripts: percentiles, a throwaway store, the host driver."""

from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvtsm.host import probe_host
from hvtsm.store import Store
from hvtsm.zones.base import Backend, DriverFactory, ZoneDriver
from hvtsm.zones.factory import driver_factory
from hvtsm.zones.logged import LoggedEvents

logging.getLogger("apscheduler").setLevel(logging.ERROR)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(name: str, values: list[float], unit: str = "ms") -> str:
    return (f"{name}: n={len(values)} p50={percentile(values, 50):.2f}{unit} "
            f"p99={percentile(values, 99):.2f}{unit} max={max(values):.2f}{unit} "
            f"mean={statistics.fmean(values):.2f}{unit}")


def temp_store() -> Store:
    path = Path(tempfile.mkdtemp(prefix="hvtsm-bench-")) / "bench.db"
    return Store(f"sqlite:///{path}")


def cgroup_driver() -> DriverFactory:
    """How a manager makes its cgroup driver."""
    return driver_factory(Backend.CGROUP, probe_host())


def bare_driver(backend: Backend = Backend.CGROUP) -> ZoneDriver:
    """A driver outside any lifecycle (its reports are only logged)."""
    return driver_factory(backend, probe_host())(LoggedEvents())


def rss_mib(pid: int | None = None) -> float:
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def progress(text: str) -> None:
    """A live line on stderr that the next one overwrites."""
    sys.stderr.write(f"\r\033[K{text}")
    sys.stderr.flush()
