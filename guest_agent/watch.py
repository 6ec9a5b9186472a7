"""The state of one watched workload (a `Watch`), of a call held for the host (`Hold`) and
of a transient zone split from the watch (`Transient`): plain records the monitor's parts
share. Everything but the sampler runs on the monitor's poll loop; the sampler (its own
thread) writes its sampling fields, refreshes `known` and counts lost and dropped events,
counters whose rare lost update costs nothing but a count.
"""

from __future__ import annotations

import collections
import errno
import logging
from dataclasses import dataclass, field
from typing import Any

from guest_agent import fanotify, proccount, seccomp
from guest_agent.procfs import cgroup_components
from guest_agent.profile import Profile
from guest_agent.provenance import Provenance
from guest_agent.rates import RateWindow

log = logging.getLogger("guest_agent")

#: a rate anomaly (and events-dropped) is emitted at most once per this many seconds
RATE_EMIT_PERIOD = 1.0
#: other anomalies of one watch beyond this many per second are counted as dropped
MAX_ANOMALIES_PER_S = 50


@dataclass
class Hold:
    """A call held until the host places its process in a transient zone (or refuses)."""

    id: int
    notif_id: int
    pid: int
    trigger: str
    program: str
    syscall: str | None
    args: dict[str, Any]
    act_time: float
    act_mono: float
    deadline: float


@dataclass
class Transient:
    """A transient zone split from a watch: its cgroup when the agent manages it (guest),
    and the network it may use (judged at connect: it shares its parent's network)."""

    cgroup: str | None
    network: str = "full"


def _emit_window() -> RateWindow:
    return RateWindow(1.0, MAX_ANOMALIES_PER_S)


@dataclass
class Watch:
    id: str
    profile: Profile
    listener: seccomp.Listener | None
    installed: frozenset[int]
    procs_file: str | None = None
    oom_file: str | None = None
    group: fanotify.Group | None = None
    #: permission marks on the zone's tripwires (profile.tripwires)
    tripwire_group: fanotify.Group | None = None
    first_exec_done: bool = False
    known: set[int] = field(default_factory=set)
    ended: bool = False
    notifications: int = 0
    file_events: int = 0
    lost: int = 0
    dropped: int = 0
    errors: int = 0
    #: process creations over the last second
    births: RateWindow = field(default_factory=RateWindow)
    #: the processes of the last sample
    procs: dict[int, proccount.Proc] = field(default_factory=dict)
    #: the kernel's created-tasks count at the last sample (guest, one workload)
    tasks_base: int | None = None
    #: files created over the last second
    new_files: RateWindow = field(default_factory=RateWindow)
    #: files removed or truncated over the last second
    deletions: RateWindow = field(default_factory=RateWindow)
    #: which processes received network data and which files they wrote
    provenance: Provenance = field(default_factory=Provenance)
    #: anomalies emitted over the last second (beyond MAX_ANOMALIES_PER_S: dropped)
    emitted: RateWindow = field(default_factory=_emit_window)
    #: per rate category: the emission of the current RATE_EMIT_PERIOD
    rate_emits: dict[str, RateWindow] = field(default_factory=dict)
    rss: dict[int, int] = field(default_factory=dict)
    #: (time, per-process RSS) over the last sampling.MEMORY_WINDOW seconds: growth is
    #: judged against the oldest snapshot, per process
    rss_history: collections.deque[tuple[float, dict[int, int]]] = field(
        default_factory=collections.deque)
    io: dict[int, int] = field(default_factory=dict)
    #: CPU ticks per process at the last sample, and (time, ticks used since the sample
    #: before, per process) over the last profile.cpu_window seconds
    cpu: dict[int, int] = field(default_factory=dict)
    cpu_history: collections.deque[tuple[float, dict[int, int]]] = field(
        default_factory=collections.deque)
    sampled_at: float = 0.0
    oom_base: int | None = None
    lost_reported: int = 0
    last_stats: float = 0.0
    next_sample: float = 0.0
    recent_sensitive: dict[tuple[int, str], float] = field(default_factory=dict)
    #: the workload's first process (its own exec is never a code path)
    root_pid: int = 0
    holds: dict[int, Hold] = field(default_factory=dict)
    transients: dict[str, Transient] = field(default_factory=dict)

    def rate_emit(self, category: str) -> RateWindow:
        """The window that lets one `category` rate anomaly out per RATE_EMIT_PERIOD."""
        window = self.rate_emits.get(category)
        if window is None:
            window = self.rate_emits[category] = RateWindow(RATE_EMIT_PERIOD, 1, fixed=True)
        return window

    def rate_emitted(self, category: str, now: float) -> bool:
        """A `category` rate anomaly went out within the current period."""
        return self.rate_emit(category).count(now) >= 1

    def mechanisms(self) -> list[str]:
        out = ["seccomp-unotify"]
        if self.group is not None:
            out.append("fanotify")
        if self.tripwire_group is not None:
            out.append("tripwires")
        out.append("proc-sampling")
        return out

    def counters(self) -> dict[str, int]:
        """The ``stats`` event's data."""
        return {"notifications": self.notifications, "file_events": self.file_events,
                "lost": self.lost, "dropped": self.dropped}

    def first_exec(self, pid: int) -> None:
        """The workload's own program proceeds: later execs are judged."""
        self.first_exec_done = True
        self.root_pid = pid

    def answer(self, notif_id: int, *, allow: bool, killed: bool = False,
               error: int = errno.EPERM) -> None:
        """Answer a notified call: CONTINUE it, or fail it with `error`. One the caller
        left before the answer is a lost event, unless the monitor killed it."""
        listener = self.listener
        if listener is None or listener.fd < 0:
            return
        try:
            if not listener.respond(notif_id, allow=allow, error=error) and not killed:
                self.lost += 1
        except OSError as e:
            log.warning("watch %s: %s", self.id, e)
            self.lost += 1

    def zone_of(self, pid: int) -> str | None:
        """The transient zone `pid` is in (read from its cgroup path), or None."""
        if not self.transients:
            return None
        for parts in cgroup_components(pid):
            for zone in self.transients:
                if zone in parts:
                    return zone
        return None


__all__ = ["MAX_ANOMALIES_PER_S", "RATE_EMIT_PERIOD", "Hold", "Transient", "Watch"]
