"""One poll loop over file descriptors (the monitor's ``monitor-poll`` thread): handlers
per fd, a queue of operations other threads hand to the loop (`call_soon`, which wakes it
through a pipe), and a hook run after every turn. A handler or an operation that raises is
reported and the loop goes on: one bad event must not stop the answers to every other.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import threading
from typing import Callable

Handler = Callable[[int], None]


class PollLoop:
    def __init__(self, failed: Callable[[str], None]) -> None:
        #: called (with what failed) while the exception is being handled
        self._failed = failed
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._handlers: dict[int, Handler] = {}
        self._poller = select.poll()
        self._ops: collections.deque[Callable[[], None]] = collections.deque()
        self.closed = threading.Event()
        self.register(self._wake_r, self._drain_wake)

    def register(self, fd: int, handler: Handler) -> None:
        self._handlers[fd] = handler
        self._poller.register(fd, select.POLLIN)

    def unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._poller.unregister(fd)

    def call_soon(self, op: Callable[[], None]) -> None:
        """Run `op` on the loop's thread, before it next waits."""
        self._ops.append(op)
        self.wake()

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _drain_wake(self, _ev: int) -> None:
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 4096)

    def run(self, timeout_ms: Callable[[], int], after: Callable[[], None]) -> None:
        """Until `close`: wait at most `timeout_ms()` for events, handle them, `after()`."""
        while not self.closed.is_set():
            while self._ops:
                op = self._ops.popleft()
                try:
                    op()
                except Exception:
                    self._failed("monitor operation")
            try:
                ready = self._poller.poll(timeout_ms())
            except InterruptedError:
                continue
            for fd, ev in ready:
                handler = self._handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler(ev)
                except Exception:
                    self._failed("monitor handler")
            try:
                after()
            except Exception:
                self._failed("monitor turn")

    def close(self) -> None:
        """Stop the loop (its thread returns at its next turn)."""
        self.closed.set()
        self.wake()

    def release(self) -> None:
        """Close the wake pipe, once the loop's thread has returned."""
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


__all__ = ["Handler", "PollLoop"]
