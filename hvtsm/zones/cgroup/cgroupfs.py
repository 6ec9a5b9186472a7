"""A zone's cgroup on cgroup v1 or v2, behind one interface.

Each zone gets `hvtsm/<zone_id>`: on v1 under every hierarchy a zone uses, on v2 once
under the unified root. A transient zone split from it is the child `hvtsm/<zone_id>/<id>`
(`child_cgroup`): on v1 in every hierarchy, so its limits nest inside the parent's; on v2
without controllers of its own (a cgroup that holds processes cannot delegate them), so
there it is held to the parent's limits and only kill, freeze and membership are its own.

Paths are injected so unit tests can use a fake tree; on a fake
tree the control files must exist beforehand, as the kernel would create them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import ClassVar

from hvtsm.errors import ZoneError
from hvtsm.host import ZONE_CONTROLLERS, HostCapabilities
from hvtsm.units import format_cpuset, format_size, parse_cpuset

#: the directory under each hierarchy (v1) or the unified root (v2) holding all zones
PARENT = "hvtsm"
#: cpu.cfs_period_us / the period of cpu.max; quotas are percent of one CPU per period
CPU_PERIOD_US = 100_000

V2_CONTROLLERS = ("cpu", "cpuset", "memory", "pids")


def write_file(path: Path, value: str) -> None:
    """One write(2), as the kernel wants control values (no buffering, no partial writes)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def read_file(path: Path) -> str:
    with open(path) as f:
        return f.read().strip()


def shares_to_weight(shares: int) -> int:
    """cpu.shares (2..262144, default 1024) to cpu.weight (1..10000, default 100), the
    conversion runc and systemd use so a policy means the same on both versions."""
    shares = min(max(shares, 2), 262144)
    return 1 + ((shares - 2) * 9999) // 262142


def quota_us(percent: float) -> int:
    """Percent of one CPU to microseconds per period; the kernel refuses below 1 ms."""
    return max(1000, round(percent * CPU_PERIOD_US / 100))


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll with a short, growing sleep: freezing or emptying a cgroup takes microseconds
    to milliseconds, so a fixed long sleep would dominate the latency."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _pids_in(procs_file: Path) -> set[int]:
    try:
        return {int(p) for p in read_file(procs_file).split()}
    except OSError as exc:
        # a cgroup being removed answers ENODEV before its directory goes: empty either way
        if exc.errno in (errno.ENOENT, errno.ENODEV):
            return set()
        raise


def _kill_all(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class ZoneCgroup(ABC):
    """One zone's cgroup. Setters take the restriction's value; None means unlimited."""

    version: ClassVar[int]

    def __init__(self, zone_id: str) -> None:
        self.zone_id = zone_id

    def _error(self, message: str, hint: str | None = None) -> ZoneError:
        return ZoneError(message, zone_id=self.zone_id, hint=hint)

    def _set(self, path: Path, value: str, what: str) -> None:
        try:
            write_file(path, value)
        except OSError as exc:
            raise self._error(f"cannot set {what} ({path} <- {value!r}): "
                              f"{exc.strerror or exc}") from exc

    @abstractmethod
    def dirs(self) -> list[Path]:
        """The zone's directories, one per hierarchy."""

    def procs_files(self) -> list[Path]:
        """Where a process writes its pid to join the zone."""
        return [d / "cgroup.procs" for d in self.dirs()]

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.dirs())

    def pids(self) -> set[int]:
        out: set[int] = set()
        for f in self.procs_files():
            out |= _pids_in(f)
        return out

    def move(self, pid: int) -> None:
        """Put process `pid` in this cgroup (every hierarchy); its later children follow."""
        for f in self.procs_files():
            try:
                write_file(f, str(pid))
            except OSError as exc:
                raise self._error(f"cannot move pid {pid} into {f.parent}: "
                                  f"{exc.strerror or exc}") from exc

    def remove(self) -> list[str]:
        """rmdir the zone's directories; returns those removed. The zone must be empty."""
        removed: list[str] = []
        busy: list[str] = []
        for d in self.dirs():
            try:
                d.rmdir()
                removed.append(f"cgroup {d}")
            except FileNotFoundError:
                pass
            except OSError as exc:
                busy.append(f"{d}: {exc.strerror}")
        if busy:
            raise self._error("cannot remove the zone's cgroup: " + "; ".join(busy))
        return removed

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL every process of the zone and wait until the cgroup is empty."""
        self._kill()
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            if time.monotonic() >= deadline:
                raise self._error(f"processes {sorted(pids)} still in the zone {timeout:g} s "
                                  "after SIGKILL")
            # dying processes linger a moment; the signal again only matters for one that
            # slipped past the first pass
            _kill_all(pids)
            time.sleep(0.001)

    def _kill(self) -> None:
        # frozen processes cannot fork, so one pass over a frozen zone reaches them all;
        # v1 frozen tasks only die once thawed, hence the thaw right after the signals
        try:
            self.freeze()
        except ZoneError:
            with contextlib.suppress(ZoneError):
                self.thaw()
            _kill_all(self.pids())
            return
        _kill_all(self.pids())
        self.thaw()

    @abstractmethod
    def create(self) -> None: ...

    @abstractmethod
    def set_cpu_shares(self, shares: int | None) -> None: ...

    @abstractmethod
    def set_cpu_quota(self, percent: float | None) -> None: ...

    @abstractmethod
    def set_cpus(self, cpus: frozenset[int] | None) -> None: ...

    @abstractmethod
    def set_memory(self, limit: int | None) -> None: ...

    @abstractmethod
    def set_pids(self, limit: int | None) -> None: ...

    @abstractmethod
    def freeze(self, timeout: float = 5.0) -> None: ...

    @abstractmethod
    def thaw(self, timeout: float = 5.0) -> None: ...

    @abstractmethod
    def frozen(self) -> bool: ...

    @abstractmethod
    def memory_usage(self) -> int | None: ...

    @abstractmethod
    def oom_file(self) -> str | None:
        """The file whose "oom_kill N" line counts the zone's OOM kills (None: no memory
        controller)."""

    @abstractmethod
    def cpu_usage_ns(self) -> int | None: ...

    def _check_cpus(self, cpus: frozenset[int], available_file: Path) -> None:
        try:
            available = parse_cpuset(read_file(available_file))
        except (OSError, ValueError):
            return
        if not cpus <= available:
            raise self._error(
                f"cannot pin to CPUs {format_cpuset(cpus)}: this host offers only "
                f"{format_cpuset(available)}")


class CgroupV1(ZoneCgroup):
    """`hvtsm/<zone_id>` under each v1 hierarchy the zone uses."""

    version = 1

    def __init__(self, mounts: Mapping[str, str | Path], zone_id: str) -> None:
        super().__init__(zone_id)
        self.mounts = {c: Path(p) for c, p in mounts.items() if c in ZONE_CONTROLLERS}

    def dir(self, controller: str) -> Path | None:
        mount = self.mounts.get(controller)
        return None if mount is None else mount / PARENT / self.zone_id

    def _need(self, controller: str, what: str) -> Path:
        d = self.dir(controller)
        if d is None:
            raise self._error(f"cannot limit {what}: this host has no cgroup v1 "
                              f"'{controller}' hierarchy mounted")
        return d

    def dirs(self) -> list[Path]:
        # cpu and cpuacct are often mounted together: one directory serves both
        seen: dict[Path, None] = {}
        for controller in self.mounts:
            d = self.dir(controller)
            assert d is not None
            seen.setdefault(d)
        return list(seen)

    def create(self) -> None:
        made: list[Path] = []
        try:
            for d in self.dirs():
                # a transient zone's cgroup is one level deeper (hvtsm/<zone>/<id>)
                cpuset = self.mounts.get("cpuset") in d.parents
                d.parent.mkdir(exist_ok=True)
                if cpuset:
                    self._init_cpuset(d.parent, d.parent.parent)
                d.mkdir(exist_ok=True)
                made.append(d)
                if cpuset:
                    self._init_cpuset(d, d.parent)
        except (OSError, ZoneError) as exc:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    d.rmdir()
            if isinstance(exc, ZoneError):
                raise
            raise self._error(f"cannot create the zone's cgroup: {exc}") from exc

    def _init_cpuset(self, child: Path, parent: Path) -> None:
        # a v1 cpuset starts with no CPUs and no memory nodes, and refuses tasks until both
        # are set; the zone inherits what its parent has
        for name in ("cpuset.mems", "cpuset.cpus"):
            if not read_file(child / name):
                self._set(child / name, read_file(parent / name), name)

    def set_cpu_shares(self, shares: int | None) -> None:
        if shares is None and self.dir("cpu") is None:
            return
        d = self._need("cpu", "cpu shares")
        self._set(d / "cpu.shares", str(1024 if shares is None else shares), "cpu shares")

    def set_cpu_quota(self, percent: float | None) -> None:
        if percent is None and self.dir("cpu") is None:
            return
        d = self._need("cpu", "the cpu quota")
        self._set(d / "cpu.cfs_period_us", str(CPU_PERIOD_US), "the cpu period")
        value = "-1" if percent is None else str(quota_us(percent))
        self._set(d / "cpu.cfs_quota_us", value, "the cpu quota")

    def set_cpus(self, cpus: frozenset[int] | None) -> None:
        if cpus is None and self.dir("cpuset") is None:
            return
        d = self._need("cpuset", "CPUs")
        if cpus is None:
            value = read_file(d.parent / "cpuset.cpus")
        else:
            self._check_cpus(cpus, d.parent / "cpuset.effective_cpus")
            value = format_cpuset(cpus)
        self._set(d / "cpuset.cpus", value, "CPUs")

    def set_memory(self, limit: int | None) -> None:
        if limit is None and self.dir("memory") is None:
            return
        d = self._need("memory", "memory")
        value = -1 if limit is None else limit
        files = [d / "memory.limit_in_bytes"]
        memsw = d / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            # memsw = limit: no swap, as on v2 with memory.swap.max = 0
            files.append(memsw)
        if value == -1:
            # the kernel keeps limit <= memsw at every moment: raise memsw first
            order = list(reversed(files))
        else:
            # lower limit first; a file already at or below the value stays (a limit is
            # only ever lowered: one half of it written before a crash is never raised)
            order = [f for f in files if int(read_file(f)) > value]
        for path in order:
            try:
                write_file(path, str(value))
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise self._memory_busy(limit, d / "memory.usage_in_bytes") from exc
                raise self._error(f"cannot set the memory limit ({path} <- {value}): "
                                  f"{exc.strerror}") from exc

    def _memory_busy(self, limit: int | None, usage_file: Path) -> ZoneError:
        try:
            usage = format_size(int(read_file(usage_file)))
        except (OSError, ValueError):
            usage = "an unknown amount"
        return self._error(
            f"cannot lower the memory limit to {format_size(limit or 0)}: the zone uses "
            f"{usage} and the kernel could not reclaim enough (EBUSY)",
            hint="the zone cannot be held to this limit; terminate it",
        )

    def set_pids(self, limit: int | None) -> None:
        if limit is None and self.dir("pids") is None:
            return
        d = self._need("pids", "the number of processes")
        self._set(d / "pids.max", "max" if limit is None else str(limit), "the pids limit")

    def _freezer(self) -> Path:
        d = self.dir("freezer")
        if d is None:
            raise self._error("cannot freeze: this host has no cgroup v1 'freezer' hierarchy")
        return d / "freezer.state"

    def _set_freezer(self, state: str, timeout: float) -> None:
        path = self._freezer()
        self._set(path, state, f"the freezer to {state}")
        # FREEZING until every task stopped; a task in uninterruptible sleep can hold it
        if not wait_until(lambda: read_file(path) == state, timeout):
            raise self._error(f"the zone did not become {state} within {timeout:g} s "
                              f"(freezer.state is {read_file(path)})")

    def freeze(self, timeout: float = 5.0) -> None:
        self._set_freezer("FROZEN", timeout)

    def thaw(self, timeout: float = 5.0) -> None:
        self._set_freezer("THAWED", timeout)

    def frozen(self) -> bool:
        d = self.dir("freezer")
        try:
            return d is not None and read_file(d / "freezer.state") == "FROZEN"
        except OSError:
            return False

    def oom_file(self) -> str | None:
        d = self.dir("memory")
        return None if d is None else str(d / "memory.oom_control")

    def memory_usage(self) -> int | None:
        d = self.dir("memory")
        try:
            return None if d is None else int(read_file(d / "memory.usage_in_bytes"))
        except (OSError, ValueError):
            return None

    def cpu_usage_ns(self) -> int | None:
        d = self.dir("cpuacct")
        try:
            return None if d is None else int(read_file(d / "cpuacct.usage"))
        except (OSError, ValueError):
            return None


class CgroupV2(ZoneCgroup):
    """`hvtsm/<zone_id>` under the unified root."""

    version = 2

    def __init__(self, root: str | Path, controllers: Iterable[str], zone_id: str) -> None:
        super().__init__(zone_id)
        self.root = Path(root)
        self.controllers = frozenset(controllers)
        self.path = self.root / PARENT / zone_id

    def dirs(self) -> list[Path]:
        return [self.path]

    def create(self) -> None:
        wanted = [c for c in V2_CONTROLLERS if c in self.controllers]
        parent = self.path.parent
        try:
            self._enable(self.root, wanted)
            parent.mkdir(exist_ok=True)
            self._enable(parent, wanted)
            self.path.mkdir(exist_ok=True)
        except OSError as exc:
            raise self._error(f"cannot create the zone's cgroup {self.path}: {exc}") from exc

    def _enable(self, cgroup: Path, controllers: list[str]) -> None:
        enabled = set(read_file(cgroup / "cgroup.subtree_control").split())
        missing = [c for c in controllers if c not in enabled]
        if not missing:
            return
        try:
            write_file(cgroup / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))
        except OSError as exc:
            hint = None
            if exc.errno == errno.EBUSY:
                # "no internal processes": only the real root may hold processes and
                # delegate controllers at once, which a container's cgroup root is not
                hint = (f"{cgroup} holds processes; move them to a child cgroup so "
                        "controllers can be delegated")
            raise self._error(f"cannot enable {', '.join(missing)} in {cgroup}: "
                              f"{exc.strerror}", hint=hint) from exc

    def _need(self, controller: str, what: str) -> None:
        if controller not in self.controllers:
            raise self._error(f"cannot limit {what}: the cgroup v2 '{controller}' "
                              "controller is not available on this host")

    def set_cpu_shares(self, shares: int | None) -> None:
        if shares is None and "cpu" not in self.controllers:
            return
        self._need("cpu", "cpu shares")
        weight = 100 if shares is None else shares_to_weight(shares)
        self._set(self.path / "cpu.weight", str(weight), "the cpu weight")

    def set_cpu_quota(self, percent: float | None) -> None:
        if percent is None and "cpu" not in self.controllers:
            return
        self._need("cpu", "the cpu quota")
        quota = "max" if percent is None else str(quota_us(percent))
        self._set(self.path / "cpu.max", f"{quota} {CPU_PERIOD_US}", "the cpu quota")

    def set_cpus(self, cpus: frozenset[int] | None) -> None:
        if cpus is None and "cpuset" not in self.controllers:
            return
        self._need("cpuset", "CPUs")
        if cpus is not None:
            self._check_cpus(cpus, self.path.parent / "cpuset.cpus.effective")
        # empty means "whatever the parent has"
        self._set(self.path / "cpuset.cpus", "" if cpus is None else format_cpuset(cpus),
                  "CPUs")

    def set_memory(self, limit: int | None) -> None:
        if limit is None and "memory" not in self.controllers:
            return
        self._need("memory", "memory")
        try:
            current = read_file(self.path / "memory.max")
        except OSError:
            current = "max"  # the write below says what is wrong
        # a limit is only ever lowered: one already at or below this one stays
        if limit is None or current == "max" or int(current) > limit:
            # v2 reclaims, then OOM-kills inside the zone when it cannot get under a
            # lowered max
            self._set(self.path / "memory.max", "max" if limit is None else str(limit),
                      "the memory limit")
        swap = self.path / "memory.swap.max"
        if swap.exists():
            self._set(swap, "max" if limit is None else "0", "the swap limit")

    def set_pids(self, limit: int | None) -> None:
        if limit is None and "pids" not in self.controllers:
            return
        self._need("pids", "the number of processes")
        self._set(self.path / "pids.max", "max" if limit is None else str(limit),
                  "the pids limit")

    def _events(self) -> dict[str, str]:
        try:
            text = read_file(self.path / "cgroup.events")
        except OSError:
            return {}
        return dict(line.split(None, 1) for line in text.splitlines() if " " in line)

    def _set_frozen(self, frozen: bool, timeout: float) -> None:
        want = "1" if frozen else "0"
        self._set(self.path / "cgroup.freeze", want, "freeze" if frozen else "thaw")
        if not wait_until(lambda: self._events().get("frozen") == want, timeout):
            raise self._error(f"the zone did not {'freeze' if frozen else 'thaw'} within "
                              f"{timeout:g} s")

    def freeze(self, timeout: float = 5.0) -> None:
        self._set_frozen(True, timeout)

    def thaw(self, timeout: float = 5.0) -> None:
        self._set_frozen(False, timeout)

    def frozen(self) -> bool:
        return self._events().get("frozen") == "1"

    def _kill(self) -> None:
        kill_file = self.path / "cgroup.kill"
        if kill_file.exists():
            # one write kills every process, including ones forking right now (Linux 5.14+)
            try:
                write_file(kill_file, "1")
                return
            except FileNotFoundError:
                return
            except OSError:
                pass
        super()._kill()

    def oom_file(self) -> str | None:
        return str(self.path / "memory.events")

    def memory_usage(self) -> int | None:
        try:
            return int(read_file(self.path / "memory.current"))
        except (OSError, ValueError):
            return None

    def cpu_usage_ns(self) -> int | None:
        try:
            for line in read_file(self.path / "cpu.stat").splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) * 1000
        except (OSError, ValueError):
            return None
        return None


def zone_cgroup(caps: HostCapabilities, zone_id: str) -> ZoneCgroup:
    if caps.cgroup_version == 2 and caps.cgroup_root:
        return CgroupV2(caps.cgroup_root, caps.cgroup_controllers, zone_id)
    return CgroupV1(caps.cgroup_mounts, zone_id)


def child_cgroup(caps: HostCapabilities, parent_id: str, child_id: str) -> ZoneCgroup:
    """Transient zone `child_id`'s cgroup inside zone `parent_id`'s."""
    if caps.cgroup_version == 2 and caps.cgroup_root:
        return CgroupV2(caps.cgroup_root, (), f"{parent_id}/{child_id}")
    return CgroupV1(caps.cgroup_mounts, f"{parent_id}/{child_id}")


def _parents(caps: HostCapabilities) -> list[Path]:
    if caps.cgroup_version == 2 and caps.cgroup_root:
        return [Path(caps.cgroup_root) / PARENT]
    return [Path(m) / PARENT for m in set(caps.cgroup_mounts.values())]


def children(caps: HostCapabilities, parent_id: str) -> set[str]:
    """Transient zones that have a cgroup directory inside zone `parent_id`'s."""
    out: set[str] = set()
    for parent in _parents(caps):
        try:
            out.update(e.name for e in os.scandir(parent / parent_id)
                       if e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return out


def transient_ids(caps: HostCapabilities) -> dict[str, str]:
    """Every transient zone with a cgroup directory on this host -> its parent zone."""
    return {child: parent for parent in zone_ids(caps) for child in children(caps, parent)}


def zone_ids(caps: HostCapabilities) -> set[str]:
    """Zones that have a cgroup directory under any hvtsm parent on this host."""
    if caps.cgroup_version == 2 and caps.cgroup_root:
        parents = [Path(caps.cgroup_root) / PARENT]
    else:
        parents = [Path(m) / PARENT for m in set(caps.cgroup_mounts.values())]
    out: set[str] = set()
    for parent in parents:
        try:
            out.update(e.name for e in os.scandir(parent) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            continue
    return out
