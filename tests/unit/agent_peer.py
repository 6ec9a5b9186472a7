"""The agent's end of a socketpair in link tests: read what the host sends, as decoded
items, until the socket ends."""

from __future__ import annotations

import socket
from collections.abc import Callable

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
