"""Where code came from: which of a watch's processes received network data, and which files
they wrote, so that an exec, an executable mapping or a preload is judged by the origin of
its code rather than by the directory it lies in (a program the zone built from its own
sources runs; one it downloaded does not).

A process is a *receiver* once it:

* connects to an address outside the zone (a notified connect, judged before any byte can
  arrive) that is not one of the profile's trusted origins;
* reads a pipe or shares a socket a receiver writes (found when the receiver becomes one, by
  a scan of the zone's processes, and at each later judgement of the reader);
* holds open for reading a file a receiver wrote when it opens another for writing (cp);
* was forked by a receiver after that receiver became one.

A file is *network-written* once a receiver opens it for writing (a notified open: by inode
when it exists, else by path until it does; any later rename or link is notified and pins
the inode first), or held it open for writing when it became a receiver.

Code of network origin is then: the program of an exec, an interpreter's script, the
program an interpreter reads from a receiver's pipe on its stdin (`curl | sh`), an
LD_PRELOAD / LD_AUDIT library, and a file mapped executable (mmap, mprotect).

Not seen (documented limits): data a process copied without holding both files open at once
(`cat x > y`: the shell opens y before cat opens x), and a receiver that only uses sendto /
recvfrom on an unconnected UDP socket.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass

from guest_agent.procfs import fd_target

#: bounds: a hostile workload must not make the agent's bookkeeping grow without end
MAX_RECEIVERS = 4096
MAX_FILES = 16384
MAX_CHANNELS = 4096
MAX_FDS_SCANNED = 512
MAX_ANCESTRY = 32
#: interpreters whose program can be a file argument or stdin (basename globs are matched by
#: the profile; these are the names `script_of` knows the options of)
_INLINE_CODE = {"-c", "-e", "-E", "-m", "--command", "--eval", "-r"}
_OPTION_WITH_VALUE = {"-W", "-X", "-o", "-O", "--rcfile", "--init-file", "-I", "-M"}
O_ACCMODE = 0o3
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _boot_ticks() -> int:
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * CLK_TCK)


def _stat_of(pid: int) -> tuple[int, int] | None:
    """(ppid, start time in clock ticks since boot) of `pid`, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2:].split()
        return int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Origin:
    """Why some code is of network origin: said in the anomaly's detail."""

    detail: str


@dataclass(frozen=True)
class _Receiver:
    why: str
    #: when it became one (clock ticks since boot): children forked later inherit it
    since: int


@dataclass(frozen=True)
class OpenFd:
    fd: int
    target: str
    mode: int  # O_RDONLY, O_WRONLY or O_RDWR

    @property
    def reads(self) -> bool:
        return self.mode != os.O_WRONLY

    @property
    def writes(self) -> bool:
        return self.mode != os.O_RDONLY


def open_fds(pid: int) -> list[OpenFd]:
    """The process's open fds with their targets and access modes (empty when it is gone)."""
    out: list[OpenFd] = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names[:MAX_FDS_SCANNED]:
        fd = int(name)
        target = fd_target(pid, fd)
        if not target:
            continue
        out.append(OpenFd(fd, target, _fd_mode(pid, fd)))
    return out


def _fd_mode(pid: int, fd: int) -> int:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8) & O_ACCMODE
    except (OSError, ValueError, IndexError):
        pass
    return os.O_RDONLY


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def in_view(pid: int, path: str) -> str:
    """`path` as process `pid` names it, reachable from the agent (its root and mounts)."""
    return f"/proc/{pid}/root{path}" if path.startswith("/") else path


def _channel(target: str) -> bool:
    return target.startswith(("pipe:", "socket:"))


def own_fd(path: str) -> int | None:
    """N when `path` names the caller's own descriptor (/proc/self/fd/N, /dev/fd/N)."""
    for prefix in ("/proc/self/fd/", "/proc/thread-self/fd/", "/dev/fd/"):
        if path.startswith(prefix) and path[len(prefix):].isdigit():
            return int(path[len(prefix):])
    return None


def script_of(argv: tuple[str, ...]) -> str | None:
    """Where an interpreter exec'd with `argv` reads its program: a path, "-" for stdin,
    or None when the program is inline (-c, -e, -m)."""
    args = iter(argv[1:])
    for arg in args:
        if arg in _INLINE_CODE:
            return None
        if arg in ("-", "-s", "--"):
            if arg == "--":
                return next(args, "-")
            return "-"
        if arg in _OPTION_WITH_VALUE:
            next(args, None)
            continue
        if arg.startswith("-"):
            if not arg.startswith("--") and any(c in arg[1:] for c in "ce") \
                    and arg[1:].isalpha():
                return None  # bundled short options ending in c/e: -xc, -ne
            continue
        return arg
    return "-"


class Provenance:
    """One watch's receivers and network-written files."""

    def __init__(self) -> None:
        self._receivers: dict[tuple[int, int], _Receiver] = {}
        #: pipe:[N] / socket:[N] a receiver writes
        self._channels: dict[str, str] = {}
        #: (dev, ino) -> why
        self._files: dict[tuple[int, int], str] = {}
        #: files not yet created, as the creator named them: path -> (creator pid, why)
        self._pending: dict[str, tuple[int, str]] = {}

    @property
    def active(self) -> bool:
        """Whether any process received network data (else every judgement is None)."""
        return bool(self._receivers)

    # -- becoming a receiver ------------------------------------------------------------

    def received(self, pid: int, why: str, zone: Iterable[int]) -> list[tuple[int, str]]:
        """`pid` connected out. Marks it, what it writes, and every process of `zone` that
        reads what it writes (transitively). Returns the interpreters among those readers
        that read their program from such a pipe, with why: code of network origin being
        run now."""
        found = self._mark(pid, why)
        if not found:
            return []
        fed: list[tuple[int, str]] = []
        others = [p for p in zone if p != pid]
        changed = True
        while changed:
            changed = False
            for other in others:
                if self._key(other) in self._receivers:
                    continue
                via = self._reads_channel(other)
                if via is None:
                    continue
                self._mark(other, via)
                changed = True
                fed.append((other, via))
        return fed

    def _key(self, pid: int) -> tuple[int, int]:
        st = _stat_of(pid)
        return (pid, st[1] if st else -1)

    def _mark(self, pid: int, why: str) -> bool:
        key = self._key(pid)
        if key[1] < 0:
            return False
        if key not in self._receivers and len(self._receivers) < MAX_RECEIVERS:
            self._receivers[key] = _Receiver(why, _boot_ticks())
        for fd in open_fds(pid):
            if not fd.writes and not fd.target.startswith("socket:"):
                continue
            if _channel(fd.target):
                if len(self._channels) < MAX_CHANNELS:
                    self._channels.setdefault(fd.target, f"{fd.target} written by pid {pid}, "
                                              f"which {why}")
            elif fd.target.startswith("/"):
                ino = _inode(f"/proc/{pid}/fd/{fd.fd}")
                if ino is not None:
                    self._add_file(ino, f"{fd.target} written by pid {pid}, which {why}")
        return True

    def _add_file(self, ino: tuple[int, int], why: str) -> None:
        if len(self._files) < MAX_FILES:
            self._files.setdefault(ino, why)

    def _reads_channel(self, pid: int) -> str | None:
        if not self._channels:
            return None
        for fd in open_fds(pid):
            if fd.reads or fd.target.startswith("socket:"):
                why = self._channels.get(fd.target)
                if why is not None:
                    return f"reads {why}"
        return None

    def receiver(self, pid: int) -> str | None:
        """Why `pid` counts as having received network data, or None."""
        if not self._receivers:
            return None
        st = _stat_of(pid)
        if st is None:
            return None
        key = (pid, st[1])
        known = self._receivers.get(key)
        if known is not None:
            return known.why
        child_start, parent = st[1], st[0]
        for _ in range(MAX_ANCESTRY):
            if parent <= 1:
                break
            pst = _stat_of(parent)
            if pst is None:
                break
            ancestor = self._receivers.get((parent, pst[1]))
            if ancestor is not None and ancestor.since <= child_start:
                why = f"was forked by pid {parent}, which {ancestor.why}"
                self._mark(pid, why)
                return why
            parent = pst[0]
        via = self._reads_channel(pid)
        if via is None and self._files:
            via = self._holds_network_file(pid)
        if via is not None:
            self._mark(pid, via)
        return via

    def _holds_network_file(self, pid: int) -> str | None:
        for fd in open_fds(pid):
            if fd.reads and fd.target.startswith("/"):
                ino = _inode(f"/proc/{pid}/fd/{fd.fd}")
                why = self._files.get(ino) if ino is not None else None
                if why is not None:
                    return f"reads {why}"
        return None

    # -- files --------------------------------------------------------------------------

    def opened_for_writing(self, pid: int, path: str) -> None:
        """`pid` opens `path` (as it names it) for writing: a receiver's file is marked."""
        why = self.receiver(pid)
        if why is None:
            return
        detail = f"{path} written by pid {pid}, which {why}"
        ino = _inode(in_view(pid, path))
        if ino is not None:
            self._add_file(ino, detail)
        elif len(self._pending) < MAX_FILES:
            self._pending[path] = (pid, detail)

    def pin(self, pid: int) -> None:
        """Before a rename or link (or any judgement): files created since are known by
        inode from now on, wherever they move."""
        if not self._pending:
            return
        for path, (_creator, why) in list(self._pending.items()):
            ino = _inode(in_view(pid, path))
            if ino is not None:
                self._add_file(ino, why)
                del self._pending[path]

    def file_origin(self, pid: int, path: str) -> Origin | None:
        """Whether the file `path` (as `pid` names it) was written from network data."""
        if not self._receivers:
            return None
        fd = own_fd(path)
        if fd is not None:
            # the agent must not resolve the zone's /proc/self: it would be the agent's
            return self.fd_origin(pid, fd)
        self.pin(pid)
        ino = _inode(in_view(pid, path))
        why = self._files.get(ino) if ino is not None else None
        if why is None:
            pending = self._pending.get(path)
            why = pending[1] if pending is not None else None
        return Origin(why) if why is not None else None

    def fd_origin(self, pid: int, fd: int) -> Origin | None:
        """Whether `pid`'s open file `fd` was written from network data. A memfd has no
        path a notified open could have marked: one a receiver holds is its own writing."""
        if not self._receivers:
            return None
        target = fd_target(pid, fd)
        if target.startswith("/memfd:"):
            why = self.receiver(pid)
            return Origin(f"{target} held by pid {pid}, which {why}") if why else None
        self.pin(pid)
        ino = _inode(f"/proc/{pid}/fd/{fd}")
        why = self._files.get(ino) if ino is not None else None
        return Origin(why) if why is not None else None

    def mapping_origin(self, pid: int, addr: int) -> Origin | None:
        """The origin of the file mapped at `addr` in `pid` (mprotect of a file mapping)."""
        if not self._receivers:
            return None
        self.pin(pid)
        with contextlib.suppress(OSError):
            for name in os.listdir(f"/proc/{pid}/map_files"):
                low, _, high = name.partition("-")
                with contextlib.suppress(ValueError):
                    if int(low, 16) <= addr < int(high, 16):
                        ino = _inode(f"/proc/{pid}/map_files/{name}")
                        why = self._files.get(ino) if ino is not None else None
                        return Origin(why) if why is not None else None
        return None

    def stdin_origin(self, pid: int) -> Origin | None:
        """Whether `pid`'s stdin is a pipe or socket a receiver writes."""
        if not self._channels:
            return None
        why = self._channels.get(fd_target(pid, 0))
        return Origin(f"its stdin is {why}") if why is not None else None


__all__ = ["MAX_FILES", "MAX_RECEIVERS", "OpenFd", "Origin", "Provenance", "in_view",
           "open_fds", "own_fd", "script_of"]
