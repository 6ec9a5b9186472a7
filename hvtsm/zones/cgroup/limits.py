"""A zone's cgroup limits from `Restrictions`: every limit when its cgroup is made, and at a
phase only what tightens, each after a look at what the kernel has.

Applying is monotonic against the kernel, not only against the store: a limit the kernel
already holds at or below the phase's value (the phase half-applied before its controller
died, or something else lowered it further) is left as it is and reported in force; it is
never raised to the phase's value. The readings compare in the kernel's own units (cgroup
v2's cpu.weight is not a cpu.shares), so no conversion back can blur the decision.

The zone's deputy (its agent, while no controller runs: zones/cgroup/deputy.py) lowers the
same files; both writers hold the zone's lock (`lock_path`) from the look to the write, so
whichever comes second finds the other's value and never raises it. The lock is a file
only root reaches: a zone sees its own cgroup directory, and a flock needs no more than a
read-only open, so a lock there is one the workload could hold to stall every tightening.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from guest_agent.deputy_steps import zone_lock
from hvtsm.restrictions import Restrictions
from hvtsm.units import format_cpuset, format_size, parse_cpuset
from hvtsm.zones.base import InForce
from hvtsm.zones.cgroup.cgroupfs import (
    CPU_PERIOD_US,
    CgroupV1,
    CgroupV2,
    ZoneCgroup,
    quota_us,
    read_file,
    shares_to_weight,
)

#: `done(name, value)`: field `name` is in force at `value` (the caller records it)
Done = Callable[[str, object], None]

#: the fields a cgroup holds, in the order they are written: memory last, since lowering
#: it is the one write that may fail (and end the zone)
FIELDS = ("cpus", "cpu_shares", "cpu_quota", "pids", "memory")


def _setters(cgroup: ZoneCgroup) -> dict[str, Callable[[Any], None]]:
    return {"cpus": cgroup.set_cpus, "cpu_shares": cgroup.set_cpu_shares,
            "cpu_quota": cgroup.set_cpu_quota, "pids": cgroup.set_pids,
            "memory": cgroup.set_memory}


#: root-only (0700), under the controllers' /run/hvtsm, which a zone's private /run hides
LOCK_DIR = Path("/run/hvtsm/locks")


def lock_path(zone_id: str) -> str:
    """The file both writers of the zone's limits flock (made by the first of them)."""
    return str(LOCK_DIR / f"{zone_id}.lock")


def drop_lock(zone_id: str) -> list[str]:
    """The zone's lock file removed (with the zone); what was removed."""
    path = Path(lock_path(zone_id))
    try:
        path.unlink()
    except FileNotFoundError:
        return []
    return [f"lock {path}"]


def would_drop_lock(zone_id: str) -> list[str]:
    path = Path(lock_path(zone_id))
    return [f"lock {path}"] if path.exists() else []


def locked_zone_ids() -> set[str]:
    """The zones with a lock file (what a crash between a zone's end and this removal
    leaves)."""
    try:
        return {p.name.removesuffix(".lock") for p in LOCK_DIR.iterdir()
                if p.name.endswith(".lock")}
    except FileNotFoundError:
        return set()


def write(cgroup: ZoneCgroup, initial: Restrictions) -> None:
    """A cgroup just made: every limit `initial` sets, whatever the kernel's default is
    (cpu shares above the default are a policy's choice too)."""
    setters = _setters(cgroup)
    for name in FIELDS:
        value = getattr(initial, name)
        if value is not None:
            setters[name](value)


def tighten(cgroup: ZoneCgroup, new: Restrictions, old: Restrictions,
            done: Done, *, lock: str | None) -> list[InForce]:
    """Bring the cgroup from `old` (what the store says is in force) to `new`: a field
    whose limit the kernel already holds at `new` or tighter is left and returned as in
    force; the others are written. `done` follows each field either way. `lock`: the
    zone's `lock_path` when a deputy may write the same files (None: nobody else does)."""
    already: list[InForce] = []
    setters = _setters(cgroup)
    changed = [name for name in FIELDS if getattr(new, name) != getattr(old, name)]
    if not changed:
        return already
    with zone_lock(lock) if lock is not None else contextlib.nullcontext():
        for name in changed:
            value = getattr(new, name)
            found = None if value is None else in_force(cgroup, name, value)
            if found is None:
                setters[name](value)
            else:
                already.append(InForce(name, found))
            done(name, value)
    return already


def in_force(cgroup: ZoneCgroup, name: str, value: Any) -> str | None:
    """What the kernel has for limit `name` when that is `value` or tighter (then writing
    `value` would change nothing, or loosen it); None when it is looser or cannot be read
    (the write that follows then says why)."""
    try:
        if isinstance(cgroup, CgroupV1):
            return _v1(cgroup, name, value)
        if isinstance(cgroup, CgroupV2):
            return _v2(cgroup, name, value)
    except (OSError, ValueError):
        return None
    return None


def _found(present: str, target: str) -> str:
    return f"{present} in the kernel" + ("" if present == target else
                                         f", tighter than {target}")


def _v1(cgroup: CgroupV1, name: str, value: Any) -> str | None:
    controller = {"cpu_shares": "cpu", "cpu_quota": "cpu", "cpus": "cpuset",
                  "memory": "memory", "pids": "pids"}[name]
    d = cgroup.dir(controller)
    if d is None:
        return None
    if name == "cpu_shares":
        shares = int(read_file(d / "cpu.shares"))
        return _found(f"cpu.shares {shares}", f"cpu.shares {value}") if shares <= value \
            else None
    if name == "cpu_quota":
        quota, period = int(read_file(d / "cpu.cfs_quota_us")), int(
            read_file(d / "cpu.cfs_period_us"))
        return _quota(quota, period, value)
    if name == "cpus":
        return _cpus(read_file(d / "cpuset.cpus"), value)
    if name == "memory":
        files = [d / "memory.limit_in_bytes", d / "memory.memsw.limit_in_bytes"]
        # both or neither: a limit below the value with memsw above is half a limit
        return _memory([_number(f) for f in files if f.exists()], value)
    return _pids(read_file(d / "pids.max"), value)


def _v2(cgroup: CgroupV2, name: str, value: Any) -> str | None:
    path = cgroup.path
    if name == "cpu_shares":
        weight, target = int(read_file(path / "cpu.weight")), shares_to_weight(value)
        return _found(f"cpu.weight {weight}", f"cpu.weight {target}") if weight <= target \
            else None
    if name == "cpu_quota":
        quota, _, period = read_file(path / "cpu.max").partition(" ")
        if quota == "max":
            return None
        return _quota(int(quota), int(period or CPU_PERIOD_US), value)
    if name == "cpus":
        return _cpus(read_file(path / "cpuset.cpus"), value)
    if name == "memory":
        swap = path / "memory.swap.max"
        if swap.exists() and read_file(swap) != "0":
            return None  # the swap half of a memory limit is not in force yet
        return _memory([_number(path / "memory.max")], value)
    return _pids(read_file(path / "pids.max"), value)


def _number(path: Path) -> int | None:
    """A limit file's value; None for unlimited ("max", or v1's huge page-rounded max)."""
    text = read_file(path)
    if text == "max":
        return None
    number = int(text)
    return None if number >= 2**62 else number


def _quota(quota: int, period: int, percent: float) -> str | None:
    if quota < 0 or period <= 0:
        return None  # unlimited
    present = quota * 100 / period
    # compared as the writer would write it: quota_us rounds and keeps the kernel's floor
    if quota * CPU_PERIOD_US > quota_us(percent) * period:
        return None
    return _found(f"{present:g}%", f"{percent:g}%")


def _cpus(text: str, cpus: frozenset[int]) -> str | None:
    # an empty cpuset means "the parent's" on v2 and "none yet" on v1: never in force
    present = parse_cpuset(text) if text else frozenset()
    if not present or not present <= cpus:
        return None
    return _found(format_cpuset(present), format_cpuset(cpus))


def _memory(values: list[int | None], limit: int) -> str | None:
    if not values or any(v is None or v > limit for v in values):
        return None
    present = max(v for v in values if v is not None)
    return _found(format_size(present), format_size(limit))


def _pids(text: str, limit: int) -> str | None:
    if text == "max" or int(text) > limit:
        return None
    return _found(f"pids.max {text}", f"pids.max {limit}")
