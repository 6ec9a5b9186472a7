"""Misbehaves: tries to mount a file system."""

from __future__ import annotations

import ctypes
import tempfile

from _common import act, behave, survived

behave()
target = tempfile.mkdtemp()
libc = ctypes.CDLL(None, use_errno=True)
act("mount")
result = libc.mount(b"none", target.encode(), b"tmpfs", 0, None)
print(f"mount returned {result} errno {ctypes.get_errno()}", flush=True)
survived("mount")
