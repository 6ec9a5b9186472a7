"""Misbehaves: makes files at a pace ordinary work does, then destroys them all at once
(wiper or ransomware's last step). Argument: how many files."""

from __future__ import annotations

import os
import sys
import tempfile
import time

from _common import act, behave, survived

COUNT = int(sys.argv[1]) if len(sys.argv) > 1 else 600
WORK = tempfile.mkdtemp(prefix="docs-", dir="/tmp")
behave()
for i in range(COUNT):
    with open(os.path.join(WORK, f"doc{i}.txt"), "w") as f:
        f.write("precious\n")
    if i % 100 == 99:
        time.sleep(0.3)
act("mass-delete")
for i in range(COUNT):
    os.unlink(os.path.join(WORK, f"doc{i}.txt"))
survived("mass-delete")
