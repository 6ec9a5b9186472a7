"""What the monitor tells the host about a watch, and how often: ``event`` messages through
the agent's `emit` (an ``anomaly``, ``monitor``, ``stats``, ``code-path`` or ``transient``
event), each one that could not be queued counted as dropped.

Rate anomalies (verdict.rate) go out at most once per RATE_EMIT_PERIOD per category (their
containment still applies each time); other anomalies beyond MAX_ANOMALIES_PER_S a second
per watch are counted as dropped instead of sent. The monitor's own failures (a handler
that raised) are logged and counted here too: `internal_errors`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from guest_agent.judge import Verdict
from guest_agent.protocol import EVENT_ANOMALY, EVENT_STATS
from guest_agent.watch import Watch

log = logging.getLogger("guest_agent")

#: emit(kind, workload id, data): False when the event could not be queued
Emit = Callable[[str, str, dict[str, Any]], Any]


class Reporter:
    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.internal_errors = 0

    def failed(self, what: str) -> None:
        """An exception being handled broke one of the monitor's own steps."""
        log.exception("%s failed", what)
        self.internal_errors += 1

    def raw(self, kind: str, workload_id: str, data: dict[str, Any]) -> bool:
        """Emit; False when the event could not be queued (or emitting raised)."""
        try:
            return self.emit(kind, workload_id, data) is not False
        except Exception:
            log.exception("emitting a %s event", kind)
            return False

    def send(self, kind: str, watch: Watch, data: dict[str, Any]) -> bool:
        sent = self.raw(kind, watch.id, data)
        if not sent:
            watch.dropped += 1
        return sent

    def stats(self, watch: Watch) -> None:
        self.send(EVENT_STATS, watch, watch.counters())

    def anomaly(self, watch: Watch, verdict: Verdict, pid: int | None, program: str,
                contained: str, act_time: float, act_mono: float,
                contained_mono: float | None, zone: str | None = None) -> bool:
        """Report `verdict` of `pid` (None: of no process). `zone`: the transient zone of
        `pid` when the caller read it before containment; otherwise it is read here, while
        the process may still be there. False when it was not sent (limited or dropped)."""
        now = time.monotonic()
        if verdict.rate:
            if not watch.rate_emit(verdict.category).admit(now):
                return False
        elif not watch.emitted.admit(now):
            watch.dropped += 1
            return False
        data: dict[str, Any] = {
            "category": verdict.category, "detail": verdict.detail, "pid": pid,
            "program": program, "syscall": verdict.syscall, "args": verdict.args,
            "contained": contained, "act_time": act_time, "act_mono": act_mono,
            "contained_mono": contained_mono}
        if zone is None and pid:
            zone = watch.zone_of(pid)
        if zone is not None:
            data["zone"] = zone  # the host reacts in the transient zone, not its parent
        log.warning("anomaly in %s: %s: %s (%s)", watch.id, verdict.category, verdict.detail,
                    contained)
        return self.send(EVENT_ANOMALY, watch, data)


__all__ = ["Emit", "Reporter"]
