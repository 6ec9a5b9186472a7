"""The few Linux system calls the standard library lacks, through ctypes.

Everything here may run in a forked child before exec (a subprocess `preexec_fn`), so
the functions are resolved once at import and do nothing but call the kernel.
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNS = 0x0002_0000
CLONE_NEWCGROUP = 0x0200_0000
CLONE_NEWIPC = 0x0800_0000
CLONE_NEWPID = 0x2000_0000
CLONE_NEWNET = 0x4000_0000

MNT_DETACH = 2

PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)
_mount = _libc.mount
_mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                   ctypes.c_char_p]
_umount2 = _libc.umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_setns = _libc.setns
_setns.argtypes = [ctypes.c_int, ctypes.c_int]
_unshare = _libc.unshare
_unshare.argtypes = [ctypes.c_int]
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                   ctypes.c_ulong]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int,
          data: bytes | None = None) -> None:
    _check(_mount(source, target, fstype, flags, data),
           f"mount {target.decode(errors='replace')}")


def umount2(target: bytes, flags: int) -> None:
    _check(_umount2(target, flags), f"umount {target.decode(errors='replace')}")


def setns(fd: int, nstype: int) -> None:
    _check(_setns(fd, nstype), "setns")


def unshare(flags: int) -> None:
    _check(_unshare(flags), "unshare")


def set_no_new_privs() -> None:
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
