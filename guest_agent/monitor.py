"""The syscall monitor: receives each watched workload's seccomp listener, answers its
notifications, watches its sensitive files with fanotify and samples its processes; what
breaks the workload's profile becomes an ``anomaly`` event (protocol.ANOMALY_FIELDS) and
is contained as the profile says.

`Monitor` is the facade the agent uses; the work is done by its parts, one job each:

========================  ==============================================================
handover.py               a watch begins: (header, listener fd) on a watch socket
notifications.py          one seccomp notification: decode, gather facts, judge, act
calls.py                  a notification decoded into a typed call, read from the caller
judge.py                  the verdict on one call: pure, no seccomp, no /proc
inroot.py                 an exec's target looked up in the caller's root and cwd
containment.py            kill, deny or none, reported before a kill
holds.py                  transient zones: held code paths, splits, zone ops
filewatch.py              sensitive files through fanotify
sampling.py               memory and I/O rates, process accounting, OOM, lost events
members.py                which processes are a watch's
reports.py                the events sent, their rate limits, internal errors
procfs.py, poller.py      /proc readers; the poll loop
watch.py                  the state they share: Watch, Hold, Transient
========================  ==============================================================

Threads:
* ``monitor-poll``: one poll loop over the watch sockets, every listener and every
  fanotify group. It never blocks in an ioctl: it receives only after POLLIN, and every
  notification it receives it answers, whatever happens while judging it (an internal
  error CONTINUEs the call and is counted). It owns the held calls and transient zones:
  the host's ``transient`` messages are carried out on it.
* ``monitor-sample``: every sample interval reads the watched processes' RSS and read/write
  syscall counts from /proc, OOM kills, does the process accounting, and sends ``stats``
  every STATS_PERIOD seconds (sampling.py).

Transient zones (the profile's ``transient``): an exec of a program the host did not
foresee, or the first connect off the host of a process, is *held* (holds.py). Processes
of a transient zone do not split again; their anomalies carry the zone's id (``zone``), and
a connect off the host while the zone's network is not ``full`` is a connect-out anomaly.

Membership (members.py): with a ``procs_file`` (host mode) that file says which processes
are the zone's; without it (guest mode) a process is a watch's when it notified on that
watch's listener, or descends from one that did, and has a seccomp filter.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import select
import socket
import threading
import time
from typing import Any

from guest_agent import handover, seccomp
from guest_agent.containment import Containment
from guest_agent.filewatch import FileWatch
from guest_agent.holds import Holds
from guest_agent.notifications import Notifications
from guest_agent.poller import PollLoop
from guest_agent.profile import Profile
from guest_agent.protocol import EVENT_MONITOR
from guest_agent.reports import Emit, Reporter
from guest_agent.sampling import STATS_PERIOD, Sampler
from guest_agent.syscalls import X86_64, numbers
from guest_agent.watch import Watch

log = logging.getLogger("guest_agent")

#: ended watches kept for stats() and late profile updates
KEEP_ENDED = 64


class Monitor:
    """See the module docstring. `emit(kind, workload id, data)` sends an ``event``; it may
    return False when the event could not be queued (counted as dropped)."""

    def __init__(self, emit: Emit, *, permission_events: bool,
                 system_counter: bool = False) -> None:
        self.watch_socket, self.child_socket = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # the child end is inherited by each workload's first process across fork only
        self.child_socket.set_inheritable(False)
        self._sockets: list[socket.socket] = [self.watch_socket]
        self._lock = threading.Lock()
        self._watches: dict[str, Watch] = {}
        self._ended: collections.deque[Watch] = collections.deque(maxlen=KEEP_ENDED)
        self._threads: list[threading.Thread] = []
        self._reporter = Reporter(emit)
        self._loop = PollLoop(self._reporter.failed)
        containment = Containment(self._reporter)
        self._holds = Holds(self._reporter, self._running, self._running_watch)
        self._notifications = Notifications(self._reporter, containment, self._holds,
                                            self._end)
        self._files = FileWatch(self._reporter, containment, permission=permission_events,
                                register=self._loop.register,
                                unregister=self._loop.unregister)
        self._sampler = Sampler(self._reporter, containment, watches=self._running,
                                system_counter=system_counter,
                                zones_changed=self._zones_changed)
        self._loop.register(self.watch_socket.fileno(),
                            functools.partial(self._on_socket, self.watch_socket))

    @property
    def internal_errors(self) -> int:
        """The monitor's own failures so far (a handler or step that raised)."""
        return self._reporter.internal_errors

    # --- public ---------------------------------------------------------------------------

    def attach_socket(self, sock: socket.socket) -> None:
        """Host mode: an inherited seqpacket socket that also brings (header, listener fd)."""
        self._loop.call_soon(lambda: self._add_socket(sock))

    def start(self) -> None:
        for target, name in ((self._poll, "monitor-poll"), (self._sample, "monitor-sample")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def update(self, workload_id: str, profile: Profile) -> None:
        """Replace a watch's profile; KeyError if no watch has this id."""
        with self._lock:
            watch = self._watches.get(workload_id)
            if watch is None:
                watch = next((w for w in self._ended if w.id == workload_id), None)
        if watch is None:
            raise KeyError(f"no watched workload {workload_id}")
        old = watch.profile
        watch.profile = profile
        if watch.ended:
            return
        warnings = []
        missing = [n for n in profile.deny_syscalls if X86_64[n] not in watch.installed]
        if missing:
            warnings.append("deny_syscalls {} cannot be watched: the filter installed at "
                            "start does not notify them".format(", ".join(missing)))
        if profile.sensitive_paths != old.sensitive_paths:
            self._loop.call_soon(lambda: self._remark(watch, warnings))
        elif warnings:
            self._announce(watch, warnings)

    def installed(self, workload_id: str) -> frozenset[int] | None:
        """The syscall numbers a running watch's filter notifies (None: no such watch)."""
        watch = self._running_watch(workload_id)
        return None if watch is None else watch.installed

    def rename(self, old: str, new: str, *, reexec: bool = False) -> None:
        """A standby's watch becomes its request's workload's (events then carry `new`).
        `reexec`: the standby's next exec is the workload's own program (exec mode), not
        a code path. KeyError if no running watch has id `old`."""
        with self._lock:
            watch = self._watches.get(old)
            if watch is None or watch.ended:
                raise KeyError(f"no watched standby {old}")
            del self._watches[old]
            watch.id = new
            if reexec:
                watch.first_exec_done = False
            self._watches[new] = watch

    def drop(self, workload_id: str) -> None:
        """End a watch whose process is being killed (an unused standby) on the poll loop's
        next turn, before any watch that begins after this call: its fanotify marks must
        not hold another workload's opens."""
        def end() -> None:
            watch = self._running_watch(workload_id)
            if watch is not None:
                self._end(watch, quiet=True)

        self._loop.call_soon(end)

    def transient(self, msg: dict[str, Any]) -> None:
        """A host ``transient`` message: carried out on the poll loop, which owns the
        held calls; the answer goes out as a ``transient`` event."""
        self._loop.call_soon(lambda: self._holds.on_message(msg))

    def stats(self) -> dict[str, int]:
        with self._lock:
            watches = list(self._watches.values()) + list(self._ended)
            watching = sum(1 for w in self._watches.values() if not w.ended)
        return {"notifications": sum(w.notifications for w in watches),
                "file_events": sum(w.file_events for w in watches),
                "lost": sum(w.lost for w in watches),
                "dropped": sum(w.dropped for w in watches),
                "watching": watching}

    def close(self) -> None:
        self._loop.close()
        for t in self._threads:
            t.join(3)
        for w in self._running():
            self._end(w, quiet=True)
        for s in [*self._sockets, self.child_socket]:
            with contextlib.suppress(OSError):
                s.close()
        self._loop.release()

    # --- threads --------------------------------------------------------------------------

    def _poll(self) -> None:
        self._loop.run(self._holds.timeout_ms, self._holds.expire)

    def _sample(self) -> None:
        self._sampler.run(self._loop.closed)

    def _zones_changed(self, watch: Watch) -> None:
        self._loop.call_soon(lambda: self._holds.check_ended(watch))

    # --- watches --------------------------------------------------------------------------

    def _running(self) -> list[Watch]:
        with self._lock:
            return [w for w in self._watches.values() if not w.ended]

    def _running_watch(self, workload_id: Any) -> Watch | None:
        with self._lock:
            watch = self._watches.get(workload_id)
        return None if watch is None or watch.ended else watch

    def _add_socket(self, sock: socket.socket) -> None:
        if sock not in self._sockets:
            self._sockets.append(sock)
        self._loop.register(sock.fileno(), functools.partial(self._on_socket, sock))

    def _on_socket(self, sock: socket.socket, ev: int) -> None:
        try:
            given = handover.receive(sock)
        except EOFError:
            if ev & (select.POLLHUP | select.POLLERR) or sock is not self.watch_socket:
                self._loop.unregister(sock.fileno())
            return
        if given is None:
            return
        try:
            self._begin(given)
        except Exception:
            # a watch that cannot begin must not leave the tree waiting for ever: closing
            # the listener fails its notified calls (ENOSYS), its first exec included
            self._reporter.failed(f"watching {given.id}")
            with contextlib.suppress(OSError):
                os.close(given.listener_fd)

    def _begin(self, given: handover.Handover) -> None:
        watch = Watch(given.id, given.profile, seccomp.Listener(given.listener_fd),
                      seccomp.notified_numbers(given.profile), given.procs_file,
                      given.oom_file)
        watch.sampled_at = watch.last_stats = time.monotonic()
        watch.oom_base = Sampler.oom_count(watch)
        warnings: list[str] = []
        self._files.mark(watch, warnings)
        with self._lock:
            old = self._watches.get(given.id)
            if old is not None and not old.ended:
                warnings.append(f"a watch with id {given.id} was still active; replaced")
            self._watches[given.id] = watch
        self._loop.register(given.listener_fd,
                            functools.partial(self._notifications.on_listener, watch))
        log.info("watching %s (%s)", given.id, ", ".join(watch.mechanisms()))
        self._announce(watch, warnings)

    def _announce(self, watch: Watch, warnings: list[str]) -> None:
        self._reporter.send(EVENT_MONITOR, watch, {"mechanisms": watch.mechanisms(),
                                                   "warnings": warnings})

    def _remark(self, watch: Watch, warnings: list[str]) -> None:
        self._files.unmark(watch)
        self._files.mark(watch, warnings)
        self._announce(watch, warnings)

    def _end(self, watch: Watch, quiet: bool = False) -> None:
        if watch.ended:
            return
        watch.ended = True
        if watch.listener is not None:
            self._loop.unregister(watch.listener.fd)
            watch.listener.close()
        self._files.unmark(watch)
        with self._lock:
            if self._watches.get(watch.id) is watch:
                del self._watches[watch.id]
            self._ended.append(watch)
        if not quiet:
            log.info("watch %s ended", watch.id)
            self._reporter.stats(watch)


# the table must know every syscall the filter treats specially
numbers(seccomp.ALWAYS)

__all__ = ["STATS_PERIOD", "Emit", "Monitor"]
