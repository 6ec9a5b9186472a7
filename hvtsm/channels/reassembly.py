"""Putting a zone's ``channel_send`` pieces back together, within bounds a hostile agent
cannot stretch: a message is admitted (by the broker: grant, size, rate, receiver) at its
first piece, before any byte is kept; only an admitted message is buffered, never beyond its
declared size, which the grant's max_message bounds; a refused one is only hashed as it
streams past (its digest is still audited). At most MAX_UNFINISHED messages are buffered at
once (MAX_BUFFERED bytes declared in all), at most MAX_DISCARDING are streaming past, and
one whose pieces stop coming is given up after TIMEOUT. Pieces out of order, of a message
never begun, beyond the declared size, not base64 or begun twice are *faults*: the link
counts them as malformed messages, and the message they belong to is refused. Pure logic
and no locks: one reassembler per sender, called from its link's reader thread (and the
broker's janitor, under the broker's lock).
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from guest_agent.protocol import Message

MAX_UNFINISHED = 4
MAX_BUFFERED = 32 * 1024 * 1024
MAX_DISCARDING = 64
#: seconds a message may go without a piece before it is given up
TIMEOUT = 30.0
#: ids of messages given up whose later pieces are skipped quietly
DEAD_KEPT = 256

#: (receiver, declared size) -> (ticket, refusal): the broker's admission of a new message;
#: the ticket (its reservation) comes back in the message's Finished
Admit = Callable[[str, int], tuple[Any, str | None]]


@dataclass
class Finished:
    """A message that will get no more pieces: complete, refused, or given up."""

    msg_id: str
    to: str
    size: int
    received: int
    #: sha256 (hex) of the whole message, when all its bytes came
    digest: str | None
    #: the bytes, when the message was admitted and complete
    data: bytes | None
    #: why it is refused (None: complete and admitted)
    refusal: str | None
    #: what was malformed about it (the link counts it), if anything
    fault: str | None = None
    ticket: Any = None


@dataclass
class _Partial:
    to: str
    size: int
    ticket: Any
    refusal: str | None
    last: float
    received: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)
    #: None while discarding (refused at its first piece)
    buf: bytearray | None = None


def _decoded_len(text: str) -> int:
    return len(text) // 4 * 3 - text[-2:].count("=") if text else 0


class Reassembler:
    def __init__(self, *, max_unfinished: int = MAX_UNFINISHED,
                 max_buffered: int = MAX_BUFFERED, max_discarding: int = MAX_DISCARDING,
                 timeout: float = TIMEOUT) -> None:
        self.max_unfinished = max_unfinished
        self.max_buffered = max_buffered
        self.max_discarding = max_discarding
        self.timeout = timeout
        self._partials: dict[str, _Partial] = {}
        self._dead: collections.OrderedDict[str, None] = collections.OrderedDict()

    @property
    def buffered(self) -> int:
        """Bytes declared by the messages being buffered (what they may grow to)."""
        return sum(p.size for p in self._partials.values() if p.buf is not None)

    @property
    def unfinished(self) -> int:
        return len(self._partials)

    def piece(self, msg: Message, admit: Admit, now: float) -> list[Finished]:
        """One validated ``channel_send`` message."""
        mid, to, size, offset = msg["id"], msg["to"], msg["size"], msg["offset"]
        text: str = msg["data"]
        cancel = bool(msg.get("cancel"))
        if mid in self._dead:
            if cancel or offset + _decoded_len(text) >= size:
                del self._dead[mid]  # its last piece: later ones with this id are new
            return []
        part = self._partials.get(mid)
        if part is None:
            if offset != 0:
                self._bury(mid, cancel or offset + _decoded_len(text) >= size)
                fault = f"a piece at offset {offset} of message {mid}, which never began"
                return [Finished(mid, to, size, 0, None, None, f"malformed: {fault}", fault)]
            if cancel:
                ticket, refusal = admit(to, size)
                return [Finished(mid, to, size, 0, None, None,
                                 refusal or "the sender cancelled the message", None, ticket)]
            started = self._begin(mid, to, size, admit, now)
            if isinstance(started, Finished):
                return [started]
            part = started
        elif offset == 0 and part.received:
            return [self._fail(mid, part, f"message {mid} began a second time", last=False)]
        if (part.to, part.size) != (to, size):
            return [self._fail(mid, part, f"a piece of message {mid} names another receiver "
                                          "or size than its first", last=False)]
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return [self._fail(mid, part, f"a piece of message {mid} is not base64",
                               last=cancel or offset + _decoded_len(text) >= size)]
        if offset != part.received:
            return [self._fail(mid, part, f"a piece of message {mid} at offset {offset}, "
                                          f"expected {part.received} (out of order)",
                               last=False)]
        if part.received + len(data) > size:
            return [self._fail(mid, part, f"message {mid} goes beyond its declared size of "
                                          f"{size} bytes", last=True)]
        if not data and size and not cancel:
            return [self._fail(mid, part, f"an empty piece of message {mid}", last=False)]
        part.hasher.update(data)
        if part.buf is not None:
            part.buf += data
        part.received += len(data)
        part.last = now
        if cancel:
            del self._partials[mid]
            return [Finished(mid, to, size, part.received, None, None,
                             part.refusal or "the sender cancelled the message", None,
                             part.ticket)]
        if part.received < size:
            return []
        del self._partials[mid]
        return [Finished(mid, to, size, size, part.hasher.hexdigest(),
                         bytes(part.buf) if part.buf is not None and part.refusal is None
                         else None, part.refusal, None, part.ticket)]

    def _begin(self, mid: str, to: str, size: int, admit: Admit,
               now: float) -> _Partial | Finished:
        buffering = sum(1 for p in self._partials.values() if p.buf is not None)
        discarding = len(self._partials) - buffering
        ticket, refusal = None, None
        if buffering >= self.max_unfinished or self.buffered + size > self.max_buffered:
            refusal = (f"too many unfinished messages from this zone ({buffering} of at most "
                       f"{self.max_unfinished}, {self.buffered} bytes declared)")
        else:
            ticket, refusal = admit(to, size)
        if refusal is not None and discarding >= self.max_discarding:
            fault = f"{discarding} refused messages still streaming in: message {mid} dropped"
            self._bury(mid, size == 0)
            return Finished(mid, to, size, 0, None, None, f"malformed: {fault}", fault, ticket)
        part = _Partial(to, size, ticket, refusal, now,
                        buf=bytearray() if refusal is None else None)
        self._partials[mid] = part
        return part

    def _fail(self, mid: str, part: _Partial, fault: str, *, last: bool) -> Finished:
        """Give up `part` for a fault; its later pieces are skipped (unless this was its
        last)."""
        del self._partials[mid]
        self._bury(mid, last)
        return Finished(mid, part.to, part.size, part.received, None, None,
                        f"malformed: {fault}", fault, part.ticket)

    def _bury(self, mid: str, last: bool) -> None:
        if last:
            return
        self._dead[mid] = None
        while len(self._dead) > DEAD_KEPT:
            self._dead.popitem(last=False)

    def expire(self, now: float) -> list[Finished]:
        """Messages whose pieces stopped coming TIMEOUT ago."""
        out = []
        for mid, part in list(self._partials.items()):
            if now - part.last > self.timeout:
                out.append(self._fail(mid, part, (
                    f"message {mid} never finished ({part.received} of {part.size} bytes, "
                    f"nothing for {now - part.last:.0f} s)"), last=False))
        return out

    def drop_all(self, reason: str) -> list[Finished]:
        """Every unfinished message, refused for `reason` (the sender ended)."""
        out = [Finished(mid, p.to, p.size, p.received, None, None, reason, None, p.ticket)
               for mid, p in self._partials.items()]
        self._partials.clear()
        return out
