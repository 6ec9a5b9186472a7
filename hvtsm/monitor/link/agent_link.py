"""`AgentLink`: the facade over one link's parts (see the package docstring).

It makes the parts, wires them (each gets only what it uses), starts the reader, and
passes each call to the part whose job it is.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hvtsm.monitor.link.commands import Commands
from hvtsm.monitor.link.flood import FloodControl
from hvtsm.monitor.link.handlers import ChannelHandler, EventHandler, ProblemHandler
from hvtsm.monitor.link.hello import Hello
from hvtsm.monitor.link.limits import Limits
from hvtsm.monitor.link.messages import Dispatcher
from hvtsm.monitor.link.pending import PendingTable
from hvtsm.monitor.link.problems import FailureLog, ProblemLog
from hvtsm.monitor.link.reader import Reader
from hvtsm.monitor.link.registry import Workloads
from hvtsm.monitor.link.state import LinkState
from hvtsm.monitor.link.transport import Transport, connect_unix
from hvtsm.monitor.link.watchdog import Watchdog
from hvtsm.monitor.link.workload import RemoteWorkload


def _limits(flood_messages: int | None, flood_bytes: int | None, events_per_s: int | None,
            channel_lines_per_s: int | None) -> Limits:
    """The given limits, the others as the package's constants stand now: callers and tests
    have always tuned them there (`hvtsm.monitor.link.FLOOD_MESSAGES = ...`)."""
    package = sys.modules[__name__.rpartition(".")[0]]

    def pick(given: int | None, name: str) -> int:
        return int(getattr(package, name)) if given is None else given

    return Limits(flood_messages=pick(flood_messages, "FLOOD_MESSAGES"),
                  flood_bytes=pick(flood_bytes, "FLOOD_BYTES"),
                  events_per_s=pick(events_per_s, "EVENTS_PER_S"),
                  channel_lines_per_s=pick(channel_lines_per_s, "CHANNEL_LINES_PER_S"),
                  problems_per_s=pick(None, "PROBLEMS_PER_S"),
                  unclaimed_keep=pick(None, "UNCLAIMED_KEEP"))


@dataclass(frozen=True)
class LinkHealth:
    """A link's view of its agent at one moment (the console's "agent state")."""

    #: malformed, oversized or ill-typed lines received, and messages discarded for an
    #: implausible value (each also an on_problem)
    malformed: int
    bytes_received: int
    #: valid messages received
    messages: int
    #: lines discarded unparsed because they came in a flood (see FLOOD_MESSAGES)
    flood_dropped: int
    flood_dropped_bytes: int
    #: monitoring events not passed to on_event: more than EVENTS_PER_S in a second
    events_dropped: int
    #: kind -> problems found so far, those not reported one by one included
    problems: dict[str, int]
    #: messages the agent sent (or had to discard) that never arrived: gaps in seq
    dropped: int
    reader_alive: bool
    #: time.monotonic() of the last valid message (a heartbeat or any other)
    last_heartbeat: float | None
    heartbeat_ok: bool
    #: why the link ended on its own (the channel closed), if it did
    lost_reason: str | None


class AgentLink:
    """See the package docstring. Make one with `connect` (production) or `from_socket`."""

    def __init__(self, sock: socket.socket, *, zone_id: str | None = None,
                 describe: str = "agent socket", heartbeat_grace: float | None = None,
                 on_problem: ProblemHandler | None = None,
                 on_event: EventHandler | None = None, flood_messages: int | None = None,
                 flood_bytes: int | None = None, events_per_s: int | None = None,
                 on_channel: ChannelHandler | None = None,
                 channel_lines_per_s: int | None = None) -> None:
        """`heartbeat_grace`: seconds of silence before heartbeat_lost (None: 3 of the
        agent's periods). The per-second limits default to the package's constants as
        they stand now (`limits`). The reader starts at once."""
        self.zone_id = zone_id
        self.describe = describe
        self.on_problem: ProblemHandler | None = on_problem
        #: monitoring events (`event` messages) as they arrive; `data` is always a dict and
        #: `time`, when present, an epoch time between 0 and MAX_EPOCH
        self.on_event: EventHandler | None = on_event
        #: the zone's channel messages (the broker); None: the zone has no channel
        self.on_channel: ChannelHandler | None = on_channel
        #: this link's budgets (read-only: the constructor's keywords, else the constants)
        self.limits = _limits(flood_messages, flood_bytes, events_per_s, channel_lines_per_s)
        self._state = state = LinkState(zone_id, describe)
        self._transport = transport = Transport(sock, state)
        failures = FailureLog(zone_id)
        self._problems = problems = ProblemLog(zone_id, self, self.limits.problems_per_s,
                                               failures)
        pending = PendingTable()
        self._workloads = workloads = Workloads(self.limits.unclaimed_keep)
        self._flood = flood = FloodControl(self.limits)
        self._watchdog = watchdog = Watchdog(heartbeat_grace)
        self._dispatcher = Dispatcher(state=state, watchdog=watchdog, pending=pending,
                                      workloads=workloads, flood=flood, problems=problems,
                                      failures=failures, handlers=self, send=transport.send)
        self._commands = Commands(state=state, transport=transport, pending=pending,
                                  workloads=workloads, problems=problems)
        # ending is told in this order: the reader wakes, waiters fail, workloads are lost
        state.when_closed(transport.end)
        state.when_closed(pending.close)
        state.when_closed(workloads.link_ended)
        self._reader = Reader(state=state, transport=transport, flood=flood,
                              watchdog=watchdog, problems=problems, dispatch=self._dispatcher,
                              name=f"agent-link-{zone_id or describe}")
        self._reader.start()

    # -- making one ------------------------------------------------------------------------

    @classmethod
    def connect(cls, path: str, *, timeout: float, zone_id: str | None = None,
                heartbeat_grace: float | None = None,
                on_problem: ProblemHandler | None = None,
                on_event: EventHandler | None = None, **limits: Any) -> AgentLink:
        """Connect to the channel socket libvirt binds, retrying until it exists and
        accepts (QEMU makes it while the domain starts), for at most `timeout` seconds."""
        sock = connect_unix(path, timeout=timeout, zone_id=zone_id)
        return cls(sock, zone_id=zone_id, describe=path, heartbeat_grace=heartbeat_grace,
                   on_problem=on_problem, on_event=on_event, **limits)

    @classmethod
    def from_socket(cls, sock: socket.socket, *, zone_id: str | None = None,
                    heartbeat_grace: float | None = None,
                    on_problem: ProblemHandler | None = None,
                    on_event: EventHandler | None = None, **limits: Any) -> AgentLink:
        """A link over a socket that is already connected (tests, relays). `limits`:
        flood_messages, flood_bytes, events_per_s, channel_lines_per_s, on_channel (the
        constructor's)."""
        return cls(sock, zone_id=zone_id, describe="socket", heartbeat_grace=heartbeat_grace,
                   on_problem=on_problem, on_event=on_event, **limits)

    # -- state -----------------------------------------------------------------------------

    @property
    def hello(self) -> Hello | None:
        return self._state.hello

    def health(self) -> LinkHealth:
        """What the link has seen of its agent so far (a snapshot)."""
        return LinkHealth(
            malformed=self._state.malformed, bytes_received=self._state.bytes_in,
            messages=self._state.messages, flood_dropped=self._flood.dropped_lines,
            flood_dropped_bytes=self._flood.dropped_bytes,
            events_dropped=self._flood.events_dropped, problems=self._problems.counts,
            dropped=self._dispatcher.dropped, reader_alive=self._reader.alive,
            last_heartbeat=self._watchdog.last, heartbeat_ok=not self._watchdog.lost,
            lost_reason=self._state.lost_reason)

    @property
    def closed(self) -> bool:
        return self._state.closed

    # -- requests --------------------------------------------------------------------------

    def wait_hello(self, timeout: float) -> Hello:
        """The agent's hello (it may have arrived already). ZoneError when none comes within
        `timeout`, the link ends first, or the agent speaks another protocol version."""
        return self._state.wait_hello(timeout)

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | None = None, user: str | int | None = None, timeout: float = 30,
              stdout: int | None = subprocess.PIPE, stderr: int | None = subprocess.PIPE,
              workload_id: str | None = None,
              monitor: Mapping[str, Any] | None = None,
              channel: str | None = None, standby: str | None = None,
              owned: bool = False) -> RemoteWorkload:
        """Start `argv` in the guest (own session and process group, stdin /dev/null) and
        return once it exec'd. Output goes, per stream: PIPE -> a pipe the caller reads
        (`workload.stdout`), a file descriptor >= 0 -> written there (not closed), None or
        DEVNULL -> discarded; stderr=STDOUT joins stdout. `env` goes on top of a small clean
        environment in the guest (PATH, HOME, LANG, TERM). `monitor` is the workload's
        monitoring profile (`guest_agent.profile.PROFILE_FIELDS`): sent with the start so
        the agent watches the process tree from its first instruction. `channel` (the
        zone's name in its group) gives the workload the channel endpoint. `standby` (a
        prepared standby's id, `prepare_standby`) asks the agent to let it be the workload
        if it fits; `workload.standby` then says whether it did, and why not. `owned`: the
        output descriptors are the link's to close once the workload's output is done (the
        caller may close its own copies at once)."""
        return self._commands.start(argv, env=env, cwd=cwd, user=user, timeout=timeout,
                                    stdout=stdout, stderr=stderr, workload_id=workload_id,
                                    monitor=monitor, channel=channel, standby=standby,
                                    owned=owned)

    def prepare_standby(self, standby_id: str, *, mode: str, monitor: Mapping[str, Any],
                        user: str | int | None = None, python: str | None = None,
                        program: str | None = None, timeout: float = 60) -> dict[str, Any]:
        """Have the agent start a standby (guest_agent/standby.py): a watched runtime
        process waiting for one request. Returns the agent's ``standby_ready`` ({id, pid,
        prepared, mode}) once it waits; ZoneError when it could not be prepared."""
        return self._commands.prepare_standby(standby_id, mode=mode, monitor=monitor,
                                              user=user, python=python, program=program,
                                              timeout=timeout)

    def attach(self, workload_id: str, *, stdout: int | None = None,
               stderr: int | None = None) -> RemoteWorkload:
        """A RemoteWorkload for a workload this link did not start (one a previous
        controller started: see `Hello.workloads`); output arrives from now on."""
        return self._commands.attach(workload_id, stdout=stdout, stderr=stderr)

    def probe(self, kind: str, args: Mapping[str, Any] | None = None, *, timeout: float = 10,
              **kwargs: Any) -> dict[str, Any]:
        """Run probe `kind` in the guest with `args` (a mapping and/or keywords) and return
        its result. `timeout` bounds the wait; for probes with a timeout of their own
        (tcp_connect) it is also that timeout unless `args` give one. ZoneError when the
        probe cannot run (unknown kind, bad arguments) or no answer comes in time."""
        return self._commands.probe(kind, {**(args or {}), **kwargs}, timeout)

    def admin(self, op: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        """Have the agent carry out administration request `op` (guest_agent.protocol
        ADMIN_FIELDS: scrub, link_down, remount_ro, nproc) and return its result fields
        (ADMIN_RESULTS). ZoneError naming what went wrong when the agent could not."""
        return self._commands.admin(op, fields, timeout)

    def ping(self, timeout: float = 5.0) -> float:
        """Round trip to the agent and back, seconds."""
        return self._commands.ping(timeout)

    def signal(self, workload_id: str, sig: int) -> None:
        """Send `sig` to the workload's process group in the guest (nothing if it exited).
        The agent reports a failure asynchronously (RemoteWorkload.errors, on_problem)."""
        self._commands.signal(workload_id, sig)

    def update_profile(self, workload_id: str, monitor: Mapping[str, Any]) -> None:
        """Replace the monitoring profile of a running workload (the controller sends one
        after each phase, so what counts as an anomaly follows the restrictions). The agent
        does not confirm it: a profile it refuses comes back as an `error` for the workload
        (`RemoteWorkload.errors`, on_problem agent_error). Nothing is sent for a workload
        that has exited. The workload need not have been started over this link: an agent
        beside a cgroup zone watches a workload the zone's launcher started."""
        self._commands.update_profile(workload_id, monitor)

    def transient(self, workload_id: str, op: str, **fields: Any) -> None:
        """Send a `transient` message (guest_agent.protocol): place a held process in a
        transient zone or refuse it, or act on a transient zone's cgroup in the guest. The
        agent answers with an event of kind `transient` (on_event)."""
        self._commands.transient(workload_id, op, fields)

    def delegate(self, zone_id: str, schedule: Mapping[str, Any], *, ack: int | None = None,
                 thaw: bool = False) -> None:
        """Give the zone's deputy its schedule (a ``deputy`` message: phases, in_force,
        grace, fail_closed, lock; guest_agent/deputy.py), after acknowledging its records
        up to `ack` (``deputy_ack``; `thaw`: what its freezes stood in for is applied).
        ZoneError when the link cannot take it."""
        self._commands.deputy(zone_id, schedule, ack, thaw)

    def channel_deliver(self, delivery_id: str, sender: str, data: bytes, *,
                        timeout: float = 30.0) -> None:
        """Write a message for the zone's workload (in pieces); ZoneError when the link
        cannot take it within `timeout` (the agent acknowledges it with ``channel_ack``
        once the workload took it)."""
        self._commands.channel_deliver(delivery_id, sender, data, timeout)

    def channel_verdict(self, message_id: str, verdict: str, reason: str, *,
                        timeout: float = 10.0) -> None:
        """Tell the sending workload what became of its message."""
        self._commands.channel_verdict(message_id, verdict, reason, timeout)

    def report_bad(self, detail: str) -> None:
        """A message found unusable after the reader passed it on (a channel message that
        never finished): counted and reported as malformed."""
        self._dispatcher.bad(detail)

    def close(self) -> None:
        """End the link: the reader stops, waiting requests fail, running workloads are
        marked `link_lost` and their output pipes closed. Idempotent."""
        self._state.close(None)
        self._reader.join(5)
