"""Misbehaves: reads a private key (the path is the first argument)."""

from __future__ import annotations

import sys

from _common import act, behave, survived

behave()
act("cred_read")
with open(sys.argv[1], "rb") as f:
    data = f.read()
print(f"read {len(data)} bytes", flush=True)
survived("cred_read")
