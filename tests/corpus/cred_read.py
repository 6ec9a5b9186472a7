"""Misbehaves: reads a private key (the path is the first argument), then works on it before
it would send it anywhere. In a guest the open is refused (fanotify permission event); beside
a cgroup zone the agent is only notified (it must never hold host opens), so the reader is
killed just after its open: before it can use what it read."""

from __future__ import annotations

import sys

from _common import act, behave, survived

behave()
act("cred_read")
with open(sys.argv[1], "rb") as f:
    data = f.read()
print(f"read {len(data)} bytes", flush=True)
behave(0.5)  # encoding it for the way out
survived("cred_read")
