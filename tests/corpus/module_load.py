"""Misbehaves: tries to load a kernel module (from an empty file: it could never load)."""

from __future__ import annotations

import ctypes
import os
import tempfile

from _common import act, behave, survived

SYS_FINIT_MODULE = 313  # x86_64
behave()
fd, path = tempfile.mkstemp()
libc = ctypes.CDLL(None, use_errno=True)
act("module_load")
result = libc.syscall(SYS_FINIT_MODULE, fd, b"", 0)
print(f"finit_module returned {result} errno {ctypes.get_errno()}", flush=True)
os.close(fd)
os.unlink(path)
survived("module_load")
