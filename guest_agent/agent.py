"""The guest agent: serves the host's requests over one port (see port.py) and keeps it
informed (hello, heartbeats, workload output and exits, probe results).

Threads: the main thread reads the port and dispatches requests (never blocking on one);
a writer thread owns the port's write side and numbers messages (``seq``) as it sends
them; a heartbeat thread; three per workload (two output pumps, one waiter); one per
running probe (at most MAX_PROBES); the monitor's two (monitor.py: its poll loop answers
seccomp notifications and fanotify events, its sampler reads /proc); the channel
endpoint's (endpoint.py: one accepting, one per client connection).

A ``start`` with ``monitor`` runs the workload under watch: the profile is validated first
(a bad one is an error reply, nothing starts), seccomp user notification must be available
(else the start is refused: fail closed), and the child installs the filter after the user
switch, just before its exec, handing the listener to the monitor (seccomp.py). Monitor
events (anomaly, monitor, stats) go on the urgent lane.

Outgoing messages wait in an Outbox with three lanes: *urgent* (hello answers, heartbeats,
started, probe results, errors, monitor events) always goes first; *normal* (output, exit)
keeps its order, so a workload's ``exit`` follows its last ``output``; *channel* (the
workload's messages to other zones, acknowledgements) takes turns with normal, holds at
most CHANNEL_QUEUE bytes (a sending client waits for room) and is paced to
CHANNEL_LINES_PER_S, below the host's own budget for channel lines, so a busy channel
never makes the host discard anything else. While the host is absent (a
virtio port whose host end nobody holds) nothing is written: heartbeats are not made,
control messages queue (at most MAX_QUEUED, beyond that they are discarded and their seq
numbers skipped so the host sees the gap), and workload output queues up to OUTPUT_QUEUE
bytes, after which the output pumps stop reading and the workload blocks on its full pipe
(output is never discarded). When the host (re)connects the writer first sends a fresh
hello (listing still-running workloads), then the queue.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Any

from guest_agent import __version__, fanotify, seccomp
from guest_agent.endpoint import Endpoint
from guest_agent.monitor import Monitor
from guest_agent.port import Disconnected, Port, PortUnavailable, Stopped, make_port
from guest_agent.probes import PROBES
from guest_agent.profile import Profile, ProfileError
from guest_agent.protocol import (
    HOST_TYPES,
    PORT_NAME,
    PROTOCOL_VERSION,
    Decoder,
    Message,
    ProtocolError,
    encode,
)
from guest_agent.standby import LOADER, Standby, StandbyError, request_socket
from guest_agent.workload import (
    AGENT_NICE,
    StartError,
    Workload,
    build_env,
    default_cwd,
    lookup_user,
    spawn,
)

log = logging.getLogger("guest_agent")

CAPABILITIES = ["start", "signal", "ping"] + ["probe:" + k for k in sorted(PROBES)] + [
    "events:anomaly", "events:monitor", "events:stats", "events:code-path",
    "events:transient", "transient", "channel", "standby"]
MAX_PROBES = 8
MAX_QUEUED = 10000
OUTPUT_QUEUE = 1 << 20
CHANNEL_QUEUE = 2 << 20
#: channel lines written per second at most (the host's reader allows twice as many)
CHANNEL_LINES_PER_S = 2000

URGENT = 0
NORMAL = 1
CHANNEL = 2
Lane = collections.deque[tuple[Message, int]]


def uptime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Outbox:
    """Messages waiting for the writer; see the module docstring."""

    def __init__(self, output_limit: int = OUTPUT_QUEUE, max_items: int = MAX_QUEUED,
                 channel_limit: int = CHANNEL_QUEUE,
                 channel_lines_per_s: int = CHANNEL_LINES_PER_S) -> None:
        self.output_limit = output_limit
        self.max_items = max_items
        self.channel_limit = channel_limit
        self.channel_lines_per_s = channel_lines_per_s
        self._cond = threading.Condition()
        #: (urgent, normal, channel) lanes of (message, bytes it accounts for)
        self._lanes: tuple[Lane, Lane, Lane] = (collections.deque(), collections.deque(),
                                                collections.deque())
        self.output_bytes = 0
        self.channel_bytes = 0
        #: normal and channel take turns: the one served last waits
        self._last_shared = CHANNEL
        self._pace_start = 0.0
        self._pace_lines = 0
        #: messages discarded since the agent started
        self.dropped = 0
        #: of those, how many no seq number has been skipped for yet
        self.gap = 0
        self.heartbeat_waiting = False
        self.closed = False

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
            if msg.get("type") == "heartbeat" and "id" not in msg:
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

    def _paced(self) -> bool:
        """True while this second's channel lines are used up."""
        now = time.monotonic()
        if now - self._pace_start >= 1.0:
            self._pace_start, self._pace_lines = now, 0
        return self._pace_lines >= self.channel_lines_per_s

    def get(self, timeout: float) -> tuple[int, Message, int] | None:
        with self._cond:
            if not len(self):
                self._cond.wait(timeout)
            shared = (NORMAL, CHANNEL) if self._last_shared == CHANNEL else (CHANNEL, NORMAL)
            for lane in (URGENT, *shared):
                if not self._lanes[lane]:
                    continue
                if lane == CHANNEL:
                    if self._paced():
                        continue
                    self._pace_lines += 1
                if lane != URGENT:
                    self._last_shared = lane
                msg, size = self._lanes[lane].popleft()
                if msg.get("type") == "heartbeat" and "id" not in msg:
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

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


def capabilities(permission_events: bool = True) -> list[str]:
    """CAPABILITIES plus the monitoring mechanisms that work here."""
    out = list(CAPABILITIES)
    if seccomp.available() is None:
        out.append("monitor:seccomp")
    if fanotify.available(permission_events) is None:
        out.append("monitor:fanotify")
    return out


class Agent:
    def __init__(self, port: Port, *, heartbeat: float = 1.0,
                 watch_fd: int | None = None, channel_fd: int | None = None) -> None:
        self.port = port
        self.heartbeat = heartbeat
        # on the host (--watch-fd) a stuck agent must not hold other programs' opens:
        # fanotify only reports there; in the guest it answers each sensitive open
        self.host_mode = watch_fd is not None
        self.monitor = Monitor(self._emit, permission_events=watch_fd is None,
                               system_counter=watch_fd is None)
        if watch_fd is not None:
            self.monitor.attach_socket(socket.socket(fileno=watch_fd))
        self._capabilities = capabilities(watch_fd is None)
        self.stop = threading.Event()
        self.outbox = Outbox()
        self.workloads: dict[str, Workload] = {}
        self._wl_lock = threading.Lock()
        #: the one prepared standby (standby.py); a new one replaces it
        self.standby: Standby | None = None
        self._probes = threading.BoundedSemaphore(MAX_PROBES)
        self._seq = 0
        self.threads: list[threading.Thread] = []
        self.endpoint = Endpoint(lambda m, size: self.outbox.put_channel(m, size, self.stop),
                                 self.stop)
        #: host mode: an inherited SOCK_SEQPACKET socket on which the controller hands over
        #: the listening channel socket it bound in the zone's network namespace
        self._channel_hand = None if channel_fd is None else socket.socket(fileno=channel_fd)

    # --- outgoing ---------------------------------------------------------------------

    def hello(self, reply_to: str | None = None) -> Message:
        uname = os.uname()
        with self._wl_lock:
            running = [{"id": w.id, "pid": w.pid} for w in self.workloads.values()]
        msg: Message = {
            "type": "hello", "protocol": PROTOCOL_VERSION, "agent_version": __version__,
            "capabilities": list(self._capabilities), "pid": os.getpid(), "kernel": uname.release,
            "python": "{}.{}.{}".format(*sys.version_info[:3]),
            "boot_ms": int(uptime() * 1000), "heartbeat": self.heartbeat,
            "hostname": uname.nodename, "port": self.port.describe, "workloads": running,
            "dropped": self.outbox.dropped,
        }
        if reply_to is not None:
            msg["id"] = reply_to
        return msg

    def _heartbeat_msg(self, reply_to: str | None = None) -> Message:
        msg: Message = {"type": "heartbeat", "uptime": round(uptime(), 3),
                        "dropped": self.outbox.dropped, "queued": self.outbox.output_bytes}
        if reply_to is not None:
            msg["id"] = reply_to
        return msg

    def send(self, msg: Message, lane: int = URGENT) -> None:
        self.outbox.put(msg, lane)

    def _emit(self, kind: str, workload_id: str, data: dict) -> bool:
        """The monitor's events go on the urgent lane: an anomaly must not wait behind
        output. False when the outbox was full (the monitor counts it as dropped)."""
        return self.outbox.put({"type": "event", "kind": kind, "id": workload_id,
                                "time": time.time(), "data": data}, URGENT)

    def _encode(self, msg: Message) -> bytes:
        try:
            return encode(msg)
        except ProtocolError as e:  # a result too large, or a bug: say so instead
            log.warning("cannot send %s: %s", msg.get("type"), e)
            repl: Message = {"type": "error", "seq": msg["seq"], "kind": e.kind,
                             "message": "agent could not send its {} message: {}".format(
                                 msg.get("type"), e.detail)}
            if isinstance(msg.get("id"), str):
                if msg.get("type") == "probe_result":
                    repl = {"type": "probe_result", "seq": msg["seq"], "id": msg["id"],
                            "ok": False, "error": repl["message"]}
                else:
                    repl["id"] = msg["id"]
            return encode(repl)

    def _write(self, msg: Message, generation: int, prefix: bytes = b"") -> bool:
        """Number `msg` and send it. Discarded messages skip their numbers here, though
        never in a hello: the host takes a hello's seq as its base and would miss the gap."""
        with self.outbox._cond:
            gap = self.outbox.gap if msg["type"] != "hello" else 0
        seq = self._seq + gap
        data = prefix + self._encode(dict(msg, seq=seq))
        try:
            self.port.write(data, generation, self.stop)
        except (Disconnected, Stopped):
            return False
        self._seq = seq + 1
        with self.outbox._cond:
            self.outbox.gap -= gap
        if msg["type"] == "exit":
            self._forget_workload(msg["id"])
        return True

    def _writer(self) -> None:
        greeted = 0
        while not self.stop.is_set():
            generation = self.port.wait_generation(self.stop, 0.5)
            if generation is None:
                continue
            if generation != greeted:
                # the blank line ends whatever a torn write left on the host's side
                if self._write(self.hello(), generation, prefix=b"\n"):
                    greeted = generation
                continue
            item = self.outbox.get(0.2)
            if item is None:
                continue
            lane, msg, size = item
            if not self._write(msg, generation):
                self.outbox.put_back(lane, msg, size)

    def _orphan_watch(self) -> None:
        """Beside a cgroup zone: once the controller that started us is gone and nothing
        is watched, no one will need us (a controller that resumes only looks for agents
        that watch a zone)."""
        parent = os.getppid()
        while not self.stop.wait(1.0):
            if os.getppid() != parent and not self.monitor.stats()["watching"]:
                log.info("controller gone and nothing to watch: exiting")
                self.stop.set()
                self.port.close()

    def _heartbeats(self) -> None:
        while not self.stop.wait(self.heartbeat):
            if self.port.connected:
                self.send(self._heartbeat_msg())

    # --- incoming ---------------------------------------------------------------------

    def dispatch(self, item: Any) -> None:
        """One decoder item; never raises."""
        try:
            if isinstance(item, ProtocolError):
                log.warning("bad message from the host: %s", item.describe())
                reply: Message = {"type": "error", "kind": item.kind,
                                  "message": "rejected a host message: " + item.describe()}
                if item.msg_id is not None:
                    reply["id"] = item.msg_id
                self.send(reply)
                return
            handler = getattr(self, "_on_" + item["type"])
            handler(item)
        except Exception as e:  # never let one request end the agent
            log.exception("handling %r", item)
            mtype = item.get("type") if isinstance(item, dict) else None
            mid = item.get("id") if isinstance(item, dict) else None
            self._error(mid if isinstance(mid, str) else None,
                        f"agent failed on a {mtype} request: {e}")

    def _error(self, mid: str | None, text: str) -> None:
        msg: Message = {"type": "error", "message": text}
        if mid is not None:
            msg["id"] = mid
        self.send(msg)

    def _on_ping(self, msg: Message) -> None:
        if msg.get("hello"):
            self.send(self.hello(reply_to=msg.get("id")))
        else:
            self.send(self._heartbeat_msg(reply_to=msg.get("id")))

    def _on_start(self, msg: Message) -> None:
        wid = msg["id"]
        with self._wl_lock:
            if wid in self.workloads:
                self._error(wid, f"workload id {wid} is already in use")
                return
        preexec = None
        env = msg.get("env")
        if msg.get("channel") is not None:
            try:
                env = self._channel_env(msg["channel"], env)
            except OSError as e:
                self._error(wid, f"workload {wid} not started: no channel endpoint: {e}")
                return
        note: Message | None = None
        if msg.get("standby") is None and msg.get("monitor") is not None:
            with self._wl_lock:
                idle, self.standby = self.standby, None
            if idle is not None:
                self._drop_standby(idle)
        if msg.get("standby") is not None:
            try:
                popen, note = self._from_standby(wid, msg, env)
            except (ProfileError, StartError) as e:
                self._error(wid, f"workload {wid} not started: {e}")
                return
            if popen is not None:
                self._begin(wid, popen, msg, note)
                return
        if msg.get("monitor") is not None:
            try:
                preexec = self._watcher(wid, msg["monitor"])
            except (ProfileError, StartError) as e:
                self._error(wid, f"workload {wid} not started: {e}")
                return
        try:
            popen = spawn(msg["argv"], env, msg.get("cwd"), msg.get("user"),
                          stdout=msg.get("stdout", "stream"), stderr=msg.get("stderr", "stream"),
                          preexec_fn=preexec)
        except StartError as e:
            self._error(wid, str(e))
            return
        self._begin(wid, popen, msg, note)

    def _begin(self, wid: str, popen: Any, msg: Message, note: Message | None) -> None:
        work = Workload(wid, popen, lambda m: self.outbox.put(m, NORMAL),
                        lambda m, size: self.outbox.put_output(m, size, self.stop),
                        self._ended)
        with self._wl_lock:
            self.workloads[wid] = work
        started: Message = {"type": "started", "id": wid, "pid": popen.pid}
        if note is not None:
            started["standby"] = note
        self.send(started)
        log.info("started %s (pid %d%s): %s", wid, popen.pid,
                 ", from standby" if note and note.get("used") else "",
                 " ".join(msg["argv"])[:200])
        work.begin()

    # --- standbys (standby.py) ----------------------------------------------------------

    def _on_standby(self, msg: Message) -> None:
        """Prepare a standby: refused at once when its profile or user is bad, else started
        watched on a thread of its own (the loader's start must not hold the reader), and
        announced with ``standby_ready`` once its loader is ready."""
        sid = msg["id"]
        mode = msg["mode"]
        python = msg.get("python") or "python3"
        program = msg.get("program") if mode == "exec" else python
        if not program:
            self._error(sid, f"standby {sid} not prepared: exec mode needs a program")
            return
        try:
            preexec = self._watcher(sid, msg["monitor"])
            entry = lookup_user(msg["user"]) if msg.get("user") is not None else None
        except (ProfileError, StartError) as e:
            self._error(sid, f"standby {sid} not prepared: {e}")
            return
        with self._wl_lock:
            busy = sid in self.workloads
            old, self.standby = self.standby, None
        if old is not None:
            self._drop_standby(old)  # one at a time: the host asks for the one it will use
        if busy:
            self._error(sid, f"standby id {sid} is a workload's id")
            return
        threading.Thread(target=self._prepare, args=(sid, mode, python, program, entry,
                                                     msg.get("user"), preexec),
                         name="standby-" + sid, daemon=True).start()

    def _prepare(self, sid: str, mode: str, python: str, program: str, entry: Any,
                 user: Any, preexec: Any) -> None:
        mine, theirs = request_socket()
        try:
            try:
                popen = spawn([python, "-c", LOADER, str(theirs.fileno())], None, None, user,
                              preexec_fn=preexec, pass_fds=(theirs.fileno(),))
            finally:
                theirs.close()
        except StartError as e:
            mine.close()
            self._error(sid, f"standby {sid} not prepared: {e}")
            return
        standby = Standby(sid, mode, program, entry.pw_uid if entry else os.getuid(), popen,
                          mine)
        with self._wl_lock:
            old, self.standby = self.standby, standby
        if old is not None:
            self._drop_standby(old)
        try:
            standby.wait_ready()
        except StandbyError as e:
            with self._wl_lock:
                if self.standby is standby:
                    self.standby = None
            self._drop_standby(standby)
            self._error(sid, f"standby {sid} not prepared: {e}")
            return
        log.info("standby %s ready (pid %d, %s mode, %s)", sid, standby.pid, mode, program)
        self.send({"type": "standby_ready", "id": sid, "pid": standby.pid,
                   "prepared": standby.prepared, "mode": mode})

    def _from_standby(self, wid: str, msg: Message, env: dict[str, str] | None) -> tuple[
            Any, Message]:
        """(the standby's process, note for ``started``) when it takes the request; (None,
        note with the reason) when the request must start normally. Raises ProfileError
        for a bad profile (as a normal start would)."""
        with self._wl_lock:
            standby, self.standby = self.standby, None  # one request only, whatever happens
        if standby is not None and standby.id != msg["standby"]:
            self._drop_standby(standby)
            standby = None
        if standby is None:
            return None, {"used": False, "reason": "no standby " + msg["standby"] + " here"}
        note: Message = standby.describe()
        why: str | None
        monitor = msg.get("monitor")
        if monitor is None:
            why = "the request is not monitored"
            profile = None
        else:
            try:
                profile = Profile.from_dict(monitor)
            except ProfileError:
                self._drop_standby(standby)
                raise
            installed = self.monitor.installed(standby.id)
            why = "the standby's watch ended" if installed is None else None
            try:
                entry = lookup_user(msg["user"]) if msg.get("user") is not None else None
            except StartError:
                self._drop_standby(standby)
                raise
            if why is None:
                why = standby.misfit(msg["argv"], entry.pw_uid if entry else os.getuid(),
                                     msg.get("stdout", "stream"), msg.get("stderr", "stream"),
                                     env, seccomp.notified_numbers(profile) <= (installed or set()))
        if why is not None or profile is None:
            self._drop_standby(standby)
            note.update(used=False, reason=why or "the request is not monitored")
            log.info("standby %s not used for %s: %s", standby.id, wid, note["reason"])
            return None, note
        full_env = build_env(env, entry)
        try:
            self.monitor.rename(standby.id, wid, reexec=standby.mode == "exec")
            self.monitor.update(wid, profile)
            standby.hand_over(list(msg["argv"]), full_env, default_cwd(msg.get("cwd"), entry))
        except (KeyError, StandbyError) as e:
            self._drop_standby(standby)
            self.monitor.drop(wid)
            raise StartError(f"the standby failed: {e}") from None
        note["used"] = True
        return standby.popen, note

    def _drop_standby(self, standby: Standby) -> None:
        """Kill a standby that will serve nobody, and end its watch first: its fanotify
        marks would otherwise answer opens beside the next workload's."""
        self.monitor.drop(standby.id)
        standby.discard()

    def _watcher(self, wid: str, monitor: Any) -> Any:
        """The preexec_fn that puts the workload's first process under watch: it installs
        the seccomp filter just before the exec and hands the listener to the monitor,
        whose threads already run (Popen returns only once the exec was let through)."""
        profile = Profile.from_dict(monitor)
        why = seccomp.available()
        if why is not None:  # fail closed: a watch was asked for and cannot be had
            raise StartError(f"monitoring unavailable: {why}")
        installer = seccomp.Installer(profile)
        header = json.dumps({"id": wid, "profile": profile.to_dict()}).encode("utf-8")
        fd = self.monitor.child_socket.fileno()

        def preexec() -> None:
            installer.install_and_hand_over(fd, header)

        return preexec

    def _channel_env(self, name: str, env: dict[str, str] | None) -> dict[str, str]:
        """The workload's environment with its channel: the endpoint listens (bound here,
        in the guest's network namespace, on the first start that asks) and is named."""
        if not self.endpoint.listening:
            from guest_agent.endpoint import bind_listener
            self.endpoint.add_listener(bind_listener(), name)
        self.endpoint.name = name
        out = dict(env or {})
        extra = self.endpoint.env()
        path = extra.pop("PYTHONPATH")
        out["PYTHONPATH"] = path + (":" + out["PYTHONPATH"] if out.get("PYTHONPATH") else "")
        out.update(extra)
        return out

    def _on_channel_deliver(self, msg: Message) -> None:
        problem = self.endpoint.on_deliver(msg)
        if problem is not None:
            self.send({"type": "error", "id": msg["id"], "kind": "channel", "message": problem})

    def _on_channel_verdict(self, msg: Message) -> None:
        self.endpoint.on_verdict(msg)

    def _channel_hand_loop(self) -> None:
        """Host mode: take the listening sockets the controller hands over (one per zone
        start with a channel), with a header naming the zone."""
        hand = self._channel_hand
        assert hand is not None
        while not self.stop.is_set():
            try:
                if not select.select([hand], [], [], 0.5)[0]:
                    continue
                data, fds, _flags, _addr = socket.recv_fds(hand, 4096, 2)
            except (OSError, ValueError):
                return
            if not data and not fds:
                return  # the controller closed its end
            try:
                header = json.loads(data.decode("utf-8"))
                name = header.get("name") if isinstance(header, dict) else None
            except ValueError:
                name = None
            for fd in fds[1:]:
                os.close(fd)
            if not fds:
                log.warning("channel hand-over without a socket: %r", data[:200])
                continue
            sock = socket.socket(fileno=fds[0])
            self.endpoint.add_listener(sock, name if isinstance(name, str) else None)

    def _on_profile(self, msg: Message) -> None:
        try:
            profile = Profile.from_dict(msg["monitor"])
        except ProfileError as e:
            self._error(msg["id"], f"profile for {msg['id']} refused: {e}")
            return
        try:
            self.monitor.update(msg["id"], profile)
        except KeyError:
            self._error(msg["id"], "no monitored workload {}".format(msg["id"]))

    def _on_transient(self, msg: Message) -> None:
        """Place a held process in a transient zone (or refuse it), or act on a zone's
        cgroup: the monitor does it on its poll loop and answers with an event."""
        self.monitor.transient(msg)

    def _ended(self, work: Workload, queued: bool) -> None:
        """The workload ended and its exit is queued (it stays listed in hellos until the
        exit is written: a host that connects now will still hear of it)."""
        log.info("workload %s exited with %s", work.id, work.status)
        if not queued:
            self._forget_workload(work.id)

    def _forget_workload(self, wid: str) -> None:
        with self._wl_lock:
            work = self.workloads.get(wid)
            if work is not None and work.status is not None:
                del self.workloads[wid]

    def _on_signal(self, msg: Message) -> None:
        with self._wl_lock:
            work = self.workloads.get(msg["id"])
        if work is None:
            self._error(msg["id"], "no running workload {}".format(msg["id"]))
            return
        try:
            work.signal(msg["signal"])
        except OSError as e:
            self._error(msg["id"], "cannot signal workload {}: {}".format(msg["id"], e))

    def _on_probe(self, msg: Message) -> None:
        kind = msg["kind"]
        if kind not in PROBES:
            self.send({"type": "probe_result", "id": msg["id"], "ok": False,
                       "error": "unknown probe kind {!r} (this agent knows {})".format(
                           kind[:40], ", ".join(sorted(PROBES)))})
            return
        if not self._probes.acquire(blocking=False):
            self.send({"type": "probe_result", "id": msg["id"], "ok": False,
                       "error": f"{MAX_PROBES} probes already running"})
            return
        threading.Thread(target=self._run_probe, args=(msg,), name="probe-" + msg["id"],
                         daemon=True).start()

    def _run_probe(self, msg: Message) -> None:
        try:
            result = PROBES[msg["kind"]](msg.get("args") or {})
            reply: Message = {"type": "probe_result", "id": msg["id"], "ok": True,
                              "result": result}
        except Exception as e:
            reply = {"type": "probe_result", "id": msg["id"], "ok": False,
                     "error": f"{type(e).__name__}: {e}"}
        finally:
            self._probes.release()
        self.send(reply)

    # --- life -------------------------------------------------------------------------

    def _spawn_thread(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def run(self, wait_port: float) -> int:
        try:
            self.port.open(wait_port)
        except PortUnavailable as e:
            log.error("%s", e)
            return 2
        self._spawn_thread(self._writer, "writer")
        self._spawn_thread(self._heartbeats, "heartbeat")
        if self.host_mode:
            self._spawn_thread(self._orphan_watch, "orphan")
        if self._channel_hand is not None:
            self._spawn_thread(self._channel_hand_loop, "channel-hand")
        self.monitor.start()
        code = 0
        try:
            while not self.stop.is_set():
                generation = self.port.wait_connected(self.stop)
                decoder = Decoder(HOST_TYPES)
                while not self.stop.is_set():
                    try:
                        data = self.port.read(generation, 0.5)
                    except Disconnected:
                        if self.host_mode and not self.monitor.stats()["watching"]:
                            # beside a cgroup zone with nothing left to watch (a spare
                            # the controller never used, or a zone whose processes are
                            # gone): no controller needs to find this agent again
                            log.info("host gone and nothing to watch: exiting")
                            self.stop.set()
                        break
                    if data:
                        for item in decoder.feed(data):
                            self.dispatch(item)
        except Stopped:
            pass
        except PortUnavailable as e:
            log.error("%s", e)
            code = 1
        finally:
            self.shutdown()
        return code

    def shutdown(self) -> None:
        self.stop.set()
        self.outbox.close()
        with self._wl_lock:
            running = list(self.workloads.values())
        for work in running:
            work.kill()
        with self._wl_lock:
            standby, self.standby = self.standby, None
        if standby is not None:
            self._drop_standby(standby)
        self.endpoint.close()
        for t in self.threads:
            t.join(2)
        self.monitor.close()
        self.port.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="guest_agent", description="hvtsm guest agent (see guest_agent/README.md)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--port", metavar="PATH",
                       help="a character device to use instead of the named virtio port")
    where.add_argument("--connect", metavar="unix:PATH",
                       help="connect to a unix socket instead (tests on the host)")
    parser.add_argument("--name", default=PORT_NAME,
                        help="virtio port name to look for (default %(default)s)")
    parser.add_argument("--heartbeat", type=float, default=1.0, metavar="SECONDS",
                        help="heartbeat period (default %(default)s)")
    parser.add_argument("--wait-port", type=float, default=30.0, metavar="SECONDS",
                        help="how long the port may take to appear (and, with --connect, to "
                             "accept again after the host went away; default %(default)s)")
    parser.add_argument("--watch-fd", type=int, metavar="N",
                        help="host mode: an inherited SOCK_SEQPACKET socket on which the "
                             "zone launcher sends (header, seccomp listener fd); fanotify "
                             "then only reports (never holds an open)")
    parser.add_argument("--channel-fd", type=int, metavar="N",
                        help="host mode: an inherited SOCK_SEQPACKET socket on which the "
                             "controller hands over each zone's listening channel socket")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if args.heartbeat <= 0:
        parser.error("--heartbeat must be > 0")
    if args.connect is not None and not args.connect.startswith("unix:"):
        parser.error("--connect takes unix:PATH")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # the agent must keep its heartbeat and its judging going while the workload spins
    # (a fork bomb under TCG starved it into heartbeat-lost); every thread made from here
    # on inherits this, and workload.spawn puts the workload back to 0
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, AGENT_NICE)
    # a monitored call waits for the agent: the thread answering it must not wait out
    # the default 5 ms GIL switch interval behind the sampler or the writer
    sys.setswitchinterval(0.0002)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="guest_agent[%(process)d] %(levelname)s %(message)s")
    agent = Agent(make_port(args.port, args.connect, args.name), heartbeat=args.heartbeat,
                  watch_fd=args.watch_fd, channel_fd=args.channel_fd)

    def stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        agent.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    log.info("hvtsm guest agent %s (protocol %d, python %s, pid %d) on %s",
             __version__, PROTOCOL_VERSION, sys.version.split()[0], os.getpid(),
             args.connect or args.port or "virtio port " + args.name)
    return agent.run(args.wait_port)


__all__ = ["Agent", "Outbox", "main"]
