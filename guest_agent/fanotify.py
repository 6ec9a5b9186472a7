"""fanotify(7) inode marks on a watch's sensitive files, so only opens of those reach the
agent. Permission mode (FAN_CLASS_CONTENT + FAN_OPEN_PERM) holds the open until the agent
answers FAN_ALLOW / FAN_DENY; notification mode (FAN_CLASS_NOTIF + FAN_OPEN) only reports,
so a stuck agent never holds up anyone's open (used on the host, where other programs
open the same files)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import os
import stat
import struct
import time
from collections.abc import Iterator
from typing import Any

from guest_agent.seccomp import libc

FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_CLASS_CONTENT = 0x4
FAN_MARK_ADD = 0x1
FAN_OPEN = 0x20
FAN_Q_OVERFLOW = 0x4000
FAN_OPEN_PERM = 0x10000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_ALLOW = 0x1
FAN_DENY = 0x2
FAN_NOFD = -1
AT_FDCWD = -100
METADATA = struct.Struct("<IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
RESPONSE = struct.Struct("<iI")
MAX_MARKS = 4096
#: directories one expansion may walk for '**' components, all globs together: a list of
#: globs that match nothing would otherwise walk the whole tree once per '**'
MAX_WALKED = 8 * MAX_MARKS


class Event:
    __slots__ = ("fd", "mask", "path", "pid")

    def __init__(self, mask: int, fd: int, pid: int, path: str) -> None:
        self.mask = mask
        self.fd = fd
        self.pid = pid
        self.path = path

    @property
    def overflow(self) -> bool:
        return bool(self.mask & FAN_Q_OVERFLOW)

    @property
    def permission(self) -> bool:
        return bool(self.mask & FAN_OPEN_PERM)


def _has_magic(part: str) -> bool:
    return any(c in part for c in "*?[")


def expand(globs: tuple[str, ...], limit: int = MAX_MARKS,
           consulted: set[str] | None = None) -> tuple[list[tuple[str, bool]], list[str]]:
    """What to mark for `globs`: [(path, is_dir)] (a directory is marked with
    FAN_EVENT_ON_CHILD so files created in it later are covered too) and warnings. A glob
    whose last component is literal marks that file alone; otherwise the directories its
    files may be in. The walk stops at `limit` marks or MAX_WALKED directories walked, and
    skips what it cannot read. `consulted` receives every directory whose entries decided
    the result (see ExpandCache)."""
    out: dict[str, bool] = {}
    warnings: list[str] = []
    seen: set[str] = set() if consulted is None else consulted
    walk_left = MAX_WALKED

    def add(path: str, is_dir: bool) -> bool:
        if path not in out:
            if len(out) >= limit:
                return False
            out[path] = is_dir
        return True

    for glob in globs:
        parts: list[str] = []
        for p in glob.split("/"):
            if p and not (p == "**" and parts[-1:] == ["**"]):
                parts.append(p)
        if not parts:
            continue
        current = ["/"]
        full = True
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt: list[str] = []
            walked_now: set[str] = set()
            for base in current:
                seen.add(base)
                if part == "**":
                    if walk_left <= 0:
                        full = False
                        continue
                    if len(nxt) > limit or base in walked_now:
                        # walked already from a directory above it (bases come top-down),
                        # or enough found: a glob with several '**' must not walk the same
                        # tree once per base
                        continue
                    found = list(_walk_dirs(base, min(limit + 1 - len(nxt), walk_left)))
                    walk_left -= len(found)
                    walked = [d for d in found if d not in walked_now]
                    walked_now.update(walked)
                    seen.update(walked)
                    nxt.extend(walked)
                elif last:
                    nxt.append(base)  # marked below: the file or its directory
                elif _has_magic(part):
                    nxt.extend(os.path.join(base, n) for n in _listdir(base)
                               if fnmatch.fnmatchcase(n, part)
                               and os.path.isdir(os.path.join(base, n)))
                else:
                    path = os.path.join(base, part)
                    if os.path.isdir(path):
                        nxt.append(path)
            current = nxt
            if len(current) > limit:
                current = current[:limit]
                full = False
            if last:
                for base in current:
                    seen.add(base)
                    if part == "**" or _has_magic(part):
                        full = add(base, True) and full
                    else:
                        path = os.path.join(base, part)
                        try:
                            st = os.stat(path)
                        except OSError:
                            # not there yet: watch its directory for its creation
                            full = add(base, True) and full
                            continue
                        full = add(path, stat.S_ISDIR(st.st_mode)) and full
        if walk_left <= 0:
            warnings.append(f"sensitive paths: stopped after walking {MAX_WALKED} "
                            f"directories ({glob})")
            break
        if not full:
            warnings.append(f"sensitive paths: stopped at {limit} marks ({glob})")
            break
    return list(out.items()), warnings


def _dir_stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


class ExpandCache:
    """`expand` results kept between workloads of one agent. Walking the sensitive globs
    costs ~240 ms under TCG over 9p, most of a warm guest's workload start; a result is
    reused only while every directory that decided it is unchanged (inode, mtime, ctime:
    an entry made or removed in it changes them) and for at most `max_age` seconds (the
    host may change its side of a 9p root without the guest's attributes showing it)."""

    def __init__(self, max_age: float = 60.0, size: int = 8) -> None:
        self.max_age = max_age
        self.size = size
        self._entries: dict[tuple[tuple[str, ...], int], tuple[
            float, dict[str, Any], list[tuple[str, bool]], list[str]]] = {}
        self.hits = 0
        self.misses = 0

    def expand(self, globs: tuple[str, ...], limit: int = MAX_MARKS) -> tuple[
            list[tuple[str, bool]], list[str]]:
        key = (tuple(globs), limit)
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None:
            made, stamps, marks, warnings = entry
            if now - made <= self.max_age and all(
                    _dir_stamp(d) == stamp for d, stamp in stamps.items()):
                self.hits += 1
                return list(marks), list(warnings)
        self.misses += 1
        consulted: set[str] = set()
        # stamps first: a change during the walk then invalidates the entry next time
        stamps = {d: _dir_stamp(d) for d in _with_parents(globs)}
        marks, warnings = expand(globs, limit, consulted)
        for d in consulted:
            stamps.setdefault(d, _dir_stamp(d))
        if len(self._entries) >= self.size:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = (now, stamps, list(marks), list(warnings))
        return marks, warnings


def _with_parents(globs: tuple[str, ...]) -> set[str]:
    """The literal leading directories of each glob: a directory made on the way to a
    sensitive path changes one of them."""
    out = {"/"}
    for glob in globs:
        path = "/"
        for part in [p for p in glob.split("/") if p][:-1]:
            if _has_magic(part):
                break
            path = os.path.join(path, part)
            out.add(path)
    return out


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _walk_dirs(base: str, limit: int) -> Iterator[str]:
    for count, (root, dirs, _files) in enumerate(os.walk(base, onerror=lambda _e: None)):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
        yield root
        if count + 1 >= limit:
            return


class Group:
    """One fanotify group with its marks; read events with `events`, answer permission
    events with `respond` (every one, always)."""

    def __init__(self, *, permission: bool) -> None:
        self.permission = permission
        lib = libc()
        lib.fanotify_init.restype = ctypes.c_int
        lib.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        lib.fanotify_mark.restype = ctypes.c_int
        lib.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64,
                                      ctypes.c_int, ctypes.c_char_p]
        self._lib = lib
        klass = FAN_CLASS_CONTENT if permission else FAN_CLASS_NOTIF
        fd = lib.fanotify_init(FAN_CLOEXEC | FAN_NONBLOCK | klass,
                               os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fanotify_init: {os.strerror(err)}")
        self.fd = fd
        self.marks = 0

    def mark(self, path: str, is_dir: bool) -> None:
        mask = FAN_OPEN_PERM if self.permission else FAN_OPEN
        if is_dir:
            mask |= FAN_EVENT_ON_CHILD
        if self._lib.fanotify_mark(self.fd, FAN_MARK_ADD, mask, AT_FDCWD,
                                   os.fsencode(path)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fanotify_mark {path}: {os.strerror(err)}")
        self.marks += 1

    def events(self) -> list[Event]:
        """Events waiting now (each with its path; the event fd is closed by `respond` or
        here for notification events)."""
        try:
            data = os.read(self.fd, 64 * METADATA.size)
        except (BlockingIOError, InterruptedError):
            return []
        out: list[Event] = []
        offset = 0
        while offset + METADATA.size <= len(data):
            length, _vers, _res, _mlen, mask, fd, pid = METADATA.unpack_from(data, offset)
            if length < METADATA.size:
                break
            offset += length
            path = ""
            if fd >= 0:
                with contextlib.suppress(OSError):
                    path = os.readlink(f"/proc/self/fd/{fd}")
            out.append(Event(mask, fd, pid, path))
        return out

    def respond(self, event: Event, allow: bool) -> None:
        """Answer a permission event (no-op for others) and close its fd."""
        try:
            if event.permission and event.fd >= 0:
                response = RESPONSE.pack(event.fd, FAN_ALLOW if allow else FAN_DENY)
                for _ in range(100):  # EINTR/EAGAIN are transient; never spin for ever
                    try:
                        os.write(self.fd, response)
                        break
                    except OSError as e:
                        if e.errno not in (errno.EINTR, errno.EAGAIN):
                            raise
        finally:
            if event.fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(event.fd)
                event.fd = -1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # pending permission events are allowed by the kernel
            self.fd = -1


def available(permission: bool) -> str | None:
    """None when a fanotify group of this kind can be made here, else why not."""
    try:
        Group(permission=permission).close()
    except (OSError, AttributeError) as e:
        return str(e)
    return None


__all__ = ["Event", "ExpandCache", "Group", "available", "expand"]
