"""The link's numbers: what it believes of an agent's values, and how much work it does for
one agent per second.

The per-link budgets (`Limits`) are taken when a link is made: from the constructor's
keywords, else from these constants as they stand in the package namespace then
(`hvtsm.monitor.link.FLOOD_MESSAGES = ...` before making a link still tunes it).
"""

from __future__ import annotations

from dataclasses import dataclass

#: bytes of one workload stream that may wait for a slow reader before output is dropped
SINK_LIMIT = 16 * 1024 * 1024
#: a probe's answer may take this much longer than the probe's own timeout (transit)
PROBE_GRACE = 2.0
#: heartbeats the agent may miss before heartbeat_lost
HEARTBEAT_MISSES = 3
#: probes that take a `timeout` argument of their own (the link's timeout is its default)
TIMED_PROBES = frozenset({"tcp_connect"})
#: exit statuses kept for workloads of no RemoteWorkload (for `attach`)
UNCLAIMED_KEEP = 64
#: lines (messages, blank ones included) within one second beyond which the agent floods
FLOOD_MESSAGES = 5000
#: bytes within one second beyond which the agent floods (the reader pauses for the rest
#: of the second); well above the output a workload prints (the link carries ~12 MB/s)
FLOOD_BYTES = 64 * 1024 * 1024
#: monitoring events passed to on_event per second; the rest of the second's are dropped
EVENTS_PER_S = 200
#: channel lines within one second beyond which the agent floods (counted apart from the
#: others: twice what the agent itself sends at most, guest_agent.agent.CHANNEL_LINES_PER_S)
CHANNEL_LINES_PER_S = 4000
#: reports of one problem kind per second; the rest are counted and summed up afterwards
PROBLEMS_PER_S = 10
#: longest text from the agent kept in a problem detail or a workload's errors
MAX_DETAIL = 1000
#: agent errors kept per workload (newest first)
ERRORS_KEPT = 16
#: heartbeat periods an agent may claim, seconds; a claim outside is clamped and reported
MIN_HEARTBEAT = 0.1
MAX_HEARTBEAT = 60.0
#: the largest seq believed: a counter never gets there, and one huge seq would make every
#: later message look like a regression
MAX_SEQ = 2**63 - 1
#: the largest pid a Linux guest can have (PID_MAX_LIMIT)
MAX_PID = 4 * 1024 * 1024
#: the latest event time believed (epoch s, year 3058): datetime takes it everywhere
MAX_EPOCH = 2.0**35
#: exit statuses the agent can report: 0-255, or -signal
MIN_STATUS, MAX_STATUS = -127, 255
#: bytes read at once while parsing (bounds the items one read yields) and while discarding
READ_CHUNK = 64 * 1024
DISCARD_CHUNK = 1024 * 1024
#: bytes decoded at once: bounds the items (a ProtocolError per junk line) held at a time
FEED_CHUNK = 16 * 1024
#: reads the watchdog makes of what waits in the socket before it calls the agent silent
#: (it stops at the first message; more reads than this is a flood of junk, not a heartbeat)
DRAIN_READS = 64


@dataclass(frozen=True)
class Limits:
    """One link's budgets per second and its bounded lists (see the constants above)."""

    flood_messages: int = FLOOD_MESSAGES
    flood_bytes: int = FLOOD_BYTES
    events_per_s: int = EVENTS_PER_S
    channel_lines_per_s: int = CHANNEL_LINES_PER_S
    problems_per_s: int = PROBLEMS_PER_S
    unclaimed_keep: int = UNCLAIMED_KEEP
