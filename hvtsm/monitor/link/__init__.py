"""The host's end of the guest agent link: one unix stream socket per guest.

libvirt binds the socket of the domain's `<channel type='unix'>` (target name
`org.hvtsm.agent.0`); `AgentLink.connect` connects to it as a client, and the agent inside
the guest reads and writes the matching virtio-serial port. The wire protocol is
`guest_agent.protocol` (JSON lines), shared with the agent.

One reader thread per link decodes everything the agent sends, answers waiting requests
(matched by id), feeds workload output to its destinations and watches the agent's health:
malformed or oversized lines, gaps in `seq`, silence longer than 3 heartbeat periods and a
closed channel are each counted and reported through `on_problem(kind, detail)` (the
manager turns those into anomalies). Every wait is bounded and every failure a `ZoneError`
naming the zone.

The agent is hostile until proven otherwise (a compromised guest writes what it likes to
the channel), so the reader fails closed: nothing it reads can crash or block it, and its
memory is bounded (one unfinished line of at most MAX_MESSAGE_BYTES, bounded lists).
Valid-looking messages with implausible values (a seq beyond 2**63, an infinite heartbeat
period, an impossible pid or exit status, a reply of the wrong type to a request) are
reported as malformed and never trusted. Work is bounded per second, whatever the agent
sends: beyond FLOOD_MESSAGES lines the rest of that second's input is discarded unparsed
(`flood_dropped`; a hello asked for afterwards tells whose exit was among it, see
`RemoteWorkload.exit_lost`); beyond FLOOD_BYTES nothing more is read that second (big lines
are mostly workload output, which the agent then holds back: nothing is lost); beyond
EVENTS_PER_S monitoring events the rest of that second's events are dropped
(`events_dropped`); and each problem kind is reported at most PROBLEMS_PER_S times a second,
the rest counted (`problems`) and summed up in one report when the second is over.

Problem kinds (`ProblemHandler`):
    malformed       a line that is not a valid agent message (not UTF-8, not JSON, unknown
                    type, a field missing or of the wrong type) or a valid one with a value
                    that cannot be true (see above)
    oversized       a line longer than MAX_MESSAGE_BYTES (discarded up to its newline)
    seq_gap         messages the agent numbered never arrived (dropped, or discarded here)
    seq_regress     a seq not above the one before
    heartbeat_lost  silence longer than HEARTBEAT_MISSES heartbeat periods (the reader's
                    own stalls and pauses are no silence: see below)
    agent_restart   a new hello whose seq went back: the agent process restarted
    agent_error     the agent reported an error not tied to a waiting request
    output_dropped  a workload stream's reader fell SINK_LIMIT bytes behind
    flood           more than FLOOD_MESSAGES lines or FLOOD_BYTES bytes within one second
                    (reported once per second while it lasts), and exits found discarded
    events_dropped  more than EVENTS_PER_S events within one second (once per second)
    disconnected    the channel closed, failed, or the reader itself failed

Channel lines (``channel_send``, ``channel_ack``: a zone's messages to other zones) have
their own budget: they are counted apart from the others before parsing (they begin with
CHANNEL_LINE_PREFIX), and only more than CHANNEL_LINES_PER_S of them makes a flood, so a
busy channel never gets monitoring events discarded and a flood of events never starves a
channel. They go to `on_channel` (the broker); one it cannot use (`ChannelFault`: a piece
out of order, not base64, ...) is a malformed message, as is a channel line on a link with
no `on_channel`. `channel_deliver` and `channel_verdict` send the broker's side.

on_problem, on_event and on_channel run on the reader thread (keep them quick); an exception
they raise is logged and contained.

Workload output never blocks the reader: each destination (a pipe the caller reads, or a
file descriptor such as the CLI's own stdout) gets its own writer thread, with at most
`SINK_LIMIT` bytes waiting; beyond that output is dropped, counted and reported.

The heartbeat watchdog judges silence by what the agent could have sent: before it reports
heartbeat_lost it reads what waits in the socket, and time the reader itself was away (a
pause of its own, a poll that woke up late because the controller was starved, a slow
handler) is no silence of the agent's: the agent gets a fresh grace from the reader's next
look (see `watchdog`).

The budgets (FLOOD_MESSAGES, FLOOD_BYTES, EVENTS_PER_S, CHANNEL_LINES_PER_S, PROBLEMS_PER_S,
UNCLAIMED_KEEP) are taken when a link is made, from the constructor's keywords or else from
these constants as they stand then (`AgentLink.limits` shows them).

The package, one job a module (`AgentLink` in agent_link.py is the facade over them):
    limits      the constants above, and `Limits`, one link's budgets
    checks      which of the agent's values to believe (pids, seqs, statuses, times, periods)
    hello       `Hello`, what the agent says about itself
    handlers    the callback types, `ChannelFault`
    state       the link's hello, ending and counters; errors that say what was seen
    transport   the socket, the writes, the reader's wake pipe
    reader      the reader thread: reading, decoding, and when the watchdog looks
    flood       the per-second budgets of lines, bytes, channel lines and events
    problems    problem reports limited per kind per second and summed up afterwards
    watchdog    heartbeat_lost, and which silence is the reader's own
    messages    what each message from the agent means (one handler per type)
    pending     requests waiting for their answer
    commands    what the host asks of the agent (start, probe, ping, signal, ...)
    workload    `RemoteWorkload`, and what it needs of its link (`WorkloadHost`)
    sink        where a workload's output goes without blocking the reader
    registry    the link's workloads, and exits nobody claimed yet
"""

from __future__ import annotations

from hvtsm.monitor.link.agent_link import AgentLink, LinkHealth
from hvtsm.monitor.link.handlers import ChannelFault, ChannelHandler, EventHandler, ProblemHandler
from hvtsm.monitor.link.hello import Hello
from hvtsm.monitor.link.limits import (
    CHANNEL_LINES_PER_S,
    DISCARD_CHUNK,
    DRAIN_READS,
    ERRORS_KEPT,
    EVENTS_PER_S,
    FEED_CHUNK,
    FLOOD_BYTES,
    FLOOD_MESSAGES,
    HEARTBEAT_MISSES,
    MAX_DETAIL,
    MAX_EPOCH,
    MAX_HEARTBEAT,
    MAX_PID,
    MAX_SEQ,
    MAX_STATUS,
    MIN_HEARTBEAT,
    MIN_STATUS,
    PROBE_GRACE,
    PROBLEMS_PER_S,
    READ_CHUNK,
    SINK_LIMIT,
    TIMED_PROBES,
    UNCLAIMED_KEEP,
    Limits,
)
from hvtsm.monitor.link.workload import RemoteWorkload, WorkloadHost

__all__ = [
    "CHANNEL_LINES_PER_S",
    "DISCARD_CHUNK",
    "DRAIN_READS",
    "ERRORS_KEPT",
    "EVENTS_PER_S",
    "FEED_CHUNK",
    "FLOOD_BYTES",
    "FLOOD_MESSAGES",
    "HEARTBEAT_MISSES",
    "MAX_DETAIL",
    "MAX_EPOCH",
    "MAX_HEARTBEAT",
    "MAX_PID",
    "MAX_SEQ",
    "MAX_STATUS",
    "MIN_HEARTBEAT",
    "MIN_STATUS",
    "PROBE_GRACE",
    "PROBLEMS_PER_S",
    "READ_CHUNK",
    "SINK_LIMIT",
    "TIMED_PROBES",
    "UNCLAIMED_KEEP",
    "AgentLink",
    "ChannelFault",
    "ChannelHandler",
    "EventHandler",
    "Hello",
    "Limits",
    "LinkHealth",
    "ProblemHandler",
    "RemoteWorkload",
    "WorkloadHost",
]
