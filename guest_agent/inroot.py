"""Looking a path up as a given process would: in its root and mount namespace, from its
cwd or a directory fd of its own, following symlinks as exec does.

The monitor asks this of every exec it is notified of before judging it. The C library and
Python's subprocess search PATH by calling execve in each directory until one does not
fail with ENOENT (or ENOTDIR...); an attempt whose target does not exist must be answered
with the error the kernel would give, not judged as a program that ran.

With openat2(2) (Linux 5.6; syscall 437 on x86_64): an absolute path is resolved beneath
/proc/PID/root with RESOLVE_IN_ROOT, so ".." and absolute symlinks stay inside the caller's
root; a relative one from /proc/PID/cwd (or /proc/PID/fd/N for execveat), whose absolute
symlinks, should a PATH entry have one, resolve against the agent's own root. Without
openat2, os.stat of the same path through /proc/PID/root (or cwd, fd) answers whether it
exists, with symlinks resolved in the agent's root.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from typing import Any

from guest_agent.procfs import AT_FDCWD

SYS_OPENAT2 = 437
RESOLVE_IN_ROOT = 0x10
#: lookup errors that mean the exec cannot proceed and nothing ran
MISSING = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG})
#: openat2 is missing or refused here: fall back to stat
_NO_OPENAT2 = frozenset({errno.ENOSYS, errno.EINVAL, errno.E2BIG, errno.EPERM})
#: RESOLVE_IN_ROOT gives up with EAGAIN when a rename races with the walk
_RETRIES = 3


@dataclass(frozen=True)
class Lookup:
    """How a path looked up for a process: `error` 0 when it exists (then `real` is the
    path it resolves to, in the caller's view, "" when unknown), else the errno."""

    error: int = 0
    real: str = ""

    @property
    def missing(self) -> bool:
        return self.error in MISSING


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


class _Openat2:
    """openat2 through ctypes; `usable` turns False for good when the kernel lacks it."""

    def __init__(self) -> None:
        self.usable = True
        #: libc's syscall(2), loaded on first use
        self._syscall: Any = None

    def __call__(self, dirfd: int, path: str, resolve: int) -> int:
        """The O_PATH fd of `path`, or -errno."""
        if self._syscall is None:
            lib = ctypes.CDLL(None, use_errno=True)
            lib.syscall.restype = ctypes.c_long
            self._syscall = lib.syscall
        how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, resolve)
        fd = self._syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd),
                           ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                           ctypes.c_size_t(ctypes.sizeof(how)))
        return int(fd) if fd >= 0 else -ctypes.get_errno()


_openat2 = _Openat2()


def _start(pid: int, raw: str, dirfd: int, proc: str) -> str:
    if raw.startswith("/"):
        return f"{proc}/{pid}/root"
    if dirfd == AT_FDCWD:
        return f"{proc}/{pid}/cwd"
    return f"{proc}/{pid}/fd/{dirfd}"


def caller_view(pid: int, path: str, proc: str = "/proc") -> str:
    """`path` (as the agent sees it) as the caller sees it: without its root's prefix."""
    try:
        root = os.readlink(f"{proc}/{pid}/root")
    except OSError:
        return path
    if root in ("/", "") or not path.startswith(root.rstrip("/") + "/"):
        return path
    return path[len(root.rstrip("/")):]


def lookup(pid: int, raw: str, dirfd: int = AT_FDCWD, *, proc: str = "/proc") -> Lookup | None:
    """Look `raw` (as the caller passed it, relative to `dirfd` when not absolute) up as
    process `pid` would. None when that cannot be told (the caller is gone, its /proc entry
    unreadable): the caller then judges the path as given."""
    if not raw:
        return Lookup(errno.ENOENT)  # as the kernel answers execve("")
    try:
        start = os.open(_start(pid, raw, dirfd, proc), os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if _openat2.usable:
            found = _by_openat2(start, raw)
            if found is not None:
                return _resolved(pid, found, proc)
        return _by_stat(pid, raw, dirfd, proc)
    finally:
        os.close(start)


def _by_openat2(start: int, raw: str) -> int | Lookup | None:
    """The O_PATH fd found, a failed Lookup, or None when openat2 cannot be used."""
    resolve = RESOLVE_IN_ROOT if raw.startswith("/") else 0
    for _ in range(_RETRIES):
        fd = _openat2(start, raw, resolve)
        if fd >= 0:
            return fd
        if -fd in _NO_OPENAT2:
            _openat2.usable = False
            return None
        if -fd != errno.EAGAIN:
            return Lookup(-fd)
    return None


def _resolved(pid: int, found: int | Lookup, proc: str) -> Lookup:
    if isinstance(found, Lookup):
        return found
    try:
        real = os.readlink(f"/proc/self/fd/{found}")
    except OSError:
        real = ""
    finally:
        os.close(found)
    return Lookup(0, caller_view(pid, real, proc) if real else "")


def _by_stat(pid: int, raw: str, dirfd: int, proc: str) -> Lookup | None:
    base = _start(pid, raw, dirfd, proc)
    path = base + raw if raw.startswith("/") else os.path.join(base, raw)
    try:
        os.stat(path)
    except OSError as e:
        return Lookup(e.errno) if e.errno and e.errno != errno.ESRCH else None
    return Lookup(0, "")


__all__ = ["MISSING", "Lookup", "caller_view", "lookup"]
