"""The guest agent: serves the host's requests over one port (see port.py) and keeps it
informed (hello, heartbeats, workload output and exits, probe and admin results, monitor
events).

Its parts, one job each: the outbox (outbox.py: three lanes, what waits while the host is
absent) and the writer (writer.py: the one thread that writes, numbering messages); the
requests, grouped: starts.py (``start``, ``signal``, the workloads), standbys.py
(``standby``), channel_requests.py (``channel_deliver``, ``channel_verdict``, the
channel environment), workers.py (``probe`` and ``admin``, off the reader thread),
deputy_requests.py (``deputy``, ``deputy_ack``: the zone's schedule kept while no host is
connected, deputy.py, whose records go on the urgent lane too); and the monitor
(monitor.py), whose events (anomaly, monitor, stats, code-path, transient) go on the urgent
lane. ``profile``, ``transient`` and ``ping`` are answered here.

Threads: the main thread reads the port and dispatches requests (never blocking on one);
the writer; a heartbeat thread; the deputy's (and a short-lived one while a step works in a
zone's network namespace); three per workload (two output pumps, one waiter); one per
running probe (at most MAX_PROBES) and one for admin requests; the monitor's two (its poll
loop answers seccomp notifications and fanotify events, its sampler reads /proc); the
channel endpoint's (endpoint.py: one accepting, one per client connection).

While the host is absent (a virtio port whose host end nobody holds) nothing is written
and heartbeats are not made; when the host (re)connects the writer first sends a fresh
hello (listing still-running workloads), then what waited (outbox.py).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable

from guest_agent import __version__, fanotify, seccomp
from guest_agent.admin import OPS as ADMIN_OPS
from guest_agent.channel_requests import ChannelRequests
from guest_agent.deputy_requests import DeputyRequests
from guest_agent.endpoint import Endpoint
from guest_agent.monitor import Monitor
from guest_agent.outbox import URGENT, Outbox
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
)
from guest_agent.standbys import Standbys, error_message
from guest_agent.starts import Starts
from guest_agent.workers import AdminRequests, Probes
from guest_agent.workload import AGENT_NICE
from guest_agent.writer import Writer

log = logging.getLogger("guest_agent")

CAPABILITIES = ["start", "signal", "ping"] + ["probe:" + k for k in sorted(PROBES)] + [
    "events:anomaly", "events:monitor", "events:stats", "events:code-path",
    "events:transient", "events:deputy", "transient", "channel", "standby", "admin",
    "deputy"] + [
    "admin:" + op for op in ADMIN_OPS]


def uptime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


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
                 watch_fd: int | None = None, channel_fd: int | None = None,
                 host_pid: int | None = None) -> None:
        self.port = port
        self.heartbeat = heartbeat
        #: beside a cgroup zone: the controller that started us (None: our parent now)
        self.host_pid = host_pid
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
        self.threads: list[threading.Thread] = []
        self.endpoint = Endpoint(lambda m, size: self.outbox.put_channel(m, size, self.stop),
                                 self.stop)
        self.channels = ChannelRequests(
            self.endpoint, self.send, self.stop,
            None if channel_fd is None else socket.socket(fileno=channel_fd))
        self.standbys = Standbys(self.monitor, self.send, lambda sid: self.starts.busy(sid))
        self.starts = Starts(self.monitor, self.outbox, self.stop, self.send,
                             self.channels.env_for, self.standbys)
        self.probes = Probes(self.send)
        self.admin = AdminRequests(self.send)
        self.writer = Writer(port, self.outbox, self.stop, self.hello, self.starts.forget)
        self.deputies = DeputyRequests(self.send, lambda: self.port.connected,
                                       self.starts.root_pid)
        self._handlers: dict[str, Callable[[Message], None]] = {
            "start": self.starts.on_start, "signal": self.starts.on_signal,
            "standby": self.standbys.on_standby, "probe": self.probes.on_probe,
            "admin": self.admin.on_admin, "ping": self._on_ping,
            "profile": self._on_profile, "transient": self.monitor.transient,
            "channel_deliver": self.channels.on_deliver,
            "channel_verdict": self.channels.on_verdict,
            "deputy": self.deputies.on_deputy, "deputy_ack": self.deputies.on_ack}
        assert set(self._handlers) == HOST_TYPES

    # --- outgoing ---------------------------------------------------------------------

    def hello(self, reply_to: str | None = None) -> Message:
        uname = os.uname()
        msg: Message = {
            "type": "hello", "protocol": PROTOCOL_VERSION, "agent_version": __version__,
            "capabilities": list(self._capabilities), "pid": os.getpid(), "kernel": uname.release,
            "python": "{}.{}.{}".format(*sys.version_info[:3]),
            "boot_ms": int(uptime() * 1000), "heartbeat": self.heartbeat,
            "hostname": uname.nodename, "port": self.port.describe,
            "workloads": self.starts.running(), "dropped": self.outbox.dropped,
            "deputy": self.deputies.report(),
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

    def _emit(self, kind: str, workload_id: str, data: dict[str, Any]) -> bool:
        """The monitor's events go on the urgent lane: an anomaly must not wait behind
        output. False when the outbox was full (the monitor counts it as dropped)."""
        return self.outbox.put({"type": "event", "kind": kind, "id": workload_id,
                                "time": time.time(), "data": data}, URGENT)

    def _needed(self) -> bool:
        """Something to watch, or a schedule to keep and records to hand over: a
        controller that resumes looks for this agent."""
        return bool(self.monitor.stats()["watching"]) or self.deputies.deputy.busy()

    def _orphan_watch(self) -> None:
        """Beside a cgroup zone: once the controller that started us is gone and we are
        not needed (`_needed`), no one will need us."""
        # the controller says who it is: one killed while we were still importing has made
        # our parent init already, and that parent would never change
        parent = self.host_pid or os.getppid()
        while not self.stop.wait(1.0):
            if os.getppid() != parent and not self._needed():
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
            self._handlers[item["type"]](item)
        except Exception as e:  # never let one request end the agent
            log.exception("handling %r", item)
            mtype = item.get("type") if isinstance(item, dict) else None
            mid = item.get("id") if isinstance(item, dict) else None
            self.send(error_message(mid if isinstance(mid, str) else None,
                                    f"agent failed on a {mtype} request: {e}"))

    def _on_ping(self, msg: Message) -> None:
        if msg.get("hello"):
            self.send(self.hello(reply_to=msg.get("id")))
        else:
            self.send(self._heartbeat_msg(reply_to=msg.get("id")))

    def _on_profile(self, msg: Message) -> None:
        try:
            profile = Profile.from_dict(msg["monitor"])
        except ProfileError as e:
            self.send(error_message(msg["id"], f"profile for {msg['id']} refused: {e}"))
            return
        try:
            self.monitor.update(msg["id"], profile)
        except KeyError:
            self.send(error_message(msg["id"], "no monitored workload {}".format(msg["id"])))

    # --- life -------------------------------------------------------------------------

    def _spawn_thread(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def run(self, wait_port: float) -> int:
        try:
            self.port.open(wait_port)
        except PortUnavailable as e:
            log.error("%s", e)
            return 2
        self._spawn_thread(self.writer.run, "writer")
        self._spawn_thread(self._heartbeats, "heartbeat")
        if self.host_mode:
            self._spawn_thread(self._orphan_watch, "orphan")
        if self.channels.hand is not None:
            self._spawn_thread(self.channels.hand_loop, "channel-hand")
        self.monitor.start()
        self.deputies.start()
        code = 0
        try:
            self._read()
        except Stopped:
            pass
        except PortUnavailable as e:
            log.error("%s", e)
            code = 1
        finally:
            self.shutdown()
        return code

    def _read(self) -> None:
        while not self.stop.is_set():
            generation = self.port.wait_connected(self.stop)
            decoder = Decoder(HOST_TYPES)
            while not self.stop.is_set():
                try:
                    data = self.port.read(generation, 0.5)
                except Disconnected:
                    self.deputies.deputy.host_lost()
                    if self.host_mode and not self._needed():
                        # beside a cgroup zone with nothing left to watch (a spare the
                        # controller never used, or a zone whose processes are gone): no
                        # controller needs to find this agent again
                        log.info("host gone and nothing to watch: exiting")
                        self.stop.set()
                    break
                if data:
                    for item in decoder.feed(data):
                        self.dispatch(item)

    def shutdown(self) -> None:
        self.stop.set()
        self.deputies.close()
        self.outbox.close()
        self.starts.kill_all()
        self.standbys.close()
        self.admin.close()
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
    parser.add_argument("--host-pid", type=int, metavar="PID",
                        help="host mode: the controller that started the agent (it leaves "
                             "when that one is gone and it is not needed)")
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
                  watch_fd=args.watch_fd, channel_fd=args.channel_fd,
                  host_pid=args.host_pid)

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
