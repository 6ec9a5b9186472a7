"""The heartbeat watchdog: silence longer than HEARTBEAT_MISSES heartbeat periods (the
grace) is `heartbeat_lost`, reported once until the agent speaks again.

Silence is judged by what the agent could have sent, not by how long the reader did not
look. Time the reader itself was away is no silence of the agent's: a pause of its own
(flood control), a poll that woke up much later than it asked (the controller starved: 50
runs on two cores), an iteration that took long (a slow handler). After each, the agent
gets a fresh grace from the moment the reader could look again (`resumed`). And before
the watchdog calls the agent silent, the reader reads what waits in the socket: a
heartbeat that arrived but was not read yet is no silence either.

A stall counts as the reader's once it passes one heartbeat period (grace / MISSES): a
punctual agent's true silence stays under one period, a stall not excused under another,
and the two together stay within the grace of three, so an agent that keeps its period
is never reported; a silent one is reported within the grace of the reader's last look.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hvtsm.monitor.link.hello import Hello
from hvtsm.monitor.link.limits import HEARTBEAT_MISSES, MAX_HEARTBEAT


@dataclass(frozen=True)
class Silence:
    """The agent said nothing for `seconds`, beyond its `grace`."""

    seconds: float
    grace: float

    @property
    def detail(self) -> str:
        return (f"no message from the guest agent for {self.seconds:.1f} s "
                f"(allowed {self.grace:g} s)")


def grace_for(explicit: float | None, hello: Hello | None) -> float | None:
    """Seconds of silence allowed: `explicit` if given, else HEARTBEAT_MISSES of the
    periods the agent's hello names (None before any hello: nothing is judged yet)."""
    if explicit is not None:
        return explicit
    if hello is None:
        return None
    # an agent that names no period is still watched: silence is never fine for ever
    return HEARTBEAT_MISSES * (hello.heartbeat or MAX_HEARTBEAT)


class Watchdog:
    """The reader thread's alone; others only read `last` and `lost`."""

    def __init__(self, grace: float | None = None) -> None:
        #: seconds of silence allowed (None: HEARTBEAT_MISSES of the agent's periods)
        self.explicit_grace = grace
        #: time.monotonic() of the last valid message (None: none yet)
        self.last: float | None = None
        #: since when the reader looks again after a pause or a stall of its own
        self.looking_since = -math.inf
        self.lost = False

    def grace(self, hello: Hello | None) -> float | None:
        return grace_for(self.explicit_grace, hello)

    def heard(self, now: float) -> bool:
        """A valid message arrived at `now`; whether the agent had been reported lost."""
        self.last = now
        was, self.lost = self.lost, False
        return was

    def resumed(self, now: float) -> None:
        """The reader looks again at `now` after time away of its own."""
        self.looking_since = max(self.looking_since, now)

    def excuse(self, meant: float, looked: float, hello: Hello | None) -> bool:
        """The reader meant to look at `meant` and looked at `looked`: a delay longer than
        one heartbeat period was the reader's (see the module docstring), and the agent
        gets a fresh grace from `looked`. Whether it did."""
        grace = self.grace(hello)
        if grace is None or looked - meant <= grace / HEARTBEAT_MISSES:
            return False
        self.resumed(looked)
        return True

    def timeout_ms(self, now: float, hello: Hello | None) -> int:
        """How long the reader may wait for input before the watchdog must look."""
        grace = self.grace(hello)
        if grace is None or self.last is None or self.lost:
            return 1000
        left_ms = (max(self.last, self.looking_since) + grace - now) * 1000 + 1
        return max(10, int(min(1000.0, left_ms)))  # min first: int(inf) raises

    def silence(self, now: float, hello: Hello | None) -> Silence | None:
        """The agent's silence at `now`, if longer than its grace and not reported yet."""
        grace = self.grace(hello)
        if grace is None or self.last is None or self.lost:
            return None
        silent = now - max(self.last, self.looking_since)
        return Silence(silent, grace) if silent > grace else None

    def declare(self) -> None:
        """heartbeat_lost was reported: not again until the agent speaks."""
        self.lost = True
