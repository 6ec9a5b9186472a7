"""The link's reader thread: it reads and decodes everything the agent sends, within the
flood budgets, hands each item to the dispatcher, and runs the heartbeat watchdog.

It fails closed: nothing it reads can crash or block it (a failure of its own ends the
link, reported as disconnected), and its memory is bounded (one unfinished line of at most
MAX_MESSAGE_BYTES, decoded FEED_CHUNK bytes at a time). It measures its own stalls (a poll
that woke late, an iteration that took long) for the watchdog, and reads what waits in the
socket before the watchdog calls the agent silent (see `watchdog`).
"""

from __future__ import annotations

import logging
import math
import select
import threading
import time
from collections.abc import Callable
from typing import Protocol

from guest_agent.protocol import AGENT_TYPES, Decoder, Item
from hvtsm.monitor.link.flood import FloodControl, Mode
from hvtsm.monitor.link.limits import DISCARD_CHUNK, DRAIN_READS, FEED_CHUNK, READ_CHUNK
from hvtsm.monitor.link.problems import ProblemLog
from hvtsm.monitor.link.state import LinkState
from hvtsm.monitor.link.transport import Transport
from hvtsm.monitor.link.watchdog import Watchdog

log = logging.getLogger(__name__)


class Poller(Protocol):
    """What the reader needs of `select.poll()`."""

    def register(self, fd: int, eventmask: int = ..., /) -> None: ...

    def unregister(self, fd: int, /) -> None: ...

    def poll(self, timeout: float | None = ..., /) -> list[tuple[int, int]]: ...


#: makes the reader's poller: the seam where tests starve the reader (a poll that wakes late)
new_poller: Callable[[], Poller] = select.poll


class Dispatch(Protocol):
    """Where decoded items go (`messages.Dispatcher`)."""

    def handle_safely(self, item: Item, read_at: float) -> None: ...

    def ask_state(self) -> None: ...


class Reader:
    """One thread per link; see the module docstring."""

    def __init__(self, *, state: LinkState, transport: Transport, flood: FloodControl,
                 watchdog: Watchdog, problems: ProblemLog, dispatch: Dispatch,
                 name: str) -> None:
        self._state = state
        self._transport = transport
        self._flood = flood
        self._watchdog = watchdog
        self._problems = problems
        self._dispatch = dispatch
        self._decoder = Decoder(AGENT_TYPES)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        """Wait for the reader to end (not from the reader itself: a handler may close)."""
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # a bug here must not leave the link silently dead
            log.exception("agent link reader of zone %s failed", self._state.zone_id)
            self._lose(f"the link's reader failed: {e}")
        finally:
            self._problems.flush(math.inf)  # what was counted gets reported, even at the end
            self._transport.release()

    def _loop(self) -> None:
        poller = new_poller()
        wake = self._transport.wake_fd
        poller.register(wake, select.POLLIN)
        reading = False
        while not self._state.closed:
            now = time.monotonic()
            paused = self._flood.paused_ms(now)
            # while paused the socket is left out of the poll (an EOF would make it ready at
            # once and for ever): what waits in it is read afterwards
            if paused is None and not reading:
                poller.register(self._transport.fd, select.POLLIN)
                reading = True
                self._watchdog.resumed(now)
            elif paused is not None and reading:
                poller.unregister(self._transport.fd)
                reading = False
            timeout = self._watchdog.timeout_ms(now, self._state.hello)
            if paused is not None:
                timeout = min(timeout, paused)
            began = time.monotonic()
            try:
                events = poller.poll(timeout)
            except InterruptedError:
                continue
            woke = time.monotonic()
            # a poll that woke much later than it asked: the reader was not running
            self._watchdog.excuse(began + timeout / 1000, woke, self._state.hello)
            for fd, _ in events:
                if fd == wake:
                    return
                self._read_once()
            done = time.monotonic()
            # an iteration that took long (a slow handler): the reader did not look meanwhile
            self._watchdog.excuse(woke, done, self._state.hello)
            self._tick(done)

    def _read_once(self) -> bool:
        """Read and handle what waits in the socket (one chunk); whether there was any."""
        # discarding costs a syscall per read: take big bites of a flood
        size = DISCARD_CHUNK if self._flood.mode is Mode.DISCARD else READ_CHUNK
        try:
            data = self._transport.recv(size)
        except OSError as e:
            self._lose(f"reading the channel failed: {e}")
            return False
        if data is None:
            return False
        now = time.monotonic()
        if not data:
            for item in self._decoder.close():
                self._dispatch.handle_safely(item, now)
            self._lose("the guest agent channel closed (the domain stopped, or QEMU closed "
                       "the channel)")
            return False
        self._state.count_bytes(len(data))
        self._roll(now)
        admission = self._flood.admit(data, now, mid_line=bool(self._decoder.buffered))
        if admission.flood is not None:
            self._problems.problem("flood", admission.flood)
        keep = admission.keep
        # fed in slices: the items of one slice (a ProtocolError per junk line) are what
        # the reader holds at once, whatever the limits are set to
        for start in range(0, len(keep), FEED_CHUNK):
            for item in self._decoder.feed(keep[start:start + FEED_CHUNK]):
                self._dispatch.handle_safely(item, now)
        if admission.cut:  # the decoder's unfinished line goes on in the discarded bytes
            self._decoder = Decoder(AGENT_TYPES)
        return True

    def _roll(self, now: float) -> None:
        ended = self._flood.roll(now)
        if ended is Mode.DISCARD:
            self._dispatch.ask_state()
        elif ended is Mode.PAUSE:
            self._watchdog.resumed(now)  # before the watchdog looks: the pause was no silence

    def _tick(self, now: float) -> None:
        """The once-per-iteration work: a new flood window, the problem sums that are due,
        and the watchdog."""
        self._roll(now)
        self._problems.flush(now)
        if self._flood.paused:  # a pause of ours is no silence of the agent's
            return
        if self._watchdog.silence(now, self._state.hello) is None:
            return
        # a heartbeat that arrived but was not read yet is no silence: read what waits
        # first (up to the first message, or DRAIN_READS chunks of junk)
        heard = self._watchdog.last
        for _ in range(DRAIN_READS):
            if self._flood.paused or not self._read_once() \
                    or self._state.closed or self._watchdog.last != heard:
                break
        if self._state.closed or self._flood.paused:
            return
        silence = self._watchdog.silence(time.monotonic(), self._state.hello)
        if silence is not None:
            self._watchdog.declare()
            self._problems.problem("heartbeat_lost", silence.detail)

    def _lose(self, reason: str) -> None:
        if self._state.close(reason):
            self._problems.problem("disconnected", reason)
