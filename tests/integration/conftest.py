"""Fixtures shared by the integration tests."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP listener on all host addresses; yields its port. A zone reaches it only
    through its NIC (the host end of the zone's /30), so a connect proves the NIC works."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 0))
    server.listen(64)
    server.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                conn.close()
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


@pytest.fixture(scope="module")
def payload_port() -> Iterator[int]:
    """An HTTP server of code and data for zones to fetch (monitor_corpus.payloads)."""
    from tests.integration.monitor_corpus import payload_server

    with payload_server() as port:
        yield port
