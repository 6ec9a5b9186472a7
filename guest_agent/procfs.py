"""What the monitor reads about a process from /proc: a blocked caller's memory, the
program it runs, the paths it names (relative to its cwd or a dirfd), its parent, whether it
carries a seccomp filter, its cgroup path, its I/O syscall counts, and counter files
(memory.events, memory.oom_control, vmstat).

Every reader answers for a process that may end at any moment: a vanished process reads as
empty (or None), never as an exception, except `Mem`, whose failure means the event is lost
and says so (ProcReadError).
"""

from __future__ import annotations

import os

from guest_agent.profile import normalize

PAGE = os.sysconf("SC_PAGE_SIZE")
MAX_STRING = 4096
AT_FDCWD = -100


class ProcReadError(Exception):
    """A /proc read of a live caller failed: the event is lost."""


class Mem:
    """Reads a blocked caller's memory through /proc/<pid>/mem."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = -1

    def read(self, addr: int, size: int) -> bytes:
        """Up to `size` bytes at `addr`, stopping early at an unreadable page."""
        if self._fd < 0:
            try:
                self._fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise ProcReadError(f"open /proc/{self.pid}/mem: {e}") from None
        out = b""
        while len(out) < size:
            here = addr + len(out)
            chunk = min(size - len(out), PAGE - here % PAGE)
            try:
                data = os.pread(self._fd, chunk, here)
            except OSError:
                data = b""
            out += data
            if len(data) < chunk:
                break
        return out

    def string(self, addr: int, limit: int = MAX_STRING) -> str:
        if not addr:
            return ""
        out = b""
        while len(out) < limit:
            here = addr + len(out)
            chunk = min(limit - len(out), PAGE - here % PAGE)
            data = self.read(here, chunk)
            nul = data.find(b"\0")
            if nul >= 0:
                return os.fsdecode(out + data[:nul])
            out += data
            if len(data) < chunk:
                if not out:
                    raise ProcReadError(f"cannot read pid {self.pid} memory at {addr:#x}")
                break
        return os.fsdecode(out)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def program_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        try:
            with open(f"/proc/{pid}/comm") as f:
                return f.read().strip()
        except OSError:
            return ""


def resolve(pid: int, dirfd: int, path: str) -> str:
    """`path` as the caller meant it: relative to its cwd (AT_FDCWD) or to `dirfd`."""
    if path.startswith("/"):
        return normalize(path)
    try:
        base = os.readlink(f"/proc/{pid}/cwd" if dirfd == AT_FDCWD
                           else f"/proc/{pid}/fd/{dirfd}")
    except OSError:
        base = "?"
    return normalize(os.path.join(base, path) if path else base)


def fd_target(pid: int, fd: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return ""


def ppid_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def seccomp_filtered(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Seccomp_filters:"):
                    return int(line.split()[1]) >= 1
                if line.startswith("Seccomp:"):
                    mode = int(line.split()[1])
                    if mode != 2:
                        return False
    except (OSError, ValueError, IndexError):
        return False
    return True


def cgroup_components(pid: int) -> list[list[str]]:
    """The path components of each hierarchy's cgroup of `pid` (empty when it is gone)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    return [line.split(":", 2)[-1].split("/") for line in lines]


def io_syscalls(pid: int) -> int | None:
    """Read plus write syscalls made so far (/proc/<pid>/io syscr + syscw); None when the
    process is gone. PermissionError propagates: the caller counts it as a lost read."""
    try:
        with open(f"/proc/{pid}/io") as f:
            counts = dict(line.split(":", 1) for line in f if ":" in line)
        return int(counts.get("syscr", 0)) + int(counts.get("syscw", 0))
    except PermissionError:
        raise
    except (OSError, ValueError):
        return None


def read_counter(path: str, key: str) -> int | None:
    """The value of line `key N` in `path` (memory.events, memory.oom_control, vmstat)."""
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[0] == key:
                    return int(parts[1])
    except (OSError, ValueError):
        return None
    return None


def pids() -> list[int]:
    """Every process id /proc lists now."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


__all__ = ["AT_FDCWD", "MAX_STRING", "PAGE", "Mem", "ProcReadError", "cgroup_components",
           "fd_target", "io_syscalls", "pids", "ppid_of", "program_of", "read_counter",
           "resolve", "seccomp_filtered"]
