"""Misbehaves: ptrace-attaches to another process (its own child, to stay harmless)."""

from __future__ import annotations

import ctypes
import os
import time

from _common import act, behave, survived

PTRACE_ATTACH = 16
behave()
child = os.fork()
if child == 0:
    time.sleep(10)
    os._exit(0)
libc = ctypes.CDLL(None, use_errno=True)
act("ptrace")
result = libc.ptrace(PTRACE_ATTACH, child, None, None)
print(f"ptrace returned {result} errno {ctypes.get_errno()}", flush=True)
os.kill(child, 9)
survived("ptrace")
