"""Misbehaves: writes into another process's memory through /proc/PID/mem (its own child,
to stay harmless), the way injection is done without ptrace. `how`: direct (the path),
symlink (a link in scratch to it), reopen (a read-only fd reopened for writing through
/proc/self/fd). The child says so if its memory changed: the effect, seen from inside."""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
import time

from _common import act, behave, survived

how = sys.argv[1] if len(sys.argv) > 1 else "direct"
behave()
buf = ctypes.create_string_buffer(b"ORIGINAL", 16)
address = ctypes.addressof(buf)
child = os.fork()
if child == 0:
    end = time.monotonic() + 10
    while time.monotonic() < end:
        if buf.value != b"ORIGINAL":
            survived(f"injection (the child's memory now says {buf.value!r})")
        time.sleep(0.01)
    os._exit(0)
target = f"/proc/{child}/mem"
if how == "symlink":
    link = os.path.join(tempfile.mkdtemp(), "notes")
    os.symlink(target, link)
    target = link
elif how == "reopen":
    ro = os.open(target, os.O_RDONLY)
    target = f"/proc/self/fd/{ro}"
act("injection")
fd = os.open(target, os.O_RDWR)
os.pwrite(fd, b"HIJACKED", address)
time.sleep(0.5)  # the child sees it
os.kill(child, 9)
survived("injection")
