"""The agent's end of the zone's channels: the unix socket the workload's processes connect
to (guest_agent/channel.py is their client), and the relay between them and the host.

A workload's ``send`` is streamed to the host as ``channel_send`` pieces while it is read
from the client (the agent never holds a whole message), then the client waits for the
host's ``channel_verdict``. Messages the host delivers (``channel_deliver`` pieces) wait in
an inbox until a client asks for one; taking it is acknowledged (``channel_ack``), which is
how the host knows how much waits here (it never sends more than INBOX_MESSAGES /
INBOX_BYTES unacknowledged, and the inbox refuses more as a second bound).

The socket is an abstract unix socket (CHANNEL_ADDRESS): abstract names live in a network
namespace, so only processes of the zone reach it (in a guest: the guest; beside a cgroup
zone: the zone's namespace, where the controller binds it and hands it to the agent).

Standard library only, Python >= 3.9.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import itertools
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Callable

from guest_agent.channel import pack, payload_size, read_exact, read_header
from guest_agent.protocol import (
    CHANNEL_ADDRESS,
    CHANNEL_ENV,
    CHANNEL_MAX_BYTES,
    CHANNEL_NAME_ENV,
    CHANNEL_PIECE_BYTES,
    MAX_ID_CHARS,
    Message,
)

log = logging.getLogger("guest_agent.endpoint")

#: delivered messages the workload has not taken yet (the host keeps to the same bounds)
INBOX_MESSAGES = 64
INBOX_BYTES = 16 * 1024 * 1024
#: client connections at once (each has a thread)
MAX_CLIENTS = 32
#: the longest a client's request header may take to arrive once it began
HEADER_TIMEOUT = 10.0

#: puts a channel message in the agent's outbox (waiting for room); False once closed
Put = Callable[[Message, int], bool]


def source_dir() -> str:
    """The directory holding the guest_agent package (for the workload's PYTHONPATH)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bind_listener() -> socket.socket:
    """The listening socket at CHANNEL_ADDRESS in the calling thread's network namespace."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind("\0" + CHANNEL_ADDRESS)
        sock.listen(MAX_CLIENTS)
    except OSError:
        sock.close()
        raise
    return sock


class _Waiter:
    """A client waiting for the verdict on its message."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.verdict = ""
        self.reason = ""


class Endpoint:
    def __init__(self, put: Put, stop: threading.Event) -> None:
        self._put = put
        self._stop = stop
        #: the zone's name among its group (told to clients; the host knows it anyway)
        self.name: str | None = None
        self._cond = threading.Condition()
        #: (delivery id, sender, data) in arrival order
        self._inbox: collections.deque[tuple[str, str, bytes]] = collections.deque()
        self._inbox_bytes = 0
        #: delivery id -> [sender, size, bytearray] of a delivery still arriving
        self._arriving: dict[str, list[Any]] = {}
        self._waiters: dict[str, _Waiter] = {}
        self._ids = itertools.count(1)
        self._clients = 0
        self._listeners: list[socket.socket] = []
        #: messages sent, delivered, refused (for the agent's log and tests)
        self.counts: collections.Counter[str] = collections.Counter()

    # -- setup -----------------------------------------------------------------------------

    @property
    def listening(self) -> bool:
        return bool(self._listeners)

    def add_listener(self, sock: socket.socket, name: str | None) -> None:
        """Serve `sock` (a bound, listening unix socket) from now on."""
        if name:
            self.name = name
        self._listeners.append(sock)
        threading.Thread(target=self._accept_loop, args=(sock,), name="channel-accept",
                         daemon=True).start()

    def env(self) -> dict[str, str]:
        """What the workload's environment gets: where the channel is, its name, and
        the client module on its PYTHONPATH."""
        out = {CHANNEL_ENV: "unix:@" + CHANNEL_ADDRESS, "PYTHONPATH": source_dir()}
        if self.name:
            out[CHANNEL_NAME_ENV] = self.name
        return out

    def close(self) -> None:
        for sock in self._listeners:
            with contextlib.suppress(OSError):
                sock.close()
        with self._cond:
            self._cond.notify_all()

    # -- from the host ---------------------------------------------------------------------

    def on_deliver(self, msg: Message) -> str | None:
        """One ``channel_deliver`` piece; an error text when it cannot be taken."""
        did, sender, size, offset = msg["id"], msg["from"], msg["size"], msg["offset"]
        try:
            data = base64.b64decode(msg["data"], validate=True)
        except (binascii.Error, ValueError):
            return f"delivery {did}: a piece is not base64"
        with self._cond:
            part = self._arriving.get(did)
            if part is None:
                if offset != 0:
                    return f"delivery {did}: a piece at offset {offset} of nothing begun"
                if len(self._inbox) >= INBOX_MESSAGES or \
                        self._inbox_bytes + size > INBOX_BYTES or size > CHANNEL_MAX_BYTES:
                    return (f"delivery {did}: the inbox is full ({len(self._inbox)} messages, "
                            f"{self._inbox_bytes} bytes waiting): dropped")
                part = self._arriving[did] = [sender, size, bytearray()]
                self._inbox_bytes += size
            buf = part[2]
            if offset != len(buf) or len(buf) + len(data) > part[1]:
                del self._arriving[did]
                self._inbox_bytes -= part[1]
                return f"delivery {did}: a piece out of order or beyond its size: dropped"
            buf += data
            if len(buf) == part[1]:
                del self._arriving[did]
                self._inbox.append((did, part[0], bytes(buf)))
                self._cond.notify_all()
        return None

    def on_verdict(self, msg: Message) -> str | None:
        with self._cond:
            waiter = self._waiters.pop(msg["id"], None)
        if waiter is None:
            return None  # its client went away: nobody to tell
        waiter.verdict, waiter.reason = msg["verdict"], msg["reason"]
        waiter.done.set()
        return None

    # -- clients ---------------------------------------------------------------------------

    def _accept_loop(self, server: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                ready = select.select([server], [], [], 0.5)[0]
                if not ready:
                    continue
                conn, _ = server.accept()
            except (OSError, ValueError):  # closed
                return
            with self._cond:
                full = self._clients >= MAX_CLIENTS
                if not full:
                    self._clients += 1
            if full:
                self._reply(conn, {"op": "error", "reason": f"{MAX_CLIENTS} channel "
                                   "connections are open already"})
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="channel-client",
                             daemon=True).start()

    def _reply(self, conn: socket.socket, header: dict[str, Any], payload: bytes = b"") -> bool:
        try:
            conn.sendall(pack(header, payload))
            return True
        except OSError:
            return False

    def _serve(self, conn: socket.socket) -> None:
        try:
            if not self._reply(conn, {"op": "ready", "name": self.name}):
                return
            while not self._stop.is_set():
                if not select.select([conn], [], [], 0.5)[0]:
                    continue
                try:
                    header = read_header(conn, time.monotonic() + HEADER_TIMEOUT)
                except EOFError:
                    return
                if header["op"] == "send":
                    if not self._client_send(conn, header):
                        return
                elif header["op"] == "recv":
                    if not self._client_recv(conn, header):
                        return
                else:
                    self._reply(conn, {"op": "error", "ref": header.get("ref"),
                                       "reason": f"unknown op {header['op'][:40]!r}"})
                    return
        except (OSError, ValueError, TimeoutError) as e:
            log.info("channel client: %s", e)
        finally:
            conn.close()
            with self._cond:
                self._clients -= 1

    def _client_send(self, conn: socket.socket, header: dict[str, Any]) -> bool:
        """Relay one message; False when the connection is done for."""
        ref, to = header.get("ref"), header.get("to")
        if not isinstance(to, str) or not to or len(to) > MAX_ID_CHARS:
            self._reply(conn, {"op": "error", "ref": ref, "reason": "no receiver name"})
            return False
        size = payload_size(header)
        mid = f"m{next(self._ids)}"
        waiter = _Waiter()
        with self._cond:
            self._waiters[mid] = waiter
        base = {"type": "channel_send", "id": mid, "to": to, "size": size}
        self.counts["sent"] += 1
        keep = True
        if size > CHANNEL_MAX_BYTES:
            # beyond what any grant allows: the host still hears of it (and audits the
            # refusal), but the bytes are not read, so this connection cannot go on
            self._put(dict(base, offset=0, data="", cancel=True), 0)
            keep = False
        else:
            offset = 0
            while True:
                try:
                    piece = read_exact(conn, min(CHANNEL_PIECE_BYTES, size - offset),
                                       time.monotonic() + HEADER_TIMEOUT)
                except (EOFError, OSError, TimeoutError):
                    # the client went away mid-message: the host must not wait for the rest
                    self._put(dict(base, offset=offset, data="", cancel=True), 0)
                    with self._cond:
                        self._waiters.pop(mid, None)
                    return False
                encoded = base64.b64encode(piece).decode("ascii")
                if not self._put(dict(base, offset=offset, data=encoded), len(encoded)):
                    return False
                offset += len(piece)
                if offset >= size:
                    break
        while not waiter.done.wait(0.5):
            if self._stop.is_set() or _hung_up(conn):
                with self._cond:
                    self._waiters.pop(mid, None)
                return False
        self.counts[waiter.verdict] += 1
        sent = self._reply(conn, {"op": "verdict", "ref": ref, "verdict": waiter.verdict,
                                  "reason": waiter.reason})
        return sent and keep

    def _client_recv(self, conn: socket.socket, header: dict[str, Any]) -> bool:
        ref, timeout = header.get("ref"), header.get("timeout")
        if timeout is not None and (not isinstance(timeout, (int, float))
                                    or isinstance(timeout, bool) or timeout < 0):
            self._reply(conn, {"op": "error", "ref": ref, "reason": "bad timeout"})
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._inbox:
                left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if left <= 0:
                    break
                self._cond.wait(left)
                if self._stop.is_set():
                    return False
                if not self._inbox and _hung_up(conn):
                    return False
            if not self._inbox:
                item = None
            else:
                item = self._inbox.popleft()
                self._inbox_bytes -= len(item[2])
        if item is None:
            return self._reply(conn, {"op": "timeout", "ref": ref})
        did, sender, data = item
        if not self._reply(conn, {"op": "message", "ref": ref, "from": sender,
                                  "size": len(data)}, data):
            with self._cond:  # not taken after all: the next receive gets it
                self._inbox.appendleft(item)
                self._inbox_bytes += len(data)
                self._cond.notify_all()
            return False
        self.counts["received"] += 1
        self._put({"type": "channel_ack", "id": did}, 0)
        return True


def _hung_up(conn: socket.socket) -> bool:
    """The client closed its end (a synchronous client sends nothing while it waits)."""
    poller = select.poll()
    poller.register(conn, select.POLLIN | select.POLLHUP | select.POLLERR)
    events = poller.poll(0)
    if not events:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


__all__ = ["INBOX_BYTES", "INBOX_MESSAGES", "Endpoint", "bind_listener",
           "source_dir"]
