"""The agent's end of a socketpair in link tests: read what the host sends, as decoded
items, until the socket ends."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from guest_agent.protocol import HOST_TYPES, Decoder, Item


def serve(sock: socket.socket, handle: Callable[[Item], None]) -> None:
    decoder = Decoder(HOST_TYPES)
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            return
        if not data:
            return
        for item in decoder.feed(data):
            handle(item)


def launch_agent(tmp_path: Path, python: str) -> tuple[subprocess.Popen[bytes], socket.socket,
                                                       socket.socket]:
    """A real agent (a copy of guest_agent/, run by `python`) connected to a unix socket of
    the test: returns the agent process, the accepted connection (0.2 s timeout) and the
    listening socket (the caller closes both)."""
    repo = Path(__file__).resolve().parents[2]
    shutil.copytree(repo / "guest_agent", tmp_path / "guest_agent",
                    ignore=shutil.ignore_patterns("__pycache__", "*.md", "*.toml"))
    path = str(tmp_path / "agent.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    server.settimeout(15)
    agent = subprocess.Popen([python, "-m", "guest_agent", "--connect", "unix:" + path,
                              "--heartbeat", "0.5", "--log-level", "debug"],
                             env={"PYTHONPATH": str(tmp_path), "PATH": os.environ["PATH"]},
                             stderr=subprocess.PIPE)
    conn, _ = server.accept()
    conn.settimeout(0.2)
    return agent, conn, server
