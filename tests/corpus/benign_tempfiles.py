"""Benign: temp-file work (create, write, read back, stat, delete)."""

from __future__ import annotations

import os
import tempfile

from _common import behave

behave(0.2)
total = 0
with tempfile.TemporaryDirectory() as d:
    for i in range(60):
        path = os.path.join(d, f"f{i}")
        with open(path, "w") as f:
            f.write(str(i) * 100)
        total += os.stat(path).st_size
        with open(path) as f:
            total += len(f.read())
print(f"OK tempfiles {total}", flush=True)
