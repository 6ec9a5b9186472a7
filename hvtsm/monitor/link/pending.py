"""Requests waiting for the agent's answer, matched by id.

A request expects one message type (or an `error`); any other type that carries its id
answers it with an error, so a caller never reads fields its reply lacks. Once the link
ends every waiting request fails, and no new one is taken.
"""

from __future__ import annotations

import threading

from guest_agent.protocol import Message


class Pending:
    """One request waiting for its answer: `expect` (or an `error`)."""

    def __init__(self, expect: str) -> None:
        self.expect = expect
        self.done = threading.Event()
        self.reply: Message | None = None
        self.error: str | None = None

    def answer(self, reply: Message | None = None, error: str | None = None) -> None:
        if not self.done.is_set():
            self.reply, self.error = reply, error
            self.done.set()

    def mismatch(self, mtype: str) -> str | None:
        """Why a reply of type `mtype` cannot answer this request (None: it can)."""
        if mtype in ("error", self.expect):
            return None
        return (f"the guest agent answered with a {mtype} message instead of a "
                f"{self.expect}")


class Refused(Exception):
    """A request the table cannot take (the text says why)."""


class PendingTable:
    """Thread-safe: callers add and forget requests, the reader answers them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, Pending] = {}
        self._closed = False

    def add(self, key: str, expect: str) -> Pending:
        """Refused when the link ended, or when `key` already waits (a caller's workload id
        may look like a request's)."""
        pending = Pending(expect)
        with self._lock:
            if self._closed:
                raise Refused("closed")
            if key in self._pending:
                raise Refused(f"request id {key} is already waiting for an answer")
            self._pending[key] = pending
        return pending

    def forget(self, key: str) -> None:
        with self._lock:
            self._pending.pop(key, None)

    def waiting(self, key: str) -> Pending | None:
        """The request `key`, if one still waits for its answer."""
        with self._lock:
            pending = self._pending.get(key)
        return None if pending is None or pending.done.is_set() else pending

    def close(self, reason: str | None = None) -> None:
        """The link ended (`reason`: why, None: the controller closed it): fail every
        waiting request, and take no new one (a LinkState close hook)."""
        why = reason or "the link was closed by the controller"
        with self._lock:
            self._closed = True
            pending = list(self._pending.values())
            self._pending.clear()
        for p in pending:
            p.answer(error=f"the guest agent link ended: {why}")
