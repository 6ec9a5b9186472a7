"""The agent's outgoing messages waiting for the writer (writer.py), in three lanes.

*urgent* (hello answers, heartbeats, started, probe and admin results, errors, monitor
events) always goes first; *normal* (output, exit) keeps its order, so a workload's
``exit`` follows its last ``output``; *channel* (the workload's messages to other zones,
acknowledgements) takes turns with normal, holds at most CHANNEL_QUEUE bytes (a sending
client waits for room) and is paced to CHANNEL_LINES_PER_S, below the host's own budget
for channel lines, so a busy channel never makes the host discard anything else.

While the host is absent nothing is taken out: control messages queue (at most MAX_QUEUED;
beyond that they are discarded, and the writer skips their seq numbers so the host sees
the gap), and workload output queues up to OUTPUT_QUEUE bytes, after which the output
pumps wait (their workload blocks on its full pipe: output is never discarded). One unsent
heartbeat stands for any number of them.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from guest_agent.protocol import Message
from guest_agent.rates import RateWindow

log = logging.getLogger("guest_agent")

MAX_QUEUED = 10000
OUTPUT_QUEUE = 1 << 20
CHANNEL_QUEUE = 2 << 20
#: channel lines written per second at most (the host's reader allows twice as many)
CHANNEL_LINES_PER_S = 2000

URGENT = 0
NORMAL = 1
CHANNEL = 2
Lane = collections.deque[tuple[Message, int]]


def _beat(msg: Message) -> bool:
    """A periodic heartbeat (not the answer to a ping)."""
    return msg.get("type") == "heartbeat" and "id" not in msg


class Outbox:
    """See the module docstring."""

    def __init__(self, output_limit: int = OUTPUT_QUEUE, max_items: int = MAX_QUEUED,
                 channel_limit: int = CHANNEL_QUEUE,
                 channel_lines_per_s: int = CHANNEL_LINES_PER_S) -> None:
        self.output_limit = output_limit
        self.max_items = max_items
        self.channel_limit = channel_limit
        self._cond = threading.Condition()
        #: (urgent, normal, channel) lanes of (message, bytes it accounts for)
        self._lanes: tuple[Lane, Lane, Lane] = (collections.deque(), collections.deque(),
                                                collections.deque())
        self.output_bytes = 0
        self.channel_bytes = 0
        #: normal and channel take turns: the one served last waits
        self._last_shared = CHANNEL
        #: the channel lines of the current second
        self._paced = RateWindow(1.0, channel_lines_per_s, fixed=True)
        #: messages discarded since the agent started
        self.dropped = 0
        #: of those, how many no seq number has been skipped for yet
        self.gap = 0
        self.heartbeat_waiting = False
        self.closed = False

    @property
    def channel_lines_per_s(self) -> float:
        return self._paced.limit

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes)

    def put(self, msg: Message, lane: int = URGENT) -> bool:
        """Queue a control message; False (and counted) if the queue is full."""
        with self._cond:
            if len(self) >= self.max_items:
                self.dropped += 1
                self.gap += 1
                log.warning("outbox full: discarded a %s message", msg.get("type"))
                return False
            if _beat(msg):
                if self.heartbeat_waiting:
                    return True  # one unsent heartbeat is as good as two
                self.heartbeat_waiting = True
            self._lanes[lane].append((msg, 0))
            self._cond.notify_all()
            return True

    def put_output(self, msg: Message, size: int, stop: threading.Event) -> bool:
        """Queue workload output, waiting while OUTPUT_QUEUE bytes are already queued."""
        with self._cond:
            while self.output_bytes >= self.output_limit and not (self.closed or stop.is_set()):
                self._cond.wait(0.5)
            if self.closed or stop.is_set():
                return False
            self._lanes[NORMAL].append((msg, size))
            self.output_bytes += size
            self._cond.notify_all()
            return True

    def put_channel(self, msg: Message, size: int, stop: threading.Event) -> bool:
        """Queue a channel message, waiting while CHANNEL_QUEUE bytes are already queued
        (the client's bytes stay in its socket meanwhile). Channel messages never count
        against MAX_QUEUED: a busy channel must not make control messages be discarded."""
        with self._cond:
            while self.channel_bytes >= self.channel_limit and not (self.closed
                                                                     or stop.is_set()):
                self._cond.wait(0.5)
            if self.closed or stop.is_set():
                return False
            self._lanes[CHANNEL].append((msg, size))
            self.channel_bytes += size
            self._cond.notify_all()
            return True

    def get(self, timeout: float) -> tuple[int, Message, int] | None:
        """(lane, message, bytes) of the next message to write, or None after `timeout`."""
        with self._cond:
            if not len(self):
                self._cond.wait(timeout)
            shared = (NORMAL, CHANNEL) if self._last_shared == CHANNEL else (CHANNEL, NORMAL)
            for lane in (URGENT, *shared):
                if not self._lanes[lane]:
                    continue
                if lane == CHANNEL and not self._paced.admit(time.monotonic()):
                    continue
                if lane != URGENT:
                    self._last_shared = lane
                msg, size = self._lanes[lane].popleft()
                if _beat(msg):
                    self.heartbeat_waiting = False
                if size:
                    if lane == CHANNEL:
                        self.channel_bytes -= size
                    else:
                        self.output_bytes -= size
                    self._cond.notify_all()
                return lane, msg, size
            if self._lanes[CHANNEL] and not self._lanes[URGENT] and not self._lanes[NORMAL]:
                self._cond.wait(min(timeout, 0.05))  # paced: do not spin
            return None

    def put_back(self, lane: int, msg: Message, size: int) -> None:
        """A message the writer could not send goes back to the head of its lane."""
        with self._cond:
            self._lanes[lane].appendleft((msg, size))
            if lane == CHANNEL:
                self.channel_bytes += size
            else:
                self.output_bytes += size

    def pending_gap(self) -> int:
        """Discarded messages whose seq numbers the writer has not skipped yet."""
        with self._cond:
            return self.gap

    def gap_skipped(self, count: int) -> None:
        """The writer skipped `count` seq numbers for discarded messages."""
        with self._cond:
            self.gap -= count

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


__all__ = ["CHANNEL", "CHANNEL_LINES_PER_S", "CHANNEL_QUEUE", "MAX_QUEUED", "NORMAL",
           "OUTPUT_QUEUE", "URGENT", "Outbox"]
