"""Benign: uses the network early (allowed by the first phase), then only computes.
Arguments: host port."""

from __future__ import annotations

import socket
import sys

from _common import behave, host_address

with socket.create_connection((host_address(sys.argv[1]), int(sys.argv[2])), timeout=5):
    pass
behave(0.5)
print("OK early_net", flush=True)
