"""Containing what broke a profile, as ``profile.contain`` says (kill, deny or none), and
reporting it.

Order: a containment that kills reports first, then kills, then answers the held call.
The host must learn the reason before it can see the process exit (or the zone end): a
seccomp caller is blocked in the kernel until answered, and a fanotify permission opener
until its open is answered, so nothing runs between the report and the kill; a sampled
process (memory, syscall or fork rate) may run on for those microseconds. The report's
``contained_mono`` is read just before the kill. deny and none answer first (the caller
waits no longer than it must) and report after.

A name is read before the kill: a reaped process has no /proc entry left to name its
program or its transient zone by.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Callable

from guest_agent import fanotify, proccount
from guest_agent.judge import Verdict, anomaly
from guest_agent.procfs import program_of
from guest_agent.reports import Reporter
from guest_agent.watch import Watch

#: answer(allow, killed) of the held call being contained
Answer = Callable[[bool, bool], None]


def _kill(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


class Containment:
    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def call(self, watch: Watch, verdict: Verdict, pid: int, act_time: float,
             act_mono: float, answer: Answer | None) -> None:
        """Contain `pid` for `verdict`: its notified call is answered through `answer`;
        None for a sampled process, which has no call waiting."""
        contain = watch.profile.contain
        program = program_of(pid) if pid else ""
        zone = watch.zone_of(pid) if pid else None
        if contain == "kill" and pid:
            self.reporter.anomaly(watch, verdict, pid, program, "killed", act_time, act_mono,
                                  time.monotonic(), zone)
            _kill(pid)
            if answer is not None:
                answer(False, True)
        elif contain == "deny" and answer is not None:
            answer(False, False)
            self.reporter.anomaly(watch, verdict, pid, program, "denied", act_time, act_mono,
                                  time.monotonic(), zone)
        else:
            if answer is not None:
                answer(True, False)
            self.reporter.anomaly(watch, verdict, pid, program, "none", act_time, act_mono,
                                  None, zone)

    def open(self, watch: Watch, group: fanotify.Group, event: fanotify.Event,
             verdict: Verdict, act_time: float, act_mono: float) -> bool:
        """Contain a sensitive open fanotify reported; whether it is allowed. A permission
        event is answered here when contained (the caller answers the others)."""
        contain = watch.profile.contain
        program = program_of(event.pid)
        zone = watch.zone_of(event.pid)
        if contain == "kill":
            self.reporter.anomaly(watch, verdict, event.pid, program, "killed", act_time,
                                  act_mono, time.monotonic(), zone)
            _kill(event.pid)
            group.respond(event, False)
            return False
        if contain == "deny" and event.permission:
            group.respond(event, False)
            self.reporter.anomaly(watch, verdict, event.pid, program, "denied", act_time,
                                  act_mono, time.monotonic(), zone)
            return False
        self.reporter.anomaly(watch, verdict, event.pid, program, "none", act_time, act_mono,
                              None, zone)
        return True

    def processes(self, watch: Watch, detail: str, excess: list[proccount.Proc],
                  procs: dict[int, proccount.Proc], args: dict[str, object],
                  rescan: Callable[[], dict[int, proccount.Proc]],
                  created: list[proccount.Proc] | None = None) -> None:
        """Contain a process limit passed: `excess` are the processes beyond it (newest),
        `created` the ones whose creation counts (default: `excess`). kill: the process
        that created most of them (a fork loop) and its whole subtree, listed again by
        `rescan` after the stop so a child born meanwhile goes too; deny: only the excess,
        as if their creation had failed, and their parent goes on; none: report. The
        anomaly names the creator, or when no creator is a member any more the newest
        excess process; its args.killed counts the processes it set out to end."""
        act_mono, act_time = time.monotonic(), time.time()
        contain = watch.profile.contain
        forker = proccount.forker_of(created if created is not None else excess, procs)
        shown = forker or (excess[-1] if excess else None)
        pid = shown.pid if shown is not None else None
        program = program_of(pid) if pid else ""
        zone = watch.zone_of(pid) if pid else None
        victims: list[proccount.Proc] = []
        root = None
        if contain == "kill" and forker is not None:
            victims, root = proccount.subtree(forker.pid, procs), forker.pid
        elif contain in ("kill", "deny"):
            victims = excess
        verdict = anomaly("fork-rate", detail, None, dict(args, killed=len(victims)),
                          rate=True)
        if not victims:
            self.reporter.anomaly(watch, verdict, pid, program, "none", act_time, act_mono,
                                  None, zone)
            return
        self.reporter.anomaly(watch, verdict, pid, program, "killed", act_time, act_mono,
                              time.monotonic(), zone)
        proccount.end(victims, rescan if root is not None else None, root)


__all__ = ["Answer", "Containment"]
