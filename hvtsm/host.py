"""What this host offers hvtsm, probed once: root, cgroup layout, network tools.

The probe reads only files (mountinfo, sysctls, cgroup control files), from roots that
tests replace with a fake tree.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from guest_agent import mountinfo
from hvtsm.errors import HostError
from hvtsm.units import parse_cpuset

#: cgroup controllers a cgroup zone uses (cpuacct only for statistics)
ZONE_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "freezer")

#: where system tools live; a root shell started with `su` may lack them on PATH
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class HostCapabilities:
    is_root: bool
    #: 1 or 2; None when no usable hierarchy is mounted
    cgroup_version: int | None
    #: v1: controller -> mount point of its hierarchy (cpu and cpuacct may share one)
    cgroup_mounts: Mapping[str, str] = field(default_factory=dict, hash=False)
    #: v2: the unified hierarchy's root directory
    cgroup_root: str | None = None
    #: controllers a zone can use: mounted ones (v1) or those in cgroup.controllers (v2)
    cgroup_controllers: frozenset[str] = frozenset()
    nft: str | None = None
    ip: str | None = None
    ip_forward: bool = False
    #: CPUs this process may run on
    cpus: frozenset[int] = frozenset()
    hostname: str = ""

    @property
    def ncpus(self) -> int:
        return len(self.cpus)


@dataclass(frozen=True)
class _Mount:
    point: str
    fstype: str
    super_options: tuple[str, ...]


def _cgroup_mounts(path: Path) -> list[_Mount]:
    try:
        text = path.read_bytes()
    except OSError:
        return []
    return [_Mount(os.fsdecode(e.point), e.fstype, e.super_options)
            for e in mountinfo.parse(text) if e.fstype in ("cgroup", "cgroup2")]


def _rebase(point: str, sysfs_root: Path) -> Path:
    """Mountinfo names real paths; a fake tree stands in for /sys in tests."""
    if point == "/sys" or point.startswith("/sys/"):
        return sysfs_root / point[len("/sys"):].lstrip("/")
    return Path(point)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path=_SBIN_PATH)


@functools.cache
def probe_host(sysfs_root: str = "/sys", proc_root: str = "/proc") -> HostCapabilities:
    """Probe the host once; later calls with the same roots return the same object."""
    sysfs, proc = Path(sysfs_root), Path(proc_root)
    v1: dict[str, str] = {}
    v2_roots: list[Path] = []
    for mount in _cgroup_mounts(proc / "self" / "mountinfo"):
        path = _rebase(mount.point, sysfs)
        if mount.fstype == "cgroup2":
            v2_roots.append(path)
            continue
        for option in mount.super_options:
            if option in ZONE_CONTROLLERS:
                # the first mount wins: later ones are usually bind mounts of the same tree
                v1.setdefault(option, str(path))
    version: int | None = None
    root: str | None = None
    controllers: frozenset[str] = frozenset()
    if v1:
        # hybrid hosts keep an empty unified tree next to v1 controllers: v1 is what works
        version, controllers = 1, frozenset(v1)
    else:
        for candidate in v2_roots:
            available = _read(candidate / "cgroup.controllers")
            if available is not None:
                version, root = 2, str(candidate)
                controllers = frozenset(available.split()) & frozenset(ZONE_CONTROLLERS)
                break
    try:
        cpus = frozenset(os.sched_getaffinity(0))
    except OSError:
        cpus = frozenset(range(os.cpu_count() or 1))
    return HostCapabilities(
        is_root=os.geteuid() == 0,
        cgroup_version=version,
        cgroup_mounts=v1,
        cgroup_root=root,
        cgroup_controllers=controllers,
        nft=_which("nft"),
        ip=_which("ip"),
        ip_forward=_read(proc / "sys" / "net" / "ipv4" / "ip_forward") == "1",
        cpus=cpus,
        hostname=_read(proc / "sys" / "kernel" / "hostname") or socket.gethostname(),
    )


def require_cgroup_host(caps: HostCapabilities) -> None:
    """Raise one HostError naming the first thing that stops cgroup zones on this host."""
    if not caps.is_root:
        raise HostError(
            f"hvtsm run needs root: cgroup zones create cgroups, network namespaces and "
            f"mounts (running as uid {os.geteuid()})",
            hint="run it with sudo, or as root",
        )
    if caps.cgroup_version is None:
        raise HostError(
            "no cgroup v1 or v2 hierarchy found at /sys/fs/cgroup (none is listed in "
            "/proc/self/mountinfo)",
            hint="mount cgroup2 with `mount -t cgroup2 none /sys/fs/cgroup`",
        )
    if caps.ip is None:
        raise HostError("the `ip` command (iproute2) is missing: cgroup zones need it for "
                        "their network namespaces", hint="apt-get install iproute2")


def online_cpus(sysfs_root: Path = Path("/sys")) -> frozenset[int]:
    """The CPUs a zone may be pinned to: those online (a zone's cpuset lies within the root
    cpuset, whatever this process's own affinity), else this process's affinity."""
    text = _read(sysfs_root / "devices" / "system" / "cpu" / "online")
    if text:
        try:
            return parse_cpuset(text)
        except ValueError:
            pass
    try:
        return frozenset(os.sched_getaffinity(0))
    except OSError:
        return frozenset(range(os.cpu_count() or 1))
