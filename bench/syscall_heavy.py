"""A syscall-heavy workload for bench/monitor_overhead.py: small reads and writes, stats,
opens of existing files, and now and then a new file. Prints its own elapsed time, so
zone start-up is not part of the figure. Argument: iterations."""

from __future__ import annotations

import os
import sys
import tempfile
import time

n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
d = tempfile.mkdtemp()
existing = os.path.join(d, "existing")
with open(existing, "wb") as f:
    f.write(b"x" * 4096)
sink = os.open(os.path.join(d, "sink"), os.O_WRONLY | os.O_CREAT)
t0 = time.perf_counter()
for i in range(n):
    fd = os.open(existing, os.O_RDONLY)
    for _ in range(8):
        os.read(fd, 64)
    os.close(fd)
    os.stat(existing)
    for _ in range(8):
        os.write(sink, b"y" * 64)
    if i % 50 == 0:  # one new file every 50 rounds (a notified open)
        new = os.open(os.path.join(d, f"n{i}"), os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(new)
elapsed = time.perf_counter() - t0
print(f"ELAPSED {elapsed:.6f} syscalls {n * 21 + (n // 50) * 2}", flush=True)
