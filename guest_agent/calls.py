"""A seccomp notification decoded into the call it is: an exec, a connect, a file-creating
open, a deny-listed syscall, or any call through a foreign ABI, with its arguments read
from the blocked caller's memory (procfs.Mem) and its paths made absolute as the caller
meant them. Nothing here judges: judge.py does, on these values.

A read that fails raises procfs.ProcReadError (the event is lost), except for the
arguments of a deny-listed call, which fall back to the raw registers: that call is an
anomaly whatever its arguments say.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Union

from guest_agent import seccomp
from guest_agent.procfs import AT_FDCWD, Mem, ProcReadError, fd_target, resolve
from guest_agent.syscalls import X32_SYSCALL_BIT, X86_64
from guest_agent.syscalls import name as syscall_name

MAX_ARGV = 16
AT_EMPTY_PATH = 0x1000
O_CREAT = 0o100
O_TMPFILE_BIT = 0o20000000
O_ACCMODE = 0o3
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10

NR = X86_64
EXECS = frozenset(NR[n] for n in ("execve", "execveat"))
OPENS = frozenset(NR[n] for n in ("open", "openat", "creat", "openat2"))
MAPS = frozenset(NR[n] for n in ("mmap", "mprotect"))
#: syscall -> (index of the path argument, index of its dirfd or -1, whether it moves)
_FILE_ARGS = {"rename": (0, -1, True), "renameat": (1, 0, True), "renameat2": (1, 0, True),
              "link": (0, -1, True), "linkat": (1, 0, True), "unlink": (0, -1, False),
              "unlinkat": (1, 0, False), "rmdir": (0, -1, False)}
FILE_CALLS = frozenset(NR[n] for n in _FILE_ARGS)
MAP_ANONYMOUS = 0x20
MAX_ENV = 512
_PRELOAD_VARS = (b"LD_PRELOAD=", b"LD_AUDIT=")

PTRACE_REQUESTS = {0: "TRACEME", 1: "PEEKTEXT", 2: "PEEKDATA", 3: "PEEKUSER", 4: "POKETEXT",
                   5: "POKEDATA", 6: "POKEUSER", 7: "CONT", 8: "KILL", 9: "SINGLESTEP",
                   12: "GETREGS", 13: "SETREGS", 16: "ATTACH", 17: "DETACH", 24: "SYSCALL",
                   0x4200: "SETOPTIONS", 0x4206: "SEIZE", 0x4207: "INTERRUPT"}


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


@dataclass(frozen=True)
class ExecCall:
    """execve/execveat. `path` is absolute (the caller's cwd or dirfd joined); `raw` and
    `dirfd` are what the caller passed, for looking the target up as it would (inroot.py);
    `by_fd`: execveat(fd, "", AT_EMPTY_PATH), whose program is the open file itself."""

    syscall: str
    path: str
    argv: tuple[str, ...] = ()
    raw: str = ""
    dirfd: int = AT_FDCWD
    by_fd: bool = False
    #: the address of its environment in the caller's memory (read on demand: `preloads`)
    envp: int = 0

    @property
    def args(self) -> dict[str, Any]:
        return {"path": self.path, "argv": list(self.argv)}


@dataclass(frozen=True)
class ConnectCall:
    """connect. `family` is inet, inet6, unix, none (no address) or the number of another
    family; `path` is a unix socket's ("@name": abstract)."""

    family: str
    address: str = ""
    port: int = 0
    path: str = ""
    syscall: str = "connect"

    @property
    def args(self) -> dict[str, Any]:
        if self.family in ("inet", "inet6"):
            return {"family": self.family, "address": self.address, "port": self.port}
        if self.family == "unix":
            return {"family": "unix", "path": self.path}
        return {"family": self.family}


@dataclass(frozen=True)
class OpenCall:
    """open/openat/creat/openat2 as the filter notifies them (creating a file, or opening
    one for writing)."""

    syscall: str
    path: str
    flags: int
    #: the path as passed, and the directory fd it is relative to (inroot.lookup)
    raw: str = ""
    dirfd: int = AT_FDCWD

    @property
    def args(self) -> dict[str, Any]:
        return {"path": self.path, "flags": self.flags}

    @property
    def writes(self) -> bool:
        return bool(self.flags & (O_ACCMODE | O_CREAT | O_TMPFILE_BIT))


@dataclass(frozen=True)
class MapCall:
    """mmap with PROT_EXEC of a file (`fd`), or mprotect adding PROT_EXEC at `addr`."""

    syscall: str
    prot: int
    fd: int = -1
    addr: int = 0
    anonymous: bool = False

    @property
    def args(self) -> dict[str, Any]:
        if self.syscall == "mmap":
            return {"fd": self.fd, "prot": self.prot}
        return {"addr": hex(self.addr), "prot": self.prot}


@dataclass(frozen=True)
class FileCall:
    """A rename or link (`moves`), or an unlink/rmdir, of `path` (absolute, as the caller
    meant it)."""

    syscall: str
    path: str
    moves: bool

    @property
    def args(self) -> dict[str, Any]:
        return {"path": self.path}


@dataclass(frozen=True)
class DeniedCall:
    """A call of a deny_syscalls entry (exec excepted: an ExecCall judges that)."""

    syscall: str
    args: dict[str, Any]


@dataclass(frozen=True)
class ForeignCall:
    """Any call through the i386 or x32 ABI: its number is not an x86_64 one."""

    nr: int
    abi: str
    raw: tuple[int, ...]

    @property
    def syscall(self) -> str | None:
        return None  # a foreign number names no x86_64 syscall

    @property
    def args(self) -> dict[str, Any]:
        return {"raw": [hex(a) for a in self.raw]}


Call = Union[ExecCall, ConnectCall, OpenCall, MapCall, FileCall, DeniedCall, ForeignCall]


def decode(n: seccomp.Notification, mem: Mem, denied: Collection[str]) -> Call | None:
    """The call notification `n` is, or None for one the monitor has no use for. `denied`
    are the profile's deny_syscalls."""
    if n.arch != seccomp.AUDIT_ARCH_X86_64 or n.nr & X32_SYSCALL_BIT:
        abi = "x32" if n.arch == seccomp.AUDIT_ARCH_X86_64 else f"arch {n.arch:#x}"
        return ForeignCall(n.nr & 0xFFFF, abi, tuple(n.args))
    name = syscall_name(n.nr)
    if n.nr in EXECS:
        return exec_call(n, mem)
    if name in denied:
        return DeniedCall(name, _lenient_args(name, n, mem))
    if n.nr == NR["connect"]:
        return connect_call(n, mem)
    if n.nr in OPENS:
        return open_call(n, mem)
    if n.nr in MAPS:
        return map_call(n)
    if n.nr in FILE_CALLS:
        return file_call(n, mem)
    return None


def _lenient_args(name: str, n: seccomp.Notification, mem: Mem) -> dict[str, Any]:
    if name == "ptrace":
        req = n.args[0] & 0xFFFFFFFF
        return {"request": PTRACE_REQUESTS.get(req, req), "target": _s32(n.args[1])}
    with contextlib.suppress(ProcReadError):
        if n.nr in OPENS:
            return open_call(n, mem).args
        if n.nr == NR["connect"]:
            return connect_call(n, mem).args
    return {"raw": [hex(a) for a in n.args]}


def exec_call(n: seccomp.Notification, mem: Mem) -> ExecCall:
    if n.nr == NR["execve"]:
        dirfd, path_ptr, argv_ptr, flags = AT_FDCWD, n.args[0], n.args[1], 0
    else:
        dirfd, path_ptr, argv_ptr, flags = _s32(n.args[0]), n.args[1], n.args[2], \
            n.args[4]
    raw = mem.string(path_ptr)
    by_fd = not raw and bool(flags & AT_EMPTY_PATH)
    path = fd_target(n.pid, dirfd) if by_fd else resolve(n.pid, dirfd, raw)
    argv: list[str] = []
    if argv_ptr:
        ptrs = mem.read(argv_ptr, 8 * MAX_ARGV)
        for (p,) in struct.iter_unpack("<Q", ptrs[:len(ptrs) // 8 * 8]):
            if not p:
                break
            argv.append(mem.string(p, 1024))
    envp = n.args[2] if n.nr == NR["execve"] else n.args[3]
    return ExecCall(syscall_name(n.nr), path, tuple(argv), raw, dirfd, by_fd, envp)


def preloads(call: ExecCall, mem: Mem) -> list[str]:
    """The libraries an exec's environment preloads (LD_PRELOAD, LD_AUDIT), as written."""
    if not call.envp:
        return []
    ptrs = mem.read(call.envp, 8 * MAX_ENV)
    out: list[str] = []
    for (p,) in struct.iter_unpack("<Q", ptrs[:len(ptrs) // 8 * 8]):
        if not p:
            break
        head = mem.read(p, 11)
        for var in _PRELOAD_VARS:
            if head.startswith(var):
                value = mem.string(p, 4096)[len(var):]
                out += [v for v in value.replace(":", " ").split() if v]
    return out


def map_call(n: seccomp.Notification) -> MapCall:
    prot = n.args[2] & 0xFFFFFFFF
    if n.nr == NR["mmap"]:
        return MapCall("mmap", prot, fd=_s32(n.args[4]),
                       anonymous=bool(n.args[3] & MAP_ANONYMOUS))
    return MapCall("mprotect", prot, addr=n.args[0])


def file_call(n: seccomp.Notification, mem: Mem) -> FileCall:
    name = syscall_name(n.nr)
    arg, dirfd_arg, moves = _FILE_ARGS[name]
    dirfd = _s32(n.args[dirfd_arg]) if dirfd_arg >= 0 else AT_FDCWD
    raw = mem.string(n.args[arg])
    return FileCall(name, resolve(n.pid, dirfd, raw) if raw else "", moves)


def connect_call(n: seccomp.Notification, mem: Mem) -> ConnectCall:
    length = min(n.args[2] & 0xFFFFFFFF, 128)
    if not n.args[1] or length < 2:
        return ConnectCall("none")
    raw = mem.read(n.args[1], length)
    if len(raw) < 2:
        raise ProcReadError(f"cannot read sockaddr of pid {n.pid}")
    family = struct.unpack_from("<H", raw)[0]
    if family == AF_INET and len(raw) >= 8:
        return ConnectCall("inet", socket.inet_ntop(socket.AF_INET, raw[4:8]),
                           struct.unpack_from(">H", raw, 2)[0])
    if family == AF_INET6 and len(raw) >= 24:
        return ConnectCall("inet6", socket.inet_ntop(socket.AF_INET6, raw[8:24]),
                           struct.unpack_from(">H", raw, 2)[0])
    if family == AF_UNIX:
        sun = raw[2:]
        if sun[:1] == b"\0":
            return ConnectCall("unix", path="@" + os.fsdecode(sun[1:].rstrip(b"\0")))
        path = os.fsdecode(sun.split(b"\0", 1)[0])
        return ConnectCall("unix", path=resolve(n.pid, AT_FDCWD, path) if path else "")
    return ConnectCall(str(family))


def open_call(n: seccomp.Notification, mem: Mem) -> OpenCall:
    name = syscall_name(n.nr)
    if name == "open":
        dirfd, path_ptr, flags = AT_FDCWD, n.args[0], n.args[1]
    elif name == "creat":
        dirfd, path_ptr, flags = AT_FDCWD, n.args[0], O_CREAT | 0o1 | 0o1000
    elif name == "openat":
        dirfd, path_ptr, flags = _s32(n.args[0]), n.args[1], n.args[2]
    else:  # openat2: flags in struct open_how
        dirfd, path_ptr = _s32(n.args[0]), n.args[1]
        how = mem.read(n.args[2], 8)
        flags = struct.unpack("<Q", how)[0] if len(how) == 8 else 0
    flags &= 0xFFFFFFFF
    raw = mem.string(path_ptr)
    return OpenCall(name, resolve(n.pid, dirfd, raw), flags, raw, dirfd)


__all__ = ["EXECS", "FILE_CALLS", "MAPS", "OPENS", "Call", "ConnectCall", "DeniedCall",
           "ExecCall", "FileCall", "ForeignCall", "MapCall", "OpenCall", "decode", "preloads"]
