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
    heartbeat_lost  silence longer than HEARTBEAT_MISSES heartbeat periods
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
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from guest_agent.protocol import (
    AGENT_TYPES,
    CHANNEL_LINE_PREFIX,
    OVERSIZED,
    PROTOCOL_VERSION,
    Decoder,
    Message,
    ProtocolError,
    SeqTracker,
    channel_pieces,
    encode,
)
from hvtsm.errors import ZoneError

log = logging.getLogger(__name__)

#: (kind, detail): malformed, oversized, seq_gap, seq_regress, heartbeat_lost, agent_restart,
#: agent_error, output_dropped, flood, events_dropped, disconnected (the module docstring
#: says what each means)
ProblemHandler = Callable[[str, str], None]
EventHandler = Callable[[Message], None]
#: a validated channel_send or channel_ack message; raises ChannelFault for one it cannot use
ChannelHandler = Callable[[Message], None]


class ChannelFault(Exception):
    """A channel message that cannot be used (the link counts it as malformed)."""

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


@dataclass(frozen=True)
class Hello:
    """What the agent says about itself when the link comes up."""

    protocol: int
    agent_version: str
    capabilities: tuple[str, ...]
    #: the agent's pid in the guest
    pid: int
    #: guest kernel release
    kernel: str
    #: the guest's python version
    python: str
    #: guest uptime when the agent said hello, ms
    boot_ms: int
    #: the agent's heartbeat period, seconds (None: it did not say)
    heartbeat: float | None
    hostname: str | None
    port: str | None
    #: (workload id, guest pid) of workloads whose exit the agent has not sent yet
    workloads: tuple[tuple[str, int], ...]
    seq: int
    #: time.monotonic() when it arrived
    received: float

    @classmethod
    def from_message(cls, msg: Message, received: float) -> Hello:
        return cls(
            protocol=msg["protocol"], agent_version=msg["agent_version"],
            capabilities=tuple(msg["capabilities"]), pid=msg["pid"], kernel=msg["kernel"],
            python=msg["python"], boot_ms=msg["boot_ms"],
            heartbeat=_heartbeat_period(msg.get("heartbeat"))[0],
            hostname=msg.get("hostname"), port=msg.get("port"),
            workloads=tuple((w["id"], w["pid"] if _pid_ok(w["pid"]) else 0)
                            for w in msg.get("workloads") or ()),
            seq=msg["seq"], received=received)


def _heartbeat_period(claim: Any) -> tuple[float | None, str | None]:
    """The heartbeat period to believe for what a hello claims, and what was wrong with the
    claim (None if nothing). A number is not enough: 1e400 arrives as inf, and an absurd
    period would either disable the watchdog or make it fire at once."""
    if claim is None or claim == 0:
        return None, None  # it did not say: the watchdog assumes MAX_HEARTBEAT
    try:
        period = float(claim)
    except (TypeError, ValueError, OverflowError):  # an int beyond float range
        period = math.inf
    if not math.isfinite(period) or period > MAX_HEARTBEAT:
        return MAX_HEARTBEAT, (f"hello claims a heartbeat period of {_short(claim)} s: "
                               f"{MAX_HEARTBEAT:g} s assumed")
    if period < MIN_HEARTBEAT:
        return MIN_HEARTBEAT, (f"hello claims a heartbeat period of {_short(claim)} s: "
                               f"{MIN_HEARTBEAT:g} s assumed")
    return period, None


def _pid_ok(pid: Any) -> bool:
    return isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid <= MAX_PID


def _short(value: Any, limit: int = 40) -> str:
    """A value the agent chose, cut to a size fit for a message (ints can have 4300 digits)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _clip(text: str, limit: int = MAX_DETAIL) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class _Sink:
    """One output stream's destination, written by its own thread (started on first use)."""

    def __init__(self, fd: int, *, owned: bool, label: str, limit: int = SINK_LIMIT) -> None:
        self.fd = fd
        self.owned = owned
        self.label = label
        self.limit = limit
        self._cond = threading.Condition()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        #: bytes that never reached the destination (limit exceeded, reader gone)
        self.dropped = 0
        self.broken = False

    def write(self, data: bytes) -> bool:
        """Queue `data`; False if it was dropped."""
        with self._cond:
            if self._closing or self.broken or self._queued + len(data) > self.limit:
                self.dropped += len(data)
                return self.broken or self._closing  # only overflow is news
            self._chunks.append(data)
            self._queued += len(data)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"sink-{self.label}",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
            return True

    def finish(self) -> None:
        """No more output: close the destination (if ours) once what is queued is written."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is None:
            self._close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._chunks and not self._closing:
                    self._cond.wait()
                if not self._chunks:
                    break
                data = self._chunks.popleft()
                self._queued -= len(data)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view):]
            except OSError as e:  # EPIPE: the reader closed its end
                log.debug("output %s: %s", self.label, e)
                with self._cond:
                    self.broken = True
                    self.dropped += len(view) + self._queued
                    self._chunks.clear()
                    self._queued = 0
        self._close()

    def _close(self) -> None:
        if self.owned:
            with contextlib.suppress(OSError):
                os.close(self.fd)


def _check_target(target: int | None, *, stderr: bool = False) -> None:
    ok = target is None or target in (subprocess.PIPE, subprocess.DEVNULL) or (
        isinstance(target, int) and target >= 0) or (stderr and target == subprocess.STDOUT)
    if not ok:
        raise ValueError(f"output target must be PIPE, DEVNULL, None, a file descriptor "
                         f"(or STDOUT for stderr), not {target!r}")


def _plain(value: Any) -> Any:
    """`value` with every Mapping made a dict and every tuple a list, recursively: profiles
    are often built from frozen policy objects (mapping proxies, tuples) that json cannot
    encode as they are. Anything else json cannot encode is left for `encode` to refuse."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _sink_for(target: int | None, label: str, *,
              own: bool = False) -> tuple[_Sink | None, IO[bytes] | None]:
    """subprocess-style target -> (sink, readable file for the caller)."""
    if target is None or target == subprocess.DEVNULL:
        return None, None
    if target == subprocess.PIPE:
        r, w = os.pipe2(os.O_CLOEXEC)
        return _Sink(w, owned=True, label=label), open(r, "rb")
    _check_target(target)
    assert target is not None
    return _Sink(target, owned=own, label=label), None


class RemoteWorkload:
    """A workload the agent runs in the guest; satisfies `hvtsm.zones.base.Workload`.

    `pid` is the guest's pid. `stdout`/`stderr` are readable binary files when the start
    asked for PIPE (they reach EOF after the exit), else None.
    """

    def __init__(self, link: AgentLink, workload_id: str, argv: Sequence[str], *,
                 stdout: int | None, stderr: int | None, own: bool = False) -> None:
        self.link = link
        self.id = workload_id
        self.argv = tuple(argv)
        self._sinks: dict[str, _Sink | None] = {}
        self._files: dict[str, IO[bytes] | None] = {}
        for stream, target in (("stdout", stdout), ("stderr", stderr)):
            if stream == "stderr" and target == subprocess.STDOUT:
                self._sinks[stream], self._files[stream] = self._sinks["stdout"], None
                continue
            self._sinks[stream], self._files[stream] = _sink_for(
                target, f"{link.zone_id or 'guest'}-{workload_id}-{stream}", own=own)
        self._pid = 0
        self._status: int | None = None
        self._exited = threading.Event()
        #: time.monotonic() of the agent's `started`
        self.started_at: float | None = None
        #: the agent's word on the standby the start named (guest_agent.protocol `started`)
        self.standby: dict[str, Any] | None = None
        #: what the agent said went wrong with this workload, last first
        self.errors: list[str] = []
        #: the link went away while the workload ran: its exit status is unknown
        self.link_lost = False
        #: its exit message was discarded in a flood: the status (MAX_STATUS) is made up
        self.exit_lost = False
        #: the agent said it runs (started, or listed in a hello when attached)
        self._confirmed = False
        self._overflow_reported = False

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def stdout(self) -> IO[bytes] | None:
        return self._files["stdout"]

    @property
    def stderr(self) -> IO[bytes] | None:
        return self._files["stderr"]

    @property
    def output_dropped(self) -> int:
        sinks = {id(s): s for s in self._sinks.values() if s is not None}
        return sum(s.dropped for s in sinks.values())

    def poll(self) -> int | None:
        return self._status

    def wait(self, timeout: float | None = None) -> int | None:
        self._exited.wait(timeout)
        return self._status

    def send_signal(self, sig: int) -> None:
        self.link.signal(self.id, sig)

    def terminate(self) -> None:
        self.send_signal(15)

    def kill(self) -> None:
        self.send_signal(9)

    def assume_exit(self, status: int) -> None:
        """Record an exit the agent can no longer report (its guest is gone)."""
        if self._status is None:
            self._finish(status)

    # -- fed by the link's reader thread ---------------------------------------------------

    def _on_started(self, pid: int) -> None:
        self._pid = pid
        self._confirmed = True
        self.started_at = time.monotonic()

    def _on_output(self, stream: str, data: str) -> None:
        sink = self._sinks.get(stream)
        if sink is None:
            return
        if not sink.write(data.encode("utf-8", errors="replace")) \
                and not self._overflow_reported:
            self._overflow_reported = True
            self.link._problem("output_dropped",
                               f"workload {self.id} {stream}: more than {sink.limit} bytes "
                               "waited for a reader; output is being dropped")

    def _finish(self, status: int) -> None:
        self._status = status
        for sink in self._sinks.values():
            if sink is not None:
                sink.finish()
        self._exited.set()

    def _lost(self) -> None:
        if self._status is None:
            self.link_lost = True
            for sink in self._sinks.values():
                if sink is not None:
                    sink.finish()


class _Pending:
    """A request waiting for its answer: `expect` (or an `error`); any other type that
    carries its id answers it with an error, so a caller never reads fields its reply lacks."""

    def __init__(self, expect: str) -> None:
        self.expect = expect
        self.done = threading.Event()
        self.reply: Message | None = None
        self.error: str | None = None

    def answer(self, reply: Message | None = None, error: str | None = None) -> None:
        if not self.done.is_set():
            self.reply, self.error = reply, error
            self.done.set()


class AgentLink:
    """See the module docstring. Make one with `connect` (production) or `from_socket`."""

    def __init__(self, sock: socket.socket, *, zone_id: str | None = None,
                 describe: str = "agent socket", heartbeat_grace: float | None = None,
                 on_problem: ProblemHandler | None = None,
                 on_event: EventHandler | None = None, flood_messages: int | None = None,
                 flood_bytes: int | None = None, events_per_s: int | None = None,
                 on_channel: ChannelHandler | None = None,
                 channel_lines_per_s: int | None = None) -> None:
        self.zone_id = zone_id
        self.describe = describe
        #: seconds of silence before heartbeat_lost (default: 3 of the agent's periods)
        self.heartbeat_grace = heartbeat_grace
        self.on_problem: ProblemHandler | None = on_problem
        #: monitoring events (`event` messages) as they arrive; `data` is always a dict and
        #: `time`, when present, an epoch time between 0 and MAX_EPOCH
        self.on_event: EventHandler | None = on_event
        # per-second limits (module defaults read now, so tests and callers can tune them)
        self.flood_messages = FLOOD_MESSAGES if flood_messages is None else flood_messages
        self.flood_bytes = FLOOD_BYTES if flood_bytes is None else flood_bytes
        self.events_per_s = EVENTS_PER_S if events_per_s is None else events_per_s
        self.channel_lines_per_s = (CHANNEL_LINES_PER_S if channel_lines_per_s is None
                                    else channel_lines_per_s)
        #: the zone's channel messages (the broker); None: the zone has no channel
        self.on_channel: ChannelHandler | None = on_channel
        self._win_channel = 0
        sock.setblocking(False)
        self._sock = sock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._send_lock = threading.Lock()
        self._decoder = Decoder(AGENT_TYPES)
        self._seqs = SeqTracker()
        self._ids = itertools.count(1)
        self._hello: Hello | None = None
        self._hello_asked: str | None = None
        self._pending: dict[str, _Pending] = {}
        self._workloads: dict[str, RemoteWorkload] = {}
        self._unclaimed: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._malformed = 0
        self._messages = 0
        self._bytes_in = 0
        self._last_message: float | None = None
        self._last_seen = "nothing"
        self._heartbeat_lost = False
        self._closed = False
        self._lost_reason: str | None = None
        # the current one-second window of traffic (reader thread only)
        self._win_start = -math.inf
        self._win_messages = 0
        self._win_bytes = 0
        self._win_events = 0
        #: None, or what this second's flood does: "discard" (too many lines) or "pause"
        #: (too many bytes: nothing is read until the second is over)
        self._win_state: str | None = None
        #: time.monotonic() when reading resumed after a pause (the agent was not silent)
        self._resumed_at = -math.inf
        #: the ping whose hello tells which workloads ended while their exit was discarded
        self._state_asked: str | None = None
        self._win_events_over = False
        #: discarding stopped inside a line: what follows up to the next newline is its rest
        self._resync = False
        self._flood_dropped = 0
        self._flood_dropped_bytes = 0
        self._events_dropped = 0
        # problem reports per kind: counts, and the current second's [start, reports,
        # suppressed, last suppressed detail]
        self._problem_lock = threading.Lock()
        self._problem_counts: collections.Counter[str] = collections.Counter()
        self._problem_windows: dict[str, list[Any]] = {}
        self._failures = collections.Counter[str]()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._reader = threading.Thread(target=self._read_loop,
                                        name=f"agent-link-{zone_id or describe}", daemon=True)
        self._reader.start()

    # -- making one ------------------------------------------------------------------------

    @classmethod
    def connect(cls, path: str, *, timeout: float, zone_id: str | None = None,
                heartbeat_grace: float | None = None,
                on_problem: ProblemHandler | None = None,
                on_event: EventHandler | None = None, **limits: Any) -> AgentLink:
        """Connect to the channel socket libvirt binds, retrying until it exists and
        accepts (QEMU makes it while the domain starts), for at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(max(0.1, min(2.0, deadline - time.monotonic())))
            try:
                sock.connect(path)
            except OSError as e:
                sock.close()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ZoneError(
                        f"cannot connect to the guest agent channel {path} within "
                        f"{timeout:g} s: {e.strerror or e}", zone_id=zone_id,
                        hint="is the domain running, with a <channel type='unix'> bound to "
                             "this path and target name org.hvtsm.agent.0?") from None
                time.sleep(min(delay, left))
                delay = min(delay * 2, 0.5)
                continue
            log.debug("connected to %s", path)
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
        return self._hello

    @property
    def malformed(self) -> int:
        """Malformed, oversized or ill-typed lines received, and messages discarded for an
        implausible value (each also an on_problem)."""
        return self._malformed

    @property
    def bytes_received(self) -> int:
        return self._bytes_in

    @property
    def messages(self) -> int:
        """Valid messages received."""
        return self._messages

    @property
    def flood_dropped(self) -> int:
        """Lines discarded unparsed because they came in a flood (see FLOOD_MESSAGES)."""
        return self._flood_dropped

    @property
    def flood_dropped_bytes(self) -> int:
        return self._flood_dropped_bytes

    @property
    def events_dropped(self) -> int:
        """Monitoring events not passed to on_event: more than EVENTS_PER_S in a second."""
        return self._events_dropped

    @property
    def problems(self) -> dict[str, int]:
        """kind -> problems found so far, those not reported one by one included."""
        with self._problem_lock:
            return dict(self._problem_counts)

    @property
    def reader_alive(self) -> bool:
        return self._reader.is_alive()

    @property
    def dropped(self) -> int:
        """Messages the agent sent (or had to discard) that never arrived: gaps in seq."""
        return self._seqs.missing

    @property
    def last_heartbeat(self) -> float | None:
        """time.monotonic() of the last valid message (a heartbeat or any other)."""
        return self._last_message

    @property
    def heartbeat_ok(self) -> bool:
        return not self._heartbeat_lost

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def lost_reason(self) -> str | None:
        """Why the link ended on its own (the channel closed), if it did."""
        return self._lost_reason

    def _error(self, message: str, hint: str | None = None) -> ZoneError:
        return ZoneError(message, zone_id=self.zone_id, hint=hint)

    def _seen(self) -> str:
        with self._lock:
            if not self._bytes_in:
                return "nothing at all was received"
            return (f"received {self._bytes_in} bytes: {self._messages} messages, "
                    f"{self._malformed} malformed; last: {self._last_seen}")

    # -- requests --------------------------------------------------------------------------

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
                raise self._error(f"the guest agent channel {self.describe} closed before the "
                                  f"agent said hello ({reason or 'closed'}); {self._seen()}")
            raise self._error(
                f"no hello from the guest agent on {self.describe} within {timeout:g} s; "
                f"{self._seen()}",
                hint="did the guest boot and its init start the agent? read the guest console "
                     "(or another process holds the channel: QEMU serves one client at a time)")
        if hello.protocol != PROTOCOL_VERSION:
            raise self._error(
                f"the guest agent {_short(hello.agent_version)} speaks protocol "
                f"{_short(hello.protocol)}, this controller {PROTOCOL_VERSION}",
                hint="the guest runs another hvtsm's guest_agent: restage it from this one")
        return hello

    def _send(self, msg: Message, timeout: float = 10.0) -> None:
        try:
            data = encode(msg)
        except ProtocolError as e:
            raise self._error(f"refusing to send an invalid {msg.get('type')} request: "
                              f"{e.detail}") from None
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        with self._send_lock:
            while view:
                if self._closed:
                    raise self._error(f"the guest agent link is closed "
                                      f"({self._lost_reason or 'closed by the controller'})")
                try:
                    view = view[self._sock.send(view):]
                    continue
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as e:
                    raise self._error(f"cannot write to the guest agent channel: {e}") from e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._error(
                        f"the guest agent did not read its channel for {timeout:g} s",
                        hint="the guest may be frozen or overloaded")
                poller = select.poll()
                with contextlib.suppress(OSError, ValueError):
                    poller.register(self._sock, select.POLLOUT)
                    poller.poll(int(min(left, 0.5) * 1000) + 1)

    def _request(self, key: str, expect: str) -> _Pending:
        pending = _Pending(expect)
        with self._lock:
            if self._closed:
                raise self._error(f"the guest agent link is closed "
                                  f"({self._lost_reason or 'closed by the controller'})")
            if key in self._pending:  # a caller's workload id may look like a request's
                raise self._error(f"request id {key} is already waiting for an answer")
            self._pending[key] = pending
        return pending

    def _ask(self, msg: Message, expect: str, timeout: float, *, late: str,
             failed: str) -> Message:
        """Send `msg` (its id is the request's key) and return the agent's `expect` reply.
        ZoneError "`late`; what was seen" without one in `timeout` s, "`failed`: why" when
        the agent answered with an error."""
        key = str(msg["id"])
        pending = self._request(key, expect)
        try:
            self._send(msg, timeout)
            if not pending.done.wait(timeout):
                raise self._error(f"{late}; {self._seen()}")
        finally:
            self._forget(key)
        if pending.error is not None:
            raise self._error(f"{failed}: {pending.error}")
        assert pending.reply is not None
        return pending.reply

    def _forget(self, key: str) -> None:
        with self._lock:
            self._pending.pop(key, None)

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
        monitoring profile (`guest_agent.protocol.PROFILE_FIELDS`): sent with the start so
        the agent watches the process tree from its first instruction. `channel` (the
        zone's name in its group) gives the workload the channel endpoint. `standby` (a
        prepared standby's id, `prepare_standby`) asks the agent to let it be the workload
        if it fits; `workload.standby` then says whether it did, and why not. `owned`: the
        output descriptors are the link's to close once the workload's output is done."""
        if not argv:
            raise self._error("nothing to start: empty command")
        wid = workload_id or f"w{next(self._ids)}"
        with self._lock:
            if wid in self._workloads:
                raise self._error(f"workload id {wid} is already in use on this link")
        _check_target(stdout)
        _check_target(stderr, stderr=True)
        msg: Message = {"type": "start", "id": wid, "argv": list(argv)}
        if env is not None:
            msg["env"] = dict(env)
        if cwd is not None:
            msg["cwd"] = cwd
        if user is not None:
            msg["user"] = user
        if monitor is not None:
            msg["monitor"] = _plain(monitor)
        if channel is not None:
            msg["channel"] = channel
        if standby is not None:
            msg["standby"] = standby
        # what nobody reads is not sent: the agent discards (or joins) it at the source
        if stdout is None or stdout == subprocess.DEVNULL:
            msg["stdout"] = "discard"
        if stderr == subprocess.STDOUT:
            msg["stderr"] = "stdout"
        elif stderr is None or stderr == subprocess.DEVNULL:
            msg["stderr"] = "discard"
        pending = self._request(wid, "started")
        work = RemoteWorkload(self, wid, argv, stdout=stdout, stderr=stderr, own=owned)
        with self._lock:
            self._workloads[wid] = work
        try:
            self._send(msg, timeout)
        except ZoneError:
            self._abandon(work, kill=False)
            raise
        if not pending.done.wait(timeout):
            self._abandon(work, kill=True)
            raise self._error(
                f"the guest agent did not confirm the start of {argv[0]} within "
                f"{timeout:g} s; {self._seen()}",
                hint="the guest may be overloaded (TCG?) or frozen")
        self._forget(wid)
        if pending.error is not None:
            # an error message means it did not start; any other failed answer may hide a
            # started workload, which must not run unseen
            self._abandon(work, kill=pending.reply is None)
            raise self._error(f"cannot start {argv[0]} in the guest: {pending.error}")
        return work

    def prepare_standby(self, standby_id: str, *, mode: str, monitor: Mapping[str, Any],
                        user: str | int | None = None, python: str | None = None,
                        program: str | None = None, timeout: float = 60) -> dict[str, Any]:
        """Have the agent start a standby (guest_agent/standby.py): a watched runtime
        process waiting for one request. Returns the agent's ``standby_ready`` ({id, pid,
        prepared, mode}) once it waits; ZoneError when it could not be prepared."""
        msg: Message = {"type": "standby", "id": standby_id, "mode": mode,
                        "monitor": _plain(monitor)}
        for name, value in (("user", user), ("python", python), ("program", program)):
            if value is not None:
                msg[name] = value
        reply = self._ask(msg, "standby_ready", timeout,
                          late=f"the standby {standby_id} was not ready within {timeout:g} s",
                          failed="no standby in the guest")
        return {k: reply.get(k) for k in ("id", "pid", "prepared", "mode")}

    def _abandon(self, work: RemoteWorkload, *, kill: bool) -> None:
        """Forget a workload whose start failed or was not confirmed in time."""
        self._forget(work.id)
        with self._lock:
            if self._workloads.get(work.id) is work:
                del self._workloads[work.id]
        work._lost()
        if kill and not self._closed:  # it may start after all: never let it run unseen
            with contextlib.suppress(ZoneError):
                self._send({"type": "signal", "id": work.id, "signal": 9}, 1.0)

    def attach(self, workload_id: str, *, stdout: int | None = None,
               stderr: int | None = None) -> RemoteWorkload:
        """A RemoteWorkload for a workload this link did not start (one a previous
        controller started: see `Hello.workloads`); output arrives from now on."""
        pids = dict(self._hello.workloads) if self._hello else {}
        with self._lock:
            if workload_id in self._workloads:
                return self._workloads[workload_id]
            status = self._unclaimed.pop(workload_id, None)
            if status is None and workload_id not in pids:
                raise self._error(f"the guest agent runs no workload {workload_id}")
            work = RemoteWorkload(self, workload_id, (), stdout=stdout, stderr=stderr)
            work._pid = pids.get(workload_id, 0)
            work._confirmed = status is None
            self._workloads[workload_id] = work
        if status is not None:
            work._finish(status)
        return work

    def probe(self, kind: str, args: Mapping[str, Any] | None = None, *, timeout: float = 10,
              **kwargs: Any) -> dict[str, Any]:
        """Run probe `kind` in the guest with `args` (a mapping and/or keywords) and return
        its result. `timeout` bounds the wait; for probes with a timeout of their own
        (tcp_connect) it is also that timeout unless `args` give one. ZoneError when the
        probe cannot run (unknown kind, bad arguments) or no answer comes in time."""
        params = dict(args or {})
        params.update(kwargs)
        wait = timeout
        if kind in TIMED_PROBES:
            params.setdefault("timeout", timeout)
            with contextlib.suppress(TypeError, ValueError):
                wait = max(timeout, float(params["timeout"]) + PROBE_GRACE)
        pid = f"p{next(self._ids)}"
        reply = self._ask({"type": "probe", "id": pid, "kind": kind, "args": params},
                          "probe_result", wait,
                          late=f"no answer to the {kind} probe within {wait:g} s",
                          failed=f"probe {kind} failed in the guest")
        result: dict[str, Any] = reply["result"]
        return result

    def ping(self, timeout: float = 5.0) -> float:
        """Round trip to the agent and back, seconds."""
        pid = f"k{next(self._ids)}"
        began = time.monotonic()
        self._ask({"type": "ping", "id": pid}, "heartbeat", timeout,
                  late=f"no answer to a ping within {timeout:g} s", failed="ping failed")
        return time.monotonic() - began

    def signal(self, workload_id: str, sig: int) -> None:
        """Send `sig` to the workload's process group in the guest (nothing if it exited).
        The agent reports a failure asynchronously (RemoteWorkload.errors, on_problem)."""
        with self._lock:
            work = self._workloads.get(workload_id)
        if work is None:
            raise self._error(f"no workload {workload_id} on this link")
        if work.poll() is not None:
            return
        self._send({"type": "signal", "id": workload_id, "signal": int(sig)})

    def update_profile(self, workload_id: str, monitor: Mapping[str, Any]) -> None:
        """Replace the monitoring profile of a running workload (the controller sends one
        after each phase, so what counts as an anomaly follows the restrictions). The agent
        does not confirm it: a profile it refuses comes back as an `error` for the workload
        (`RemoteWorkload.errors`, on_problem agent_error). Nothing is sent for a workload
        that has exited. The workload need not have been started over this link: an agent
        beside a cgroup zone watches a workload the zone's launcher started."""
        with self._lock:
            work = self._workloads.get(workload_id)
        if work is not None and work.poll() is not None:
            return
        self._send({"type": "profile", "id": workload_id, "monitor": _plain(monitor)})

    def transient(self, workload_id: str, op: str, **fields: Any) -> None:
        """Send a `transient` message (guest_agent.protocol): place a held process in a
        transient zone or refuse it, or act on a transient zone's cgroup in the guest. The
        agent answers with an event of kind `transient` (on_event)."""
        msg: Message = {"type": "transient", "id": workload_id, "op": op}
        msg.update({k: _plain(v) for k, v in fields.items() if v is not None})
        self._send(msg)

    def channel_deliver(self, delivery_id: str, sender: str, data: bytes, *,
                        timeout: float = 30.0) -> None:
        """Write a message for the zone's workload (in pieces); ZoneError when the link
        cannot take it within `timeout` (the agent acknowledges it with ``channel_ack``
        once the workload took it)."""
        deadline = time.monotonic() + timeout
        for piece in channel_pieces("channel_deliver", delivery_id, "from", sender, data):
            self._send(piece, max(0.1, deadline - time.monotonic()))

    def channel_verdict(self, message_id: str, verdict: str, reason: str, *,
                        timeout: float = 10.0) -> None:
        """Tell the sending workload what became of its message."""
        self._send({"type": "channel_verdict", "id": message_id, "verdict": verdict,
                    "reason": _clip(reason)}, timeout)

    def close(self) -> None:
        """End the link: the reader stops, waiting requests fail, running workloads are
        marked `link_lost` and their output pipes closed. Idempotent."""
        self._shut(None)
        if threading.current_thread() is not self._reader:
            self._reader.join(5)

    # -- the reader ------------------------------------------------------------------------

    def _shut(self, reason: str | None) -> bool:
        with self._changed:
            if self._closed:
                return False
            self._closed = True
            self._lost_reason = reason
            pending = list(self._pending.values())
            self._pending.clear()
            works = list(self._workloads.values())
            self._changed.notify_all()
            if self._wake_w >= 0:  # the reader closes it (under the lock) when it ends
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"x")
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        why = reason or "the link was closed by the controller"
        for p in pending:
            p.answer(error=f"the guest agent link ended: {why}")
        for work in works:
            work._lost()
        return True

    def _read_loop(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        reading = False
        try:
            while not self._closed:
                paused = self._paused_ms()
                # while paused the socket is left out of the poll (an EOF would make it
                # ready at once and for ever): what waits in it is read afterwards
                if paused is None and not reading:
                    poller.register(self._sock, select.POLLIN)
                    reading = True
                    self._resumed_at = time.monotonic()
                elif paused is not None and reading:
                    poller.unregister(self._sock)
                    reading = False
                timeout = self._watchdog_ms()
                try:
                    events = poller.poll(timeout if paused is None else min(timeout, paused))
                except InterruptedError:
                    continue
                for fd, _ in events:
                    if fd == self._wake_r:
                        return
                    self._read_some()
                self._watchdog()
        except Exception as e:  # a bug here must not leave the link silently dead
            log.exception("agent link reader of zone %s failed", self.zone_id)
            self._lose(f"the link's reader failed: {e}")
        finally:
            self._flush_problems(math.inf)  # what was counted gets reported, even at the end
            with self._lock:
                with contextlib.suppress(OSError):
                    self._sock.close()
                for fd in (self._wake_r, self._wake_w):
                    with contextlib.suppress(OSError):
                        os.close(fd)
                self._wake_r = self._wake_w = -1

    def _read_some(self) -> None:
        try:
            # discarding costs a syscall per read: take big bites of a flood
            size = DISCARD_CHUNK if self._win_state == "discard" else READ_CHUNK
            data = self._sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lose(f"reading the channel failed: {e}")
            return
        if not data:
            for item in self._decoder.close():
                self._handle_safely(item)
            self._lose("the guest agent channel closed (the domain stopped, or QEMU closed "
                       "the channel)")
            return
        with self._lock:
            self._bytes_in += len(data)
        keep, cut = self._admit(data, time.monotonic())
        # fed in slices: the items of one slice (a ProtocolError per junk line) are what
        # the reader holds at once, whatever the limits are set to
        for start in range(0, len(keep), FEED_CHUNK):
            for item in self._decoder.feed(keep[start:start + FEED_CHUNK]):
                self._handle_safely(item)
        if cut:  # the decoder's unfinished line goes on in the discarded bytes: forget it
            self._decoder = Decoder(AGENT_TYPES)

    # -- flood control ---------------------------------------------------------------------

    def _roll(self, now: float) -> None:
        """Begin a new one-second window once the current one is over."""
        if now - self._win_start < 1.0:
            return
        if self._win_state == "discard":
            self._ask_state()
        elif self._win_state == "pause":
            self._resumed_at = now  # before the watchdog looks: the pause was no silence
        self._win_start = now
        self._win_messages = self._win_bytes = self._win_events = 0
        self._win_channel = 0
        self._win_state = None
        self._win_events_over = False

    def _paused_ms(self) -> int | None:
        """Milliseconds left of a pause (too many bytes this second), or None."""
        if self._win_state != "pause":
            return None
        left = self._win_start + 1.0 - time.monotonic()
        return int(left * 1000) + 1 if left > 0 else None

    def _admit(self, data: bytes, now: float) -> tuple[bytes, bool]:
        """The part of `data` to parse, and whether discarding began inside `data`.

        Too many lines in a second: the rest of the second's lines are discarded unparsed
        (counting newlines costs next to nothing next to parsing, so a flood of small
        messages is cut before any of it is decoded). Too many bytes: this data is parsed,
        then nothing is read for the rest of the second (the agent waits, nothing is lost:
        the bytes are mostly big workload output, and a discarded line would be 64 KiB of
        it, or an exit)."""
        self._roll(now)
        if self._win_state == "discard":
            self._discard(data)
            return b"", False
        if self._resync:
            nl = data.find(b"\n")
            head = data if nl < 0 else data[:nl + 1]
            self._discard(head)
            data = data[len(head):]
        lines = data.count(b"\n")
        # channel lines have a budget of their own (a line that merely starts like one is
        # still parsed and judged as what it is)
        channel = data.count(b"\n" + CHANNEL_LINE_PREFIX) + (
            1 if data.startswith(CHANNEL_LINE_PREFIX) and not self._decoder.buffered else 0)
        channel = min(channel, lines)
        lines -= channel
        self._win_bytes += len(data)
        if self._win_messages + lines <= self.flood_messages and \
                self._win_channel + channel <= self.channel_lines_per_s:
            self._win_messages += lines
            self._win_channel += channel
            if self._win_bytes > self.flood_bytes:
                self._win_state = "pause"
                self._flood(now, f"{self._win_messages} lines and {self._win_bytes} bytes",
                            "nothing more is read until the second is over")
            return data, False
        seen = self._win_messages + lines
        if self._win_channel + channel > self.channel_lines_per_s:
            seen += self._win_channel + channel
            cut = 0  # which lines were the channel's is unknown unparsed: none is kept
        else:
            cut = _whole_lines(data, self.flood_messages - self._win_messages)
        keep = data[:cut]
        self._win_messages += keep.count(b"\n")
        self._discard(data[cut:])
        self._win_state = "discard"
        self._flood(now, f"{seen} lines and {self._win_bytes} bytes",
                    f"the rest of the second's input is discarded unparsed "
                    f"({self._flood_dropped} lines so far)")
        return keep, True

    def _flood(self, now: float, what: str, action: str) -> None:
        self._problem("flood", (
            f"{what} from the guest agent within {(now - self._win_start) * 1000:.0f} ms "
            f"(limits per second: {self.flood_messages} lines, {self.flood_bytes} bytes); "
            f"{action}"))

    def _discard(self, data: bytes) -> None:
        if data:
            self._flood_dropped += data.count(b"\n")
            self._flood_dropped_bytes += len(data)
            # where the discarded bytes stop inside a line, the next input begins with the
            # rest of it: that rest is junk, not a line of its own
            self._resync = not data.endswith(b"\n")

    def _ask_state(self) -> None:
        """After discarding: ask for a hello, whose list of running workloads tells whose
        exit was among the discarded lines (`_settle`)."""
        self._state_asked = f"s{next(self._ids)}"
        self._ping_for_hello(self._state_asked)

    def _settle(self, hello: Hello) -> None:
        """The agent lists a workload until its exit is written, and this hello came after
        every line written before it: a confirmed workload not listed and not finished
        here ended, and its exit was discarded."""
        listed = {wid for wid, _ in hello.workloads}
        with self._lock:
            works = [w for w in self._workloads.values()
                     if w._confirmed and w.poll() is None and w.id not in listed]
        if not works:
            return
        # reported before any waiter wakes: whoever sees the exit can already see why
        self._problem("flood", "the exit of {} was discarded in a flood: status unknown ({} "
                               "recorded)".format(_short(", ".join(w.id for w in works), 200),
                                                  MAX_STATUS))
        for work in works:
            work.exit_lost = True
            work.errors.insert(0, "its exit was discarded in a flood: the status is unknown")
            del work.errors[ERRORS_KEPT:]
            work._finish(MAX_STATUS)

    # -- problems --------------------------------------------------------------------------

    def _problem(self, kind: str, detail: str) -> None:
        """Count a problem and report it, unless PROBLEMS_PER_S of its kind were reported in
        this second already: then it is reported in a sum when the second is over (a flood
        of bad lines must not become a flood of anomaly rows)."""
        detail = _clip(detail)
        now = time.monotonic()
        summary = None
        with self._problem_lock:
            self._problem_counts[kind] += 1
            win = self._problem_windows.get(kind)
            if win is None or now - win.start >= 1.0:
                summary = win.summary(kind) if win is not None else None
                win = self._problem_windows[kind] = _Reports(now)
            report = win.reported < PROBLEMS_PER_S
            if report:
                win.reported += 1
            else:
                win.suppressed += 1
                win.last = detail
        if summary:
            self._report(kind, summary)
        if report:
            self._report(kind, detail)

    def _flush_problems(self, now: float) -> None:
        """Report the sums of seconds that are over."""
        due: list[tuple[str, str]] = []
        with self._problem_lock:
            for kind, win in self._problem_windows.items():
                if win.suppressed and now - win.start >= 1.0:
                    due.append((kind, win.summary(kind)))
                    win.suppressed = 0
        for kind, text in due:
            self._report(kind, text)

    def _report(self, kind: str, detail: str) -> None:
        log.warning("zone %s agent link: %s: %s", self.zone_id, kind, detail)
        handler = self.on_problem
        if handler is None:
            return
        try:
            handler(kind, detail)
        except Exception:
            self._log_failure(f"the on_problem handler ({kind})")

    def _log_failure(self, what: str) -> None:
        """Log the exception being handled, with its traceback for the 1st, 2nd, 4th, 8th...
        time only: a handler that fails on every message must not flood the log."""
        self._failures[what] += 1
        n = self._failures[what]
        if n & (n - 1) == 0:
            log.exception("zone %s agent link: %s failed (%d time(s) so far)",
                          self.zone_id, what, n)

    def _lose(self, reason: str) -> None:
        if self._shut(reason):
            self._problem("disconnected", reason)

    def _bad(self, detail: str) -> None:
        """A valid message whose content cannot be true."""
        with self._lock:
            self._malformed += 1
            self._last_seen = f"a bad message ({_clip(detail, 200)})"
        self._problem("malformed", detail)

    # -- the heartbeat watchdog ------------------------------------------------------------

    def _watchdog_ms(self) -> int:
        grace = self._grace()
        last = self._last_message
        if grace is None or last is None or self._heartbeat_lost:
            return 1000
        left_ms = (max(last, self._resumed_at) + grace - time.monotonic()) * 1000 + 1
        return max(10, int(min(1000.0, left_ms)))  # min first: int(inf) raises

    def _grace(self) -> float | None:
        if self.heartbeat_grace is not None:
            return self.heartbeat_grace
        hello = self._hello
        if hello is None:
            return None
        # an agent that names no period is still watched: silence is never fine for ever
        return HEARTBEAT_MISSES * (hello.heartbeat or MAX_HEARTBEAT)

    def _watchdog(self) -> None:
        now = time.monotonic()
        self._roll(now)
        self._flush_problems(now)
        grace = self._grace()
        last = self._last_message
        if grace is None or last is None or self._heartbeat_lost or self._win_state == "pause":
            return
        # a pause of ours is no silence of the agent's
        silent = now - max(last, self._resumed_at)
        if silent > grace:
            self._heartbeat_lost = True
            self._problem("heartbeat_lost",
                          f"no message from the guest agent for {silent:.1f} s "
                          f"(allowed {grace:g} s)")

    # -- messages --------------------------------------------------------------------------

    def _handle_safely(self, item: Message | ProtocolError) -> None:
        try:
            self._handle(item)
        except Exception:  # one bad message must not stop the rest
            self._log_failure("handling a message from the guest agent")

    def _handle(self, item: Message | ProtocolError) -> None:
        if isinstance(item, ProtocolError):
            with self._lock:
                self._malformed += 1
                self._last_seen = f"a bad line ({item.describe()})"
            self._problem("oversized" if item.kind == OVERSIZED else "malformed",
                          item.describe())
            return
        mtype: str = item["type"]
        seq: int = item["seq"]
        if seq > MAX_SEQ:
            self._bad(f"a {mtype} with seq {_short(seq)}, which no counter reaches: discarded")
            return
        now = time.monotonic()
        with self._lock:
            self._messages += 1
            self._last_message = now
            self._last_seen = f"{mtype} seq {seq}"
            resumed, self._heartbeat_lost = self._heartbeat_lost, False
        if resumed:
            log.info("zone %s: the guest agent speaks again", self.zone_id)
        restart = False
        if mtype == "hello" and self._hello is not None and item.get("id") is None \
                and self._seqs.last is not None and seq <= self._seqs.last:
            restart = True
            self._problem("agent_restart", f"the guest agent said hello again with seq {seq} "
                                           f"(pid {_short(item.get('pid'))}): it restarted")
        gap = self._seqs.observe(seq, restart=restart)
        if gap > 0:
            self._problem("seq_gap", f"{gap} message(s) from the guest agent never arrived "
                                     f"(before seq {seq}, a {mtype})")
        elif gap < 0:
            self._problem("seq_regress", f"seq went back to {seq} ({mtype})")
        if mtype != "hello" and self._hello is None and self._hello_asked is None:
            # the agent greeted an earlier connection: ask it for a hello
            self._hello_asked = f"h{next(self._ids)}"
            self._ping_for_hello(self._hello_asked)
        getattr(self, f"_on_{mtype}")(item, now)

    def _ping_for_hello(self, mid: str) -> None:
        """Send a ping asking for a hello, from a thread: the reader never blocks on a write."""
        if self._closed:
            return

        def ask() -> None:
            with contextlib.suppress(ZoneError):
                self._send({"type": "ping", "id": mid, "hello": True}, 5.0)

        threading.Thread(target=ask, name="agent-link-ask-hello", daemon=True).start()

    def _answer(self, mid: str, msg: Message, error: str | None = None) -> bool:
        """Answer the request `mid`, if one waits for it: True if one did."""
        with self._lock:
            pending = self._pending.get(mid)
        if pending is None or pending.done.is_set():
            return False
        mtype = msg["type"]
        if mtype not in ("error", pending.expect):
            self._bad(f"a {mtype} answered request {_short(mid)}, which waits for a "
                      f"{pending.expect}")
            pending.answer(error=f"the guest agent answered with a {mtype} message instead "
                                 f"of a {pending.expect}")
            return True
        pending.answer(msg, error)
        return True

    def _on_hello(self, msg: Message, now: float) -> None:
        wrong = _heartbeat_period(msg.get("heartbeat"))[1]
        if wrong:
            self._bad(wrong)
        bad_pids = [w["id"] for w in msg.get("workloads") or () if not _pid_ok(w["pid"])]
        if bad_pids:
            self._bad(f"hello lists workloads with impossible pids: "
                      f"{_short(', '.join(bad_pids), 200)} (pid 0 recorded)")
        hello = Hello.from_message(msg, now)
        with self._changed:
            first = self._hello is None
            self._hello = hello
            self._changed.notify_all()
        if self._state_asked is not None and msg.get("id") == self._state_asked:
            self._state_asked = None
            self._settle(hello)
        if first:
            log.info("zone %s: guest agent %s (protocol %s, python %s, kernel %s) after %s ms "
                     "of guest uptime", self.zone_id, _short(hello.agent_version),
                     _short(hello.protocol), _short(hello.python), _short(hello.kernel),
                     _short(hello.boot_ms))

    def _on_heartbeat(self, msg: Message, now: float) -> None:
        mid = msg.get("id")
        if mid is not None:
            self._answer(mid, msg)

    def _workload(self, msg: Message) -> RemoteWorkload | None:
        with self._lock:
            return self._workloads.get(msg["id"])

    def _on_started(self, msg: Message, now: float) -> None:
        mid, pid = msg["id"], msg["pid"]
        if not _pid_ok(pid):
            self._bad(f"started {_short(mid)} with pid {_short(pid)}, which no guest process "
                      "has (pid 0 recorded)")
            pid = 0
        work = self._workload(msg)
        if work is not None:
            if work.started_at is not None:  # the first pid stands: a second may be a lie
                self._bad(f"a second started for workload {_short(mid)}: ignored")
                return
            work._on_started(pid)
            note = msg.get("standby")
            if note is not None:
                work.standby = {k: note.get(k) for k in ("used", "id", "pid", "prepared",
                                                          "mode", "reason")}
        self._answer(mid, msg)

    def _on_standby_ready(self, msg: Message, now: float) -> None:
        if not _pid_ok(msg["pid"]):
            self._bad(f"standby {_short(msg['id'])} ready with pid {_short(msg['pid'])}, "
                      "which no guest process has")
        if not self._answer(msg["id"], msg):
            log.info("zone %s: standby %s ready, which nobody waits for", self.zone_id,
                     _short(msg["id"]))

    def _on_output(self, msg: Message, now: float) -> None:
        work = self._workload(msg)
        if work is not None and work.poll() is None:
            work._on_output(msg["stream"], msg["data"])

    def _on_exit(self, msg: Message, now: float) -> None:
        mid, status = msg["id"], msg["status"]
        if not MIN_STATUS <= status <= MAX_STATUS:
            self._bad(f"exit of {_short(mid)} with status {_short(status)}, which no process "
                      f"has ({MAX_STATUS} recorded)")
            status = MAX_STATUS
        with self._lock:
            work = self._workloads.get(mid)
            if work is None:
                self._unclaimed[mid] = status
                while len(self._unclaimed) > UNCLAIMED_KEEP:
                    self._unclaimed.popitem(last=False)
        if work is None:
            return
        if work.poll() is not None:  # the first status stands: a repeat may not rewrite it
            log.debug("zone %s: repeated exit of %s", self.zone_id, mid)
            return
        work._finish(status)

    def _on_probe_result(self, msg: Message, now: float) -> None:
        error = None if msg["ok"] else _clip(msg["error"])
        if not self._answer(msg["id"], msg, error):
            log.debug("late probe result %s", _short(msg["id"]))

    def _on_error(self, msg: Message, now: float) -> None:
        mid = msg.get("id")
        text = _clip(msg["message"])
        if mid is not None and self._answer(mid, msg, text):
            return
        with self._lock:
            work = self._workloads.get(mid) if mid is not None else None
        if work is not None:
            work.errors.insert(0, text)
            del work.errors[ERRORS_KEPT:]
        self._problem("agent_error", text if mid is None else f"{mid}: {text}")

    def _on_channel_send(self, msg: Message, now: float) -> None:
        self._channel(msg)

    def _on_channel_ack(self, msg: Message, now: float) -> None:
        self._channel(msg)

    def _channel(self, msg: Message) -> None:
        handler = self.on_channel
        if handler is None:
            self._bad(f"a {msg['type']} from an agent whose zone has no channel: discarded")
            return
        try:
            handler(msg)
        except ChannelFault as e:
            self._bad(f"channel: {e}")
        except Exception:
            self._log_failure("the on_channel handler")

    def report_bad(self, detail: str) -> None:
        """A message found unusable after the reader passed it on (a channel message that
        never finished): counted and reported as malformed."""
        self._bad(detail)

    def _on_event(self, msg: Message, now: float) -> None:
        self._win_events += 1
        if self._win_events > self.events_per_s:
            self._events_dropped += 1
            if not self._win_events_over:
                self._win_events_over = True
                self._problem("events_dropped", (
                    f"more than {self.events_per_s} monitoring events within one second: the "
                    f"rest of this second's are dropped ({self._events_dropped} dropped so far "
                    "on this link)"))
            return
        # the handler gets the shape it was promised, whatever the agent put there
        if msg.get("data") is None:
            msg["data"] = {}
        when = msg.get("time")
        if when is None:
            msg.pop("time", None)
        elif not _epoch_ok(when):
            self._bad(f"event {_short(msg['kind'])} with time {_short(when)}, which is no "
                      "time: removed")
            del msg["time"]
        handler = self.on_event
        if handler is not None:
            try:
                handler(msg)
            except Exception:
                self._log_failure("the on_event handler")


@dataclass
class _Reports:
    """One problem kind's reports in the second that began at `start`."""

    start: float
    reported: int = 0
    suppressed: int = 0
    last: str = ""

    def summary(self, kind: str) -> str | None:
        if not self.suppressed:
            return None
        return (f"{self.suppressed} more {kind} problem(s) within one second, counted but not "
                f"reported one by one (the last: {self.last})")


def _whole_lines(data: bytes, max_lines: int) -> int:
    """Length of the longest start of `data` made of at most `max_lines` whole lines."""
    end = 0
    for _ in range(max(0, max_lines)):
        nl = data.find(b"\n", end)
        if nl < 0:
            break
        end = nl + 1
    return end


def _epoch_ok(when: Any) -> bool:
    """A time datetime can take: json reads 1e400 as inf, and a float beyond year 9999 makes
    fromtimestamp raise in whoever reads the event."""
    try:
        return 0 <= when <= MAX_EPOCH
    except TypeError:
        return False
