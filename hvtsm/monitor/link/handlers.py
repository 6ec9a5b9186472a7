"""What the link calls back with, on its reader thread (keep them quick; an exception they
raise is logged and contained)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from guest_agent.protocol import Message

#: (kind, detail): malformed, oversized, seq_gap, seq_regress, heartbeat_lost, agent_restart,
#: agent_error, output_dropped, flood, events_dropped, disconnected (the package docstring
#: says what each means)
ProblemHandler = Callable[[str, str], None]
EventHandler = Callable[[Message], None]
#: a validated channel_send or channel_ack message; raises ChannelFault for one it cannot use
ChannelHandler = Callable[[Message], None]


class ChannelFault(Exception):
    """A channel message that cannot be used (the link counts it as malformed)."""


class Handlers(Protocol):
    """Who holds the handlers: the link, whose callers may replace them at any time (each
    is looked up when it is called)."""

    on_problem: ProblemHandler | None
    on_event: EventHandler | None
    on_channel: ChannelHandler | None
