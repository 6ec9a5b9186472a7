"""seccomp user notification (seccomp(2), seccomp_unotify(2)): the filter a workload's first
process installs just before its exec, and the listener operations the monitor uses.

The classic-BPF filter runs in the kernel on every syscall of the watched tree; only the
few calls worth a look reach the agent (SECCOMP_RET_USER_NOTIF), everything else is
SECCOMP_RET_ALLOW, so the watch costs little for ordinary work:

* a foreign ABI (not AUDIT_ARCH_X86_64, or an x32 number) - every call;
* every syscall in profile.deny_syscalls;
* execve, execveat, connect;
* openat with O_CREAT|O_TMPFILE or a write access mode (O_WRONLY, O_RDWR) in flags, open
  likewise, creat, openat2: a new file, or a write (into /proc/PID/mem: injection);
* with profile.provenance: rename, renameat, renameat2, link, linkat (a file written from
  network data is pinned by inode before it moves), mmap with PROT_EXEC of a file (not
  MAP_ANONYMOUS's fd -1) and mprotect adding PROT_EXEC (provenance.py);
* with profile.max_deletes_per_s: unlink, unlinkat, rmdir (mass destruction).

Process creation (clone, clone3, fork, vfork) is NOT notified unless deny-listed: a caller
waiting for the agent's answer is woken by any signal (wait_for_completion_interruptible in
the kernel's seccomp_do_user_notification) and its call returns -ERESTARTSYS, which a
handler without SA_RESTART (dash's SIGCHLD) turns into EINTR: "Cannot fork" for a call
that never fails that way unwatched. Forks are counted by sampling instead (proccount.py).
The calls that are notified get SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV where the kernel has
it (5.19+): once the agent has received a call, only a fatal signal ends its wait, so a
SIGCHLD while the agent decides on an exec, connect or file-creating open no longer makes
it fail with EINTR. A signal before the agent received the call is handled as without the
flag, and the agent receives at once.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Iterable

from guest_agent.profile import Profile
from guest_agent.syscalls import X32_SYSCALL_BIT, X86_64, numbers

# --- constants (linux/seccomp.h, linux/filter.h, linux/audit.h) ---------------------------
SYS_SECCOMP = 317
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_GET_NOTIF_SIZES = 3
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5  # Linux 5.19
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
AUDIT_ARCH_X86_64 = 0xC000003E
PR_SET_NO_NEW_PRIVS = 38

O_CREAT = 0o100
O_TMPFILE_BIT = 0o20000000  # __O_TMPFILE: an unnamed new file is a new file too
NEW_FILE_FLAGS = O_CREAT | O_TMPFILE_BIT
#: O_WRONLY | O_RDWR: an open for writing (another process's /proc/PID/mem among them)
WRITE_FLAGS = 0o3
NOTIFIED_OPEN_FLAGS = NEW_FILE_FLAGS | WRITE_FLAGS

# struct seccomp_data offsets
OFF_NR = 0
OFF_ARCH = 4


def off_arg(i: int) -> int:
    """Offset of the low 32 bits of args[i] (x86_64 is little-endian)."""
    return 16 + 8 * i


# cBPF opcodes
BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
BPF_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K
BPF_MAXINSNS = 4096

# ioctls on the listener: _IOWR('!', 0, struct seccomp_notif) etc.
NOTIF_SIZE = 80
RESP_SIZE = 24
IOCTL_NOTIF_RECV = 0xC0502100
IOCTL_NOTIF_SEND = 0xC0182101
IOCTL_NOTIF_ID_VALID = 0x40082102
#: _IOW('!', 4, __u64): SECCOMP_IOCTL_NOTIF_SET_FLAGS (Linux 6.6+)
IOCTL_NOTIF_SET_FLAGS = 0x40082104
#: the kernel hands the CPU straight to the agent and back (no cold wake-ups of idle CPUs)
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1

NOTIF_FORMAT = "<QIIiIQ6Q"  # id, pid, flags, data.nr, data.arch, data.ip, data.args
RESP_FORMAT = "<QqiI"  # id, val, error, flags

Insn = tuple[int, int, int, int]

#: syscalls every watch notifies (what the monitor needs to see); process creation is not
#: among them (see the module docstring)
ALWAYS = ("execve", "execveat", "connect", "creat", "openat2")
#: never notified unless deny-listed: a notified fork can fail with EINTR
PROCESS_CREATION = ("clone", "clone3", "fork", "vfork")


#: notified with profile.provenance: a move pins a network-written file's inode first
MOVES = ("rename", "renameat", "renameat2", "link", "linkat")
#: notified with profile.max_deletes_per_s
DELETES = ("unlink", "unlinkat", "rmdir")
PROT_EXEC = 0x4
#: the low 32 bits of mmap's fd -1 (an anonymous mapping)
NO_FD = 0xFFFFFFFF


def extra_calls(profile: Profile) -> tuple[str, ...]:
    """The syscalls beyond ALWAYS that a filter for `profile` notifies on every call."""
    out: tuple[str, ...] = ()
    if profile.provenance:
        out += MOVES
    if profile.max_deletes_per_s:
        out += DELETES
    return out


def build_program(deny: Iterable[str], extra: Iterable[str] = (), *,
                  exec_maps: bool = False) -> list[Insn]:
    """The filter for a profile whose deny_syscalls are `deny`, notifying `extra` calls too
    and (`exec_maps`) executable file mappings: a list of (code, jt, jf, k). Each match
    returns at once (jeq over one ret) so no jump offset outgrows its 8 bits however long
    the deny list is."""
    deny_nrs = sorted(set(numbers(deny)))
    notify = sorted(set(deny_nrs) | {X86_64[n] for n in (*ALWAYS, *extra)})
    prog: list[Insn] = [
        (BPF_LD_W_ABS, 0, 0, OFF_ARCH),
        (BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        (BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF),
        (BPF_LD_W_ABS, 0, 0, OFF_NR),
        (BPF_JGE_K, 0, 1, X32_SYSCALL_BIT),
        (BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF),
    ]
    for nr in notify:
        prog += [(BPF_JEQ_K, 0, 1, nr), (BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF)]
    # conditional ones (unless denied outright, which the loop above already caught)
    conditional = (("openat", 2, NOTIFIED_OPEN_FLAGS), ("open", 1, NOTIFIED_OPEN_FLAGS))
    for name, arg, mask in conditional:
        nr = X86_64[name]
        if nr in deny_nrs:
            continue
        # nr != name: skip the 4 instructions of this check; notify when a flag is set
        prog += [(BPF_JEQ_K, 0, 4, nr), (BPF_LD_W_ABS, 0, 0, off_arg(arg)),
                 (BPF_JSET_K, 0, 1, mask),
                 (BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF), (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW)]
    if exec_maps:
        mmap, mprotect = X86_64["mmap"], X86_64["mprotect"]
        if mmap not in deny_nrs:
            # mmap: PROT_EXEC set and an fd other than -1
            prog += [(BPF_JEQ_K, 0, 6, mmap), (BPF_LD_W_ABS, 0, 0, off_arg(2)),
                     (BPF_JSET_K, 0, 3, PROT_EXEC), (BPF_LD_W_ABS, 0, 0, off_arg(4)),
                     (BPF_JEQ_K, 1, 0, NO_FD),
                     (BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF),
                     (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW)]
        if mprotect not in deny_nrs:
            prog += [(BPF_JEQ_K, 0, 4, mprotect), (BPF_LD_W_ABS, 0, 0, off_arg(2)),
                     (BPF_JSET_K, 0, 1, PROT_EXEC),
                     (BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF),
                     (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW)]
    prog.append((BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    if len(prog) > BPF_MAXINSNS:
        raise ValueError(f"seccomp filter of {len(prog)} instructions is too long")
    return prog


def notified_numbers(profile: Profile) -> frozenset[int]:
    """Syscall numbers a filter built for `profile` may notify."""
    maps = ("mmap", "mprotect") if profile.provenance else ()
    return frozenset(numbers(profile.deny_syscalls)) | {
        X86_64[n] for n in (*ALWAYS, "openat", "open", *extra_calls(profile), *maps)}


def pack_program(prog: list[Insn]) -> bytes:
    return b"".join(struct.pack("<HBBI", *insn) for insn in prog)


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(Iovec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
        _libc.ioctl.restype = ctypes.c_int
        _libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
        _libc.prctl.restype = ctypes.c_int
        _libc.sendmsg.restype = ctypes.c_ssize_t
        _libc.sendmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        _libc.close.argtypes = [ctypes.c_int]
    return _libc


SOL_SOCKET = 1
SCM_RIGHTS = 1
CMSG_LEN_FD = 16 + 4  # cmsghdr (size_t len, int level, int type) + one int
CMSG_SPACE_FD = 24
MAX_HEADER = 60 * 1024


class Installer:
    """Everything prepared before fork (ctypes buffers, the BPF program), so the child only
    makes syscalls."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.program = build_program(profile.deny_syscalls, extra_calls(profile),
                                     exec_maps=profile.provenance)
        self.notified = notified_numbers(profile)
        code = pack_program(self.program)
        self._libc = libc()
        self._filter = ctypes.create_string_buffer(code, len(code))
        self._fprog = SockFprog(len(self.program), ctypes.addressof(self._filter))
        self._header = ctypes.create_string_buffer(MAX_HEADER)
        self._iov = Iovec(ctypes.addressof(self._header), 0)
        self._cmsg = ctypes.create_string_buffer(CMSG_SPACE_FD)
        struct.pack_into("<QiI", self._cmsg, 0, CMSG_LEN_FD, SOL_SOCKET, SCM_RIGHTS)
        self._fd_slot = ctypes.c_int.from_buffer(self._cmsg, 16)
        self._msg = Msghdr(None, 0, ctypes.pointer(self._iov), 1,
                           ctypes.addressof(self._cmsg), CMSG_SPACE_FD, 0)
        self._syscall = self._libc.syscall
        self._prctl = self._libc.prctl
        self._sendmsg = self._libc.sendmsg
        self._close = self._libc.close
        self._fprog_ref = ctypes.byref(self._fprog)
        self._msg_ref = ctypes.addressof(self._msg)

    def _fail(self, step: str) -> OSError:
        err = ctypes.get_errno()
        return OSError(err, f"seccomp install: {step} failed: {os.strerror(err)}")

    def install_and_hand_over(self, sock_fd: int, header: bytes) -> None:
        """In the child: PR_SET_NO_NEW_PRIVS, install the filter with NEW_LISTENER, send
        `header` plus the listener fd (SCM_RIGHTS) on the SOCK_SEQPACKET socket `sock_fd`,
        close the listener. Raises OSError saying which step failed."""
        if len(header) > MAX_HEADER:
            raise OSError(errno.EMSGSIZE, f"seccomp install: header of {len(header)} bytes")
        if self._prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise self._fail("prctl(PR_SET_NO_NEW_PRIVS)")
        listener = self._syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER,
                                 SECCOMP_FILTER_FLAG_NEW_LISTENER
                                 | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV, self._fprog_ref)
        if listener < 0 and ctypes.get_errno() == errno.EINVAL:
            # a kernel before 5.19: notified calls stay interruptible (see the docstring)
            listener = self._syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER,
                                     SECCOMP_FILTER_FLAG_NEW_LISTENER, self._fprog_ref)
        if listener < 0:
            raise self._fail("seccomp(SET_MODE_FILTER, NEW_LISTENER)")
        ctypes.memmove(self._header, header, len(header))
        self._iov.len = len(header)
        self._fd_slot.value = listener
        sent = self._sendmsg(sock_fd, self._msg_ref, 0)
        if sent < 0:
            exc = self._fail("sendmsg(listener fd)")
            self._close(listener)
            raise exc
        self._close(listener)


# --- the listener side --------------------------------------------------------------------


class Notification:
    __slots__ = ("arch", "args", "id", "ip", "nr", "pid")

    def __init__(self, raw: bytes) -> None:
        (self.id, self.pid, _flags, self.nr, self.arch, self.ip,
         *args) = struct.unpack_from(NOTIF_FORMAT, raw)
        self.args: list[int] = args


class Listener:
    """Receive / answer / validate on one listener fd (ctypes, so no call holds the GIL)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._libc = libc()
        self._buf = ctypes.create_string_buffer(NOTIF_SIZE)
        self._resp = ctypes.create_string_buffer(RESP_SIZE)
        self._id = ctypes.c_uint64(0)
        #: whether the kernel switches synchronously between caller and agent
        self.sync_wake_up = self._libc.ioctl(
            fd, IOCTL_NOTIF_SET_FLAGS, ctypes.c_void_p(SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)) == 0

    def recv(self) -> Notification | None:
        """The next notification (poll for POLLIN first); None when it vanished (the
        caller was killed before we received it)."""
        ctypes.memset(self._buf, 0, NOTIF_SIZE)  # the kernel refuses a non-zeroed buffer
        if self._libc.ioctl(self.fd, IOCTL_NOTIF_RECV, self._buf) != 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.EINTR):
                return None
            raise OSError(err, f"SECCOMP_IOCTL_NOTIF_RECV: {os.strerror(err)}")
        return Notification(self._buf.raw)

    def valid(self, notif_id: int) -> bool:
        """Is the caller of `notif_id` still blocked in that syscall (so what we read from
        its memory belongs to this call)?"""
        self._id.value = notif_id
        return bool(self._libc.ioctl(self.fd, IOCTL_NOTIF_ID_VALID, ctypes.byref(self._id)) == 0)

    def respond(self, notif_id: int, *, allow: bool, error: int = errno.EPERM) -> bool:
        """CONTINUE the call, or fail it with -`error`; False if the caller was gone."""
        if allow:
            struct.pack_into(RESP_FORMAT, self._resp, 0, notif_id, 0, 0,
                             SECCOMP_USER_NOTIF_FLAG_CONTINUE)
        else:
            struct.pack_into(RESP_FORMAT, self._resp, 0, notif_id, 0, -error, 0)
        if self._libc.ioctl(self.fd, IOCTL_NOTIF_SEND, self._resp) != 0:
            err = ctypes.get_errno()
            if err == errno.ENOENT:
                return False
            raise OSError(err, f"SECCOMP_IOCTL_NOTIF_SEND: {os.strerror(err)}")
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_available: list[str | None] = []


def _check() -> str | None:
    if platform.machine() != "x86_64":
        return f"seccomp monitoring needs x86_64, this is {platform.machine()}"
    try:
        with open("/proc/self/status") as f:
            status = f.read()
    except OSError as e:
        return f"cannot read /proc/self/status: {e}"
    if "Seccomp:" not in status:
        return "the kernel lacks CONFIG_SECCOMP"
    lib = libc()
    action = ctypes.c_uint32(SECCOMP_RET_USER_NOTIF)
    if lib.syscall(SYS_SECCOMP, SECCOMP_GET_ACTION_AVAIL, 0, ctypes.byref(action)) != 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL:
            return "the kernel lacks CONFIG_SECCOMP_FILTER or SECCOMP_RET_USER_NOTIF (< 5.0)"
        return f"seccomp(GET_ACTION_AVAIL): {os.strerror(err)}"
    sizes = (ctypes.c_uint16 * 3)()
    if lib.syscall(SYS_SECCOMP, SECCOMP_GET_NOTIF_SIZES, 0, ctypes.byref(sizes)) != 0:
        return "seccomp(GET_NOTIF_SIZES): " + os.strerror(ctypes.get_errno())
    if sizes[0] != NOTIF_SIZE or sizes[1] != RESP_SIZE:
        return f"unexpected seccomp notification sizes {list(sizes)}"
    return None


def available() -> str | None:
    """None when seccomp user notification is usable here, else why not."""
    if not _available:
        _available.append(_check())
    return _available[0]


__all__ = ["ALWAYS", "DELETES", "MOVES", "PROCESS_CREATION", "Installer", "Listener",
           "Notification", "available", "build_program", "extra_calls", "notified_numbers",
           "pack_program"]
