"""The host's end of the guest agent link: one unix stream socket per guest.

libvirt binds the socket of the domain's `<channel type='unix'>` (target name
`org.hvtsm.agent.0`); `AgentLink.connect` connects to it as a client, and the agent inside
the guest reads and writes the matching virtio-serial port. The wire protocol is
`guest_agent.protocol` (JSON lines), shared with the agent.

One reader thread per link decodes everything the agent sends, answers waiting requests
(matched by id), feeds workload output to its destinations and watches the agent's health:
malformed or oversized lines, gaps in `seq`, silence longer than 3 heartbeat periods and a
closed channel are each counted and reported through `on_problem(kind, detail)` (the
manager turns those into anomalies). Nothing it reads can crash it. Every wait is bounded
and every failure a `ZoneError` naming the zone.

Workload output never blocks the reader: each destination (a pipe the caller reads, or a
file descriptor such as the CLI's own stdout) gets its own writer thread, with at most
`SINK_LIMIT` bytes waiting; beyond that output is dropped, counted and reported.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
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
    OVERSIZED,
    PROTOCOL_VERSION,
    Decoder,
    Message,
    ProtocolError,
    SeqTracker,
    encode,
)
from hvtsm.errors import ZoneError

log = logging.getLogger(__name__)

#: (kind, detail): malformed, oversized, seq_gap, seq_regress, heartbeat_lost, agent_restart,
#: agent_error, output_dropped, disconnected
ProblemHandler = Callable[[str, str], None]
EventHandler = Callable[[Message], None]

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
            heartbeat=float(msg["heartbeat"]) if msg.get("heartbeat") else None,
            hostname=msg.get("hostname"), port=msg.get("port"),
            workloads=tuple((w["id"], w["pid"]) for w in msg.get("workloads") or ()),
            seq=msg["seq"], received=received)


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


def _sink_for(target: int | None, label: str) -> tuple[_Sink | None, IO[bytes] | None]:
    """subprocess-style target -> (sink, readable file for the caller)."""
    if target is None or target == subprocess.DEVNULL:
        return None, None
    if target == subprocess.PIPE:
        r, w = os.pipe2(os.O_CLOEXEC)
        return _Sink(w, owned=True, label=label), open(r, "rb")
    _check_target(target)
    assert target is not None
    return _Sink(target, owned=False, label=label), None


class RemoteWorkload:
    """A workload the agent runs in the guest; satisfies `hvtsm.zones.base.Workload`.

    `pid` is the guest's pid. `stdout`/`stderr` are readable binary files when the start
    asked for PIPE (they reach EOF after the exit), else None.
    """

    def __init__(self, link: AgentLink, workload_id: str, argv: Sequence[str], *,
                 stdout: int | None, stderr: int | None) -> None:
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
                target, f"{link.zone_id or 'guest'}-{workload_id}-{stream}")
        self._pid = 0
        self._status: int | None = None
        self._exited = threading.Event()
        #: time.monotonic() of the agent's `started`
        self.started_at: float | None = None
        #: what the agent said went wrong with this workload, last first
        self.errors: list[str] = []
        #: the link went away while the workload ran: its exit status is unknown
        self.link_lost = False
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
    def __init__(self) -> None:
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
                 on_event: EventHandler | None = None) -> None:
        self.zone_id = zone_id
        self.describe = describe
        #: seconds of silence before heartbeat_lost (default: 3 of the agent's periods)
        self.heartbeat_grace = heartbeat_grace
        self.on_problem: ProblemHandler | None = on_problem
        #: monitoring events (`event` messages) as they arrive
        self.on_event: EventHandler | None = on_event
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
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._reader = threading.Thread(target=self._read_loop,
                                        name=f"agent-link-{zone_id or describe}", daemon=True)
        self._reader.start()

    # -- making one ------------------------------------------------------------------------

    @classmethod
    def connect(cls, path: str, *, timeout: float, zone_id: str | None = None,
                heartbeat_grace: float | None = None,
                on_problem: ProblemHandler | None = None,
                on_event: EventHandler | None = None) -> AgentLink:
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
                       on_problem=on_problem, on_event=on_event)

    @classmethod
    def from_socket(cls, sock: socket.socket, *, zone_id: str | None = None,
                    heartbeat_grace: float | None = None,
                    on_problem: ProblemHandler | None = None,
                    on_event: EventHandler | None = None) -> AgentLink:
        """A link over a socket that is already connected (tests, relays)."""
        return cls(sock, zone_id=zone_id, describe="socket", heartbeat_grace=heartbeat_grace,
                   on_problem=on_problem, on_event=on_event)

    # -- state -----------------------------------------------------------------------------

    @property
    def hello(self) -> Hello | None:
        return self._hello

    @property
    def malformed(self) -> int:
        """Malformed, oversized or ill-typed lines received (each also an on_problem)."""
        return self._malformed

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
                f"the guest agent {hello.agent_version} speaks protocol {hello.protocol}, "
                f"this controller {PROTOCOL_VERSION}",
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

    def _request(self, key: str) -> _Pending:
        pending = _Pending()
        with self._lock:
            if self._closed:
                raise self._error(f"the guest agent link is closed "
                                  f"({self._lost_reason or 'closed by the controller'})")
            self._pending[key] = pending
        return pending

    def _forget(self, key: str) -> None:
        with self._lock:
            self._pending.pop(key, None)

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | None = None, user: str | int | None = None, timeout: float = 30,
              stdout: int | None = subprocess.PIPE, stderr: int | None = subprocess.PIPE,
              workload_id: str | None = None,
              monitor: Mapping[str, Any] | None = None) -> RemoteWorkload:
        """Start `argv` in the guest (own session and process group, stdin /dev/null) and
        return once it exec'd. Output goes, per stream: PIPE -> a pipe the caller reads
        (`workload.stdout`), a file descriptor >= 0 -> written there (not closed), None or
        DEVNULL -> discarded; stderr=STDOUT joins stdout. `env` goes on top of a small clean
        environment in the guest (PATH, HOME, LANG, TERM). `monitor` is the workload's
        monitoring profile (`guest_agent.protocol.PROFILE_FIELDS`): sent with the start so
        the agent watches the process tree from its first instruction."""
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
        # what nobody reads is not sent: the agent discards (or joins) it at the source
        if stdout is None or stdout == subprocess.DEVNULL:
            msg["stdout"] = "discard"
        if stderr == subprocess.STDOUT:
            msg["stderr"] = "stdout"
        elif stderr is None or stderr == subprocess.DEVNULL:
            msg["stderr"] = "discard"
        pending = self._request(wid)
        work = RemoteWorkload(self, wid, argv, stdout=stdout, stderr=stderr)
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
            self._abandon(work, kill=False)
            raise self._error(f"cannot start {argv[0]} in the guest: {pending.error}")
        return work

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
        pending = self._request(pid)
        try:
            self._send({"type": "probe", "id": pid, "kind": kind, "args": params}, wait)
            if not pending.done.wait(wait):
                raise self._error(f"no answer to the {kind} probe within {wait:g} s; "
                                  f"{self._seen()}")
        finally:
            self._forget(pid)
        if pending.error is not None:
            raise self._error(f"probe {kind} failed in the guest: {pending.error}")
        assert pending.reply is not None
        result: dict[str, Any] = pending.reply["result"]
        return result

    def ping(self, timeout: float = 5.0) -> float:
        """Round trip to the agent and back, seconds."""
        pid = f"k{next(self._ids)}"
        pending = self._request(pid)
        began = time.monotonic()
        try:
            self._send({"type": "ping", "id": pid}, timeout)
            if not pending.done.wait(timeout):
                raise self._error(f"no answer to a ping within {timeout:g} s; {self._seen()}")
        finally:
            self._forget(pid)
        if pending.error is not None:
            raise self._error(f"ping failed: {pending.error}")
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
        that has exited."""
        with self._lock:
            work = self._workloads.get(workload_id)
        if work is None:
            raise self._error(f"no workload {workload_id} on this link")
        if work.poll() is not None:
            return
        self._send({"type": "profile", "id": workload_id, "monitor": _plain(monitor)})

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
        poller.register(self._sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._closed:
                try:
                    events = poller.poll(self._watchdog_ms())
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
            with self._lock:
                with contextlib.suppress(OSError):
                    self._sock.close()
                for fd in (self._wake_r, self._wake_w):
                    with contextlib.suppress(OSError):
                        os.close(fd)
                self._wake_r = self._wake_w = -1

    def _read_some(self) -> None:
        try:
            data = self._sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lose(f"reading the channel failed: {e}")
            return
        if not data:
            for item in self._decoder.close():
                self._handle(item)
            self._lose("the guest agent channel closed (the domain stopped, or QEMU closed "
                       "the channel)")
            return
        with self._lock:
            self._bytes_in += len(data)
        for item in self._decoder.feed(data):
            try:
                self._handle(item)
            except Exception:  # one bad message must not stop the rest
                log.exception("handling %r from the guest agent", item)

    def _lose(self, reason: str) -> None:
        if self._shut(reason):
            self._problem("disconnected", reason)

    def _problem(self, kind: str, detail: str) -> None:
        log.warning("zone %s agent link: %s: %s", self.zone_id, kind, detail)
        handler = self.on_problem
        if handler is None:
            return
        try:
            handler(kind, detail)
        except Exception:
            log.exception("on_problem handler failed for %s", kind)

    def _watchdog_ms(self) -> int:
        grace = self._grace()
        last = self._last_message
        if grace is None or last is None or self._heartbeat_lost:
            return 1000
        left = last + grace - time.monotonic()
        return max(10, min(1000, int(left * 1000) + 1))

    def _grace(self) -> float | None:
        if self.heartbeat_grace is not None:
            return self.heartbeat_grace
        hello = self._hello
        if hello is None or not hello.heartbeat:
            return None
        return HEARTBEAT_MISSES * hello.heartbeat

    def _watchdog(self) -> None:
        grace = self._grace()
        last = self._last_message
        if grace is None or last is None or self._heartbeat_lost:
            return
        silent = time.monotonic() - last
        if silent > grace:
            self._heartbeat_lost = True
            self._problem("heartbeat_lost",
                          f"no message from the guest agent for {silent:.1f} s "
                          f"(allowed {grace:g} s)")

    def _handle(self, item: Message | ProtocolError) -> None:
        if isinstance(item, ProtocolError):
            with self._lock:
                self._malformed += 1
                self._last_seen = f"a bad line ({item.describe()})"
            self._problem("oversized" if item.kind == OVERSIZED else "malformed",
                          item.describe())
            return
        now = time.monotonic()
        mtype: str = item["type"]
        seq: int = item["seq"]
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
                                           f"(pid {item.get('pid')}): it restarted")
        gap = self._seqs.observe(seq, restart=restart)
        if gap > 0:
            self._problem("seq_gap", f"{gap} message(s) from the guest agent never arrived "
                                     f"(before seq {seq}, a {mtype})")
        elif gap < 0:
            self._problem("seq_regress", f"seq went back to {seq} ({mtype})")
        if mtype != "hello" and self._hello is None:
            self._ask_hello()
        getattr(self, f"_on_{mtype}")(item, now)

    def _ask_hello(self) -> None:
        """A message came before any hello (the agent greeted an earlier connection):
        ask for one. Sent from a thread, since the reader must never block on a write."""
        if self._hello is not None or self._hello_asked is not None or self._closed:
            return
        self._hello_asked = f"h{next(self._ids)}"

        def ask() -> None:
            with contextlib.suppress(ZoneError):
                self._send({"type": "ping", "id": self._hello_asked, "hello": True}, 5.0)

        threading.Thread(target=ask, name="agent-link-ask-hello", daemon=True).start()

    def _on_hello(self, msg: Message, now: float) -> None:
        hello = Hello.from_message(msg, now)
        with self._changed:
            first = self._hello is None
            self._hello = hello
            self._changed.notify_all()
        if first:
            log.info("zone %s: guest agent %s (protocol %d, python %s, kernel %s) after %d ms "
                     "of guest uptime", self.zone_id, hello.agent_version, hello.protocol,
                     hello.python, hello.kernel, hello.boot_ms)

    def _on_heartbeat(self, msg: Message, now: float) -> None:
        mid = msg.get("id")
        if mid is not None:
            with self._lock:
                pending = self._pending.get(mid)
            if pending is not None:
                pending.answer(msg)

    def _workload(self, msg: Message) -> RemoteWorkload | None:
        with self._lock:
            return self._workloads.get(msg["id"])

    def _on_started(self, msg: Message, now: float) -> None:
        work = self._workload(msg)
        if work is not None:
            work._on_started(msg["pid"])
        with self._lock:
            pending = self._pending.get(msg["id"])
        if pending is not None:
            pending.answer(msg)

    def _on_output(self, msg: Message, now: float) -> None:
        work = self._workload(msg)
        if work is not None and work.poll() is None:
            work._on_output(msg["stream"], msg["data"])

    def _on_exit(self, msg: Message, now: float) -> None:
        with self._lock:
            work = self._workloads.get(msg["id"])
            if work is None:
                self._unclaimed[msg["id"]] = msg["status"]
                while len(self._unclaimed) > UNCLAIMED_KEEP:
                    self._unclaimed.popitem(last=False)
        if work is not None:
            work._finish(msg["status"])

    def _on_probe_result(self, msg: Message, now: float) -> None:
        with self._lock:
            pending = self._pending.get(msg["id"])
        if pending is None:
            log.debug("late probe result %s", msg["id"])
        elif msg["ok"]:
            pending.answer(msg)
        else:
            pending.answer(msg, error=msg["error"])

    def _on_error(self, msg: Message, now: float) -> None:
        mid = msg.get("id")
        text = msg["message"]
        with self._lock:
            pending = self._pending.get(mid) if mid is not None else None
            work = self._workloads.get(mid) if mid is not None else None
        if pending is not None:
            pending.answer(msg, error=text)
            return
        if work is not None:
            work.errors.insert(0, text)
        self._problem("agent_error", text if mid is None else f"{mid}: {text}")

    def _on_event(self, msg: Message, now: float) -> None:
        handler = self.on_event
        if handler is not None:
            try:
                handler(msg)
            except Exception:
                log.exception("on_event handler failed")
