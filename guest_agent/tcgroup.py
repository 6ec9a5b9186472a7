"""Transient zones inside a guest: cgroups the agent makes and manages (cgroup v2).

The host cannot reach a guest's cgroups, so inside a guest the agent itself puts a held
process into the transient zone's cgroup, tightens its limits when the host says so, and
freezes or kills it. The lab guest's init does not mount cgroup2: the agent mounts it at
/sys/fs/cgroup on first use. Every transient zone is ``<ROOT>/<zone>``; ROOT holds no
process, so controllers can be delegated to it (the "no internal processes" rule), and the
guest's root cgroup may enable them for ROOT (the root is exempt from that rule).

On the host (an agent beside a cgroup zone) this module is not used: the host driver owns
the zone's cgroups and places the process itself before it answers the held call.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import time
from typing import Any

MOUNT = "/sys/fs/cgroup"
ROOT = MOUNT + "/hvtsm"
CGROUP2_MAGIC = 0x63677270
WANTED = ("cpu", "memory", "pids")
PERIOD_US = 100_000


class CgroupError(Exception):
    """A transient cgroup could not be made or changed; the text says which step."""


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _is_cgroup2(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 4 and parts[4] == path and " - cgroup2 " in line:
                    return True
    except OSError:
        return False
    return False


def ensure_root() -> None:
    """cgroup2 mounted at MOUNT and ROOT ready with the controllers delegated."""
    if not _is_cgroup2(MOUNT):
        os.makedirs(MOUNT, exist_ok=True)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"none", MOUNT.encode(), b"cgroup2", 0, None) != 0:
            err = ctypes.get_errno()
            raise CgroupError(f"cannot mount cgroup2 at {MOUNT}: {os.strerror(err)}")
    available = set(_read(MOUNT + "/cgroup.controllers").split())
    wanted = [c for c in WANTED if c in available]
    for where in (MOUNT, ROOT):
        if where == ROOT:
            with contextlib.suppress(FileExistsError):
                os.mkdir(ROOT)
        enabled = set(_read(where + "/cgroup.subtree_control").split())
        missing = [c for c in wanted if c not in enabled]
        if missing:
            try:
                _write(where + "/cgroup.subtree_control",
                       " ".join("+" + c for c in missing))
            except OSError as e:
                raise CgroupError(f"cannot delegate {', '.join(missing)} in {where}: "
                                  f"{e.strerror}") from None


def path_of(name: str) -> str:
    """The directory of transient cgroup `name` (a plain name: no '/' nor '..')."""
    if not name or "/" in name or name in (".", ".."):
        raise CgroupError(f"{name!r} is not a usable cgroup name")
    return ROOT + "/" + name


def create(name: str, limits: dict[str, Any]) -> str:
    ensure_root()
    path = path_of(name)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path)
    set_limits(path, limits)
    return path


def set_limits(path: str, limits: dict[str, Any]) -> list[str]:
    """Write the limits given (absent or None: unchanged); returns what was set."""
    done = []
    memory = limits.get("memory")
    if isinstance(memory, int) and not isinstance(memory, bool) and memory > 0:
        _set(path, "memory.max", str(memory))
        with contextlib.suppress(CgroupError):
            _set(path, "memory.swap.max", "0")
        done.append(f"memory.max {memory}")
    pids = limits.get("pids")
    if isinstance(pids, int) and not isinstance(pids, bool) and pids > 0:
        _set(path, "pids.max", str(pids))
        done.append(f"pids.max {pids}")
    quota = limits.get("cpu_quota")
    if isinstance(quota, (int, float)) and not isinstance(quota, bool) and quota > 0:
        us = max(1000, round(quota * PERIOD_US / 100))
        _set(path, "cpu.max", f"{us} {PERIOD_US}")
        done.append(f"cpu.max {us}")
    shares = limits.get("cpu_shares")
    if isinstance(shares, int) and not isinstance(shares, bool) and shares > 0:
        # the conversion runc and systemd use, as the host driver does
        weight = 1 + ((min(max(shares, 2), 262144) - 2) * 9999) // 262142
        _set(path, "cpu.weight", str(weight))
        done.append(f"cpu.weight {weight}")
    return done


def _set(path: str, name: str, value: str) -> None:
    try:
        _write(path + "/" + name, value)
    except OSError as e:
        raise CgroupError(f"cannot set {name} of {path} to {value}: {e.strerror}") from None


def move(path: str, pid: int) -> None:
    try:
        _write(path + "/cgroup.procs", str(pid))
    except OSError as e:
        raise CgroupError(f"cannot move pid {pid} into {path}: {e.strerror}") from None


def procs(path: str) -> list[int]:
    try:
        return [int(p) for p in _read(path + "/cgroup.procs").split()]
    except (OSError, ValueError):
        return []


def populated(path: str) -> bool | None:
    """None when the cgroup is gone."""
    try:
        for line in _read(path + "/cgroup.events").splitlines():
            key, _, value = line.partition(" ")
            if key == "populated":
                return value == "1"
    except OSError:
        return None
    return None


def freeze(path: str, frozen: bool, timeout: float = 5.0) -> None:
    want = "1" if frozen else "0"
    _set(path, "cgroup.freeze", want)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            events = dict(line.split(" ", 1) for line in _read(path + "/cgroup.events")
                          .splitlines() if " " in line)
        except OSError:
            return
        if events.get("frozen") == want:
            return
        time.sleep(0.002)
    raise CgroupError(f"{path} did not {'freeze' if frozen else 'thaw'} within {timeout:g} s")


def kill(path: str, timeout: float = 5.0) -> int:
    """Kill every process of the cgroup and remove it; returns how many there were."""
    if not os.path.isdir(path):
        return 0
    count = len(procs(path))
    try:
        _write(path + "/cgroup.kill", "1")  # Linux 5.14+: forks in flight included
    except OSError:
        for pid in procs(path):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return count
        except FileNotFoundError:
            return count
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CgroupError(f"cannot remove {path}: {e.strerror}") from None
        time.sleep(0.002)


def stats(path: str) -> dict[str, Any]:
    memory: int | None
    try:
        memory = int(_read(path + "/memory.current"))
    except (OSError, ValueError):
        memory = None
    return {"procs": len(procs(path)), "memory": memory}


__all__ = [
    "ROOT",
    "CgroupError",
    "create",
    "ensure_root",
    "freeze",
    "kill",
    "move",
    "path_of",
    "populated",
    "procs",
    "set_limits",
    "stats",
]
