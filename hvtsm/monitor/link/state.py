"""What one link knows of itself: the agent's hello, whether it ended and why, what it
received so far (for errors that say what was seen), and the ids of its requests.

Ending is told once to whoever registered with `when_closed` (the transport, the waiting
requests, the workloads), in that order, whichever thread ends it.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

from guest_agent.protocol import PROTOCOL_VERSION
from hvtsm.errors import ZoneError
from hvtsm.monitor.link.checks import clip, short
from hvtsm.monitor.link.hello import Hello

#: told the reason the link ended (None: closed by the controller)
CloseHook = Callable[[str | None], None]


class LinkState:
    """Thread-safe: the reader records, callers read and wait."""

    def __init__(self, zone_id: str | None, describe: str) -> None:
        self.zone_id = zone_id
        self.describe = describe
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._hello: Hello | None = None
        self._closed = False
        self._lost_reason: str | None = None
        self._bytes_in = 0
        self._messages = 0
        self._malformed = 0
        self._last_seen = "nothing"
        self._on_close: list[CloseHook] = []

    @property
    def hello(self) -> Hello | None:
        return self._hello

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def lost_reason(self) -> str | None:
        return self._lost_reason

    @property
    def bytes_in(self) -> int:
        return self._bytes_in

    @property
    def messages(self) -> int:
        return self._messages

    @property
    def malformed(self) -> int:
        return self._malformed

    def new_id(self, prefix: str) -> str:
        """A request or workload id no other of this link has (one counter for all)."""
        return f"{prefix}{next(self._ids)}"

    # -- errors that name the zone and say what was seen -----------------------------------

    def error(self, message: str, hint: str | None = None) -> ZoneError:
        return ZoneError(message, zone_id=self.zone_id, hint=hint)

    def closed_error(self) -> ZoneError:
        return self.error(f"the guest agent link is closed "
                          f"({self._lost_reason or 'closed by the controller'})")

    def seen(self) -> str:
        with self._lock:
            if not self._bytes_in:
                return "nothing at all was received"
            return (f"received {self._bytes_in} bytes: {self._messages} messages, "
                    f"{self._malformed} malformed; last: {self._last_seen}")

    # -- recorded by the reader ------------------------------------------------------------

    def count_bytes(self, n: int) -> None:
        with self._lock:
            self._bytes_in += n

    def count_message(self, mtype: str, seq: int) -> None:
        with self._lock:
            self._messages += 1
            self._last_seen = f"{mtype} seq {seq}"

    def count_bad(self, what: str) -> None:
        """A line that was no message (`what`: "a bad line (...)"), or a message whose
        content cannot be true."""
        with self._lock:
            self._malformed += 1
            self._last_seen = what

    def count_implausible(self, detail: str) -> None:
        self.count_bad(f"a bad message ({clip(detail, 200)})")

    def set_hello(self, hello: Hello) -> bool:
        """Record the latest hello; whether it was the first."""
        with self._changed:
            first = self._hello is None
            self._hello = hello
            self._changed.notify_all()
        return first

    # -- waiting and ending ----------------------------------------------------------------

    def wait_hello(self, timeout: float) -> Hello:
        """The agent's hello (it may have arrived already). ZoneError when none comes within
        `timeout`, the link ends first, or the agent speaks another protocol version."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._hello is None and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            hello, reason = self._hello, self._lost_reason
        if hello is None:
            if self._closed:
                raise self.error(f"the guest agent channel {self.describe} closed before the "
                                 f"agent said hello ({reason or 'closed'}); {self.seen()}")
            raise self.error(
                f"no hello from the guest agent on {self.describe} within {timeout:g} s; "
                f"{self.seen()}",
                hint="did the guest boot and its init start the agent? read the guest console "
                     "(or another process holds the channel: QEMU serves one client at a time)")
        if hello.protocol != PROTOCOL_VERSION:
            raise self.error(
                f"the guest agent {short(hello.agent_version)} speaks protocol "
                f"{short(hello.protocol)}, this controller {PROTOCOL_VERSION}",
                hint="the guest runs another hvtsm's guest_agent: restage it from this one")
        return hello

    def when_closed(self, hook: CloseHook) -> None:
        self._on_close.append(hook)

    def close(self, reason: str | None) -> bool:
        """End the link (`reason`: why it ended on its own; None: the controller closed
        it). False if it had ended already: only the first ending is told."""
        with self._changed:
            if self._closed:
                return False
            self._closed = True
            self._lost_reason = reason
            self._changed.notify_all()
        for hook in self._on_close:
            hook(reason)
        return True
