"""Flood control: the work the reader does for one agent is bounded per second, whatever
the agent sends.

Four budgets share one fixed one-second window (`guest_agent.rates.RateWindow`s opened
together at the first look after the last window ended): lines, bytes, channel lines and
monitoring events. Too many lines (or channel lines) in a second: the rest of the second's
input is discarded unparsed (counting newlines costs next to nothing next to parsing, so a
flood of small messages is cut before any of it is decoded). Too many bytes: what was read
is parsed, then nothing is read for the rest of the second (the agent waits, nothing is
lost: the bytes are mostly big workload output, and a discarded line would be 64 KiB of it,
or an exit). Too many events: the rest of the second's events are dropped. Each flood is
reported once per second (the texts in `Admission.flood` and `EventVerdict.report`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from guest_agent.protocol import CHANNEL_LINE_PREFIX
from guest_agent.rates import RateWindow
from hvtsm.monitor.link.limits import Limits


class Mode(enum.Enum):
    """What the current second's flood does to input."""

    READ = "read"
    #: too many lines: the rest of the second's input is discarded unparsed
    DISCARD = "discard"
    #: too many bytes: nothing is read until the second is over
    PAUSE = "pause"


@dataclass(frozen=True)
class Admission:
    """What to do with the bytes of one read."""

    #: the part to parse
    keep: bytes
    #: discarding began inside the read: the decoder's unfinished line goes on in the
    #: discarded bytes, so it must be forgotten
    cut: bool = False
    #: a flood began: the detail of its problem report
    flood: str | None = None


@dataclass(frozen=True)
class EventVerdict:
    passed: bool
    #: the first event dropped this second: the detail of its problem report
    report: str | None = None


def whole_lines(data: bytes, max_lines: int) -> int:
    """Length of the longest start of `data` made of at most `max_lines` whole lines."""
    end = 0
    for _ in range(max(0, max_lines)):
        nl = data.find(b"\n", end)
        if nl < 0:
            break
        end = nl + 1
    return end


class FloodControl:
    """The reader thread's alone (no lock)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lines = RateWindow(1.0, fixed=True)
        self._bytes = RateWindow(1.0, fixed=True)
        self._channel = RateWindow(1.0, fixed=True)
        self._events = RateWindow(1.0, fixed=True)
        self.mode = Mode.READ
        self._events_over = False
        #: discarding stopped inside a line: what follows up to the next newline is its rest
        self._resync = False
        #: lines and bytes discarded unparsed, events dropped, on this link so far
        self.dropped_lines = 0
        self.dropped_bytes = 0
        self.events_dropped = 0

    @property
    def paused(self) -> bool:
        """Nothing is read until the second is over (too many bytes)."""
        return self.mode is Mode.PAUSE

    def roll(self, now: float) -> Mode | None:
        """Begin a new window once the current one is over. Returns the mode the window
        that ended was in, or None while the current one goes on."""
        if self._lines.started(now) is not None:
            return None
        ended = self.mode
        # the four open together, so they end together
        for window in (self._lines, self._bytes, self._channel, self._events):
            window.reset()
            window.add(now, 0)
        self.mode = Mode.READ
        self._events_over = False
        return ended

    def paused_ms(self, now: float) -> int | None:
        """Milliseconds left of a pause (too many bytes this second), or None."""
        if self.mode is not Mode.PAUSE:
            return None
        began = self._lines.started(now)
        left = -1.0 if began is None else began + 1.0 - now
        return int(left * 1000) + 1 if left > 0 else None

    def admit(self, data: bytes, now: float, *, mid_line: bool) -> Admission:
        """What of `data`, read at `now` (the window rolled then), to parse. `mid_line`: the
        decoder holds the start of an unfinished line, so `data` does not begin one."""
        if self.mode is Mode.DISCARD:
            self._discard(data)
            return Admission(b"")
        if self._resync:
            nl = data.find(b"\n")
            head = data if nl < 0 else data[:nl + 1]
            self._discard(head)
            data = data[len(head):]
        lines = data.count(b"\n")
        # channel lines have a budget of their own (a line that merely starts like one is
        # still parsed and judged as what it is)
        channel = data.count(b"\n" + CHANNEL_LINE_PREFIX) + (
            1 if data.startswith(CHANNEL_LINE_PREFIX) and not mid_line else 0)
        channel = min(channel, lines)
        lines -= channel
        total = int(self._bytes.add(now, len(data)))
        had_lines, had_channel = int(self._lines.count(now)), int(self._channel.count(now))
        limits = self.limits
        if had_lines + lines <= limits.flood_messages and \
                had_channel + channel <= limits.channel_lines_per_s:
            self._lines.add(now, lines)
            self._channel.add(now, channel)
            if total <= limits.flood_bytes:
                return Admission(data)
            self.mode = Mode.PAUSE
            return Admission(data, flood=self._flood(
                now, f"{had_lines + lines} lines and {total} bytes",
                "nothing more is read until the second is over"))
        seen = had_lines + lines
        if had_channel + channel > limits.channel_lines_per_s:
            seen += had_channel + channel
            cut = 0  # which lines were the channel's is unknown unparsed: none is kept
        else:
            cut = whole_lines(data, limits.flood_messages - had_lines)
        keep = data[:cut]
        self._lines.add(now, keep.count(b"\n"))
        self._discard(data[cut:])
        self.mode = Mode.DISCARD
        return Admission(keep, cut=True, flood=self._flood(
            now, f"{seen} lines and {total} bytes",
            f"the rest of the second's input is discarded unparsed "
            f"({self.dropped_lines} lines so far)"))

    def admit_event(self, read_at: float) -> EventVerdict:
        """Whether a monitoring event whose bytes were read at `read_at` may pass."""
        if self._events.add(read_at) <= self.limits.events_per_s:
            return EventVerdict(True)
        self.events_dropped += 1
        if self._events_over:
            return EventVerdict(False)
        self._events_over = True
        return EventVerdict(False, (
            f"more than {self.limits.events_per_s} monitoring events within one second: the "
            f"rest of this second's are dropped ({self.events_dropped} dropped so far on "
            "this link)"))

    def _flood(self, now: float, what: str, action: str) -> str:
        began = self._lines.started(now)
        took_ms = (now - began) * 1000 if began is not None else 0.0
        return (f"{what} from the guest agent within {took_ms:.0f} ms (limits per second: "
                f"{self.limits.flood_messages} lines, {self.limits.flood_bytes} bytes); "
                f"{action}")

    def _discard(self, data: bytes) -> None:
        if data:
            self.dropped_lines += data.count(b"\n")
            self.dropped_bytes += len(data)
            # where the discarded bytes stop inside a line, the next input begins with the
            # rest of it: that rest is junk, not a line of its own
            self._resync = not data.endswith(b"\n")
