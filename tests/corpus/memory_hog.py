"""Misbehaves: allocates and touches memory as fast as it can (up to the argument, MiB)."""

from __future__ import annotations

import sys
import time

from _common import act, behave, survived

limit = int(sys.argv[1]) if len(sys.argv) > 1 else 900
behave()
act("memory_hog")
chunks = []
for _ in range(limit // 16):
    chunks.append(b"\x01" * (16 << 20))  # written: every page is resident
time.sleep(1)
print(f"held {len(chunks) * 16} MiB", flush=True)
survived("memory_hog")
