"""Attach to a process with ptrace through libc, the way small debuggers do."""

import ctypes
import ctypes.util

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

PTRACE_ATTACH = 16


def attach(pid: int) -> None:
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) != 0:
        raise OSError(ctypes.get_errno(), "ptrace")


def bind_mount(source: bytes, target: bytes) -> int:
    return libc.mount(source, target, None, 4096, None)


def drop_to(uid: int) -> None:
    import os
    os.setuid(uid)
