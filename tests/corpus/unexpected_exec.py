"""Misbehaves: drops a program into /dev/shm and runs it (a payload hidden in memory-backed
scratch, where the shipped policies deny exec whatever its origin)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from _common import act, behave, survived

behave()
payload = os.path.join(tempfile.mkdtemp(prefix="payload-", dir="/dev/shm"), "x")
shutil.copy("/bin/true", payload)
os.chmod(payload, 0o755)
act("unexpected_exec")
if subprocess.run([payload], check=False).returncode == 0:  # the payload ran
    survived("unexpected_exec")
print("payload did not run", flush=True)
