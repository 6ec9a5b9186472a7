"""Both ends of the agent in tests: `serve` reads what the host sends (the agent's end of
a socketpair in link tests); `running_agent` starts a real agent on a unix socket and
gives the host's end as an `AgentPeer`."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from guest_agent.protocol import HOST_TYPES, Decoder, Item, encode


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


class AgentPeer:
    """The host's end of one agent: every message received is kept in `seen`, in order."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.decoder = Decoder()
        self.seen: list[dict] = []

    def send(self, msg: dict) -> None:
        self.conn.sendall(encode(msg))

    def until(self, pred: Callable[[dict], Any], timeout: float = 20.0) -> dict:
        """The first message, seen or still to come, that `pred` accepts."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            # every message of a read is kept before any is judged: one read often holds
            # the message waited for and the ones after it (a start's output)
            for msg in self.seen[checked:]:
                checked += 1
                if pred(msg):
                    return msg
            if time.monotonic() >= deadline:
                break
            try:
                data = self.conn.recv(65536)
            except TimeoutError:
                continue
            assert data, "agent closed the link"
            for msg in self.decoder.feed(data):
                assert isinstance(msg, dict), msg
                self.seen.append(msg)
        raise AssertionError(f"not seen; got {[(m['type'], m.get('id')) for m in self.seen]}")


PeerT = TypeVar("PeerT", bound=AgentPeer)


@contextlib.contextmanager
def running_agent(tmp_path: Path, python: str,
                  peer_class: type[PeerT] = AgentPeer) -> Iterator[PeerT]:  # type: ignore[assignment]
    """A real agent, its hello received (in `seen`); on leaving, the agent is stopped, and
    its log must hold no traceback."""
    agent, conn, server = launch_agent(tmp_path, python)
    try:
        peer = peer_class(conn)
        peer.until(lambda m: m["type"] == "hello")
        yield peer
    finally:
        agent.terminate()
        try:
            _, err_text = agent.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            agent.kill()
            _, err_text = agent.communicate()
        conn.close()
        server.close()
    assert b"Traceback" not in err_text, err_text.decode(errors="replace")[-3000:]
