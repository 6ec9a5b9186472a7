"""Misbehaves late: a connect allowed in the first phase, then one after the network was cut
(the policy's allow-list no longer has it). Arguments: host port wait_s."""

from __future__ import annotations

import socket
import sys
import time

from _common import act, behave, host_address, survived

host, port, wait = host_address(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
behave(0.2)
with socket.create_connection((host, port), timeout=5):
    print("early connect ok", flush=True)
time.sleep(wait)
act("connect_out")
try:
    socket.create_connection((host, port), timeout=2).close()
except OSError as exc:
    print(f"connect failed: {exc}", flush=True)
survived("connect_out")
