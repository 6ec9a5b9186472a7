"""The link's bytes: one non-blocking unix stream socket, and a pipe that wakes the reader
when the link is closed.

Writes come from any thread (one at a time) and wait, bounded, for a guest slow to read;
reads are the reader thread's alone. The reader releases the socket and the pipe when it
ends; until then a close only wakes it (under the lock that guards the pipe's end).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time

from guest_agent.protocol import Message, ProtocolError, encode
from hvtsm.errors import ZoneError
from hvtsm.monitor.link.state import LinkState

log = logging.getLogger(__name__)


def connect_unix(path: str, *, timeout: float, zone_id: str | None) -> socket.socket:
    """Connect to the channel socket libvirt binds, retrying until it exists and accepts
    (QEMU makes it while the domain starts), for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(max(0.1, min(2.0, deadline - time.monotonic())))
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            left = deadline - time.monotonic()
            if left <= 0:
                raise ZoneError(
                    f"cannot connect to the guest agent channel {path} within "
                    f"{timeout:g} s: {e.strerror or e}", zone_id=zone_id,
                    hint="is the domain running, with a <channel type='unix'> bound to "
                         "this path and target name org.hvtsm.agent.0?") from None
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.5)
            continue
        log.debug("connected to %s", path)
        return sock


class Transport:
    """See the module docstring."""

    def __init__(self, sock: socket.socket, state: LinkState) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._state = state
        self._send_lock = threading.Lock()
        self._pipe_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    @property
    def fd(self) -> int:
        """The socket's descriptor, for the reader's poll."""
        return self._sock.fileno()

    @property
    def wake_fd(self) -> int:
        """Readable once the link is closed."""
        return self._wake_r

    # -- writing (any thread) --------------------------------------------------------------

    def send(self, msg: Message, timeout: float = 10.0) -> None:
        """Encode and write one message; ZoneError if it is invalid, the link is closed, or
        the guest does not read for `timeout` s."""
        try:
            data = encode(msg)
        except ProtocolError as e:
            raise self._state.error(f"refusing to send an invalid {msg.get('type')} "
                                    f"request: {e.detail}") from None
        self.write(data, timeout)

    def write(self, data: bytes, timeout: float = 10.0) -> None:
        """Write raw bytes (what `send` encoded; tests write junk with it)."""
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        with self._send_lock:
            while view:
                if self._state.closed:
                    raise self._state.closed_error()
                try:
                    view = view[self._sock.send(view):]
                    continue
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as e:
                    raise self._state.error(
                        f"cannot write to the guest agent channel: {e}") from e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._state.error(
                        f"the guest agent did not read its channel for {timeout:g} s",
                        hint="the guest may be frozen or overloaded")
                poller = select.poll()
                with contextlib.suppress(OSError, ValueError):
                    poller.register(self._sock, select.POLLOUT)
                    poller.poll(int(min(left, 0.5) * 1000) + 1)

    # -- reading (the reader thread) -------------------------------------------------------

    def recv(self, size: int) -> bytes | None:
        """Up to `size` bytes; b"" at the end of the stream, None when nothing waits.
        OSError when the channel failed."""
        try:
            return self._sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return None

    # -- ending ----------------------------------------------------------------------------

    def end(self, reason: str | None = None) -> None:
        """The link ended: wake the reader and stop the socket both ways (a LinkState
        close hook)."""
        with self._pipe_lock:
            if self._wake_w >= 0:  # the reader closes it (under the lock) when it ends
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"x")
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def release(self) -> None:
        """Close the socket and the pipe: the reader's last act."""
        with self._pipe_lock:
            with contextlib.suppress(OSError):
                self._sock.close()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_r = self._wake_w = -1
