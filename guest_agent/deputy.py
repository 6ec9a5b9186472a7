"""The zone's deputy: keeps its schedule when no controller does.

The controller sends each zone's schedule (a ``deputy`` message: per pending phase its
index, its due time (epoch seconds) and the steps that put it in force, deputy_steps.py)
whenever the schedule changes, and says which phase is in force whenever it applied one. A
phase whose due time is GRACE seconds past, and which the controller has not said is in
force, the deputy applies itself: the latest such phase (each phase's steps bring the zone
to that phase's accumulated restrictions, so the earlier ones are applied with it), or at
once the terminate phase when it is due. Every step is monotonic and idempotent, so a
controller that is only late (its host busy) and applies the phase too does no harm: no
timing decides who wins.

Times are the host's: each ``deputy`` message says when it was sent (``sent``), and the
deputy keeps the difference to its own clock (a guest's may be off by seconds), so a
guest applies a phase at the host's due time, and reports host times.

A step that fails fails closed: the schedule's `fail_closed` steps (the zone's kill) run,
as the controller would end a zone it cannot tighten. Each application is a `Record` in a
bounded log, sent as an ``event`` of kind ``deputy`` while a host is connected, listed in
every ``hello`` until the host acknowledges it (``deputy_ack``), together with the time the
agent lost its host (``alone_since``). So a controller that returns learns what was applied
while none ran, and when.

`decide` is the choice, pure (a clock is a number); `Deputy` runs it on one thread.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

from guest_agent.deputy_steps import (
    STAND_INS,
    Context,
    Step,
    StepError,
    run_all,
    steps_from,
    zone_lock,
)

log = logging.getLogger("guest_agent")

#: seconds past a phase's due time before the deputy applies it (the controller applies at
#: due and says so within milliseconds; well inside hvtsm's LATE_AFTER_MS of 1 s)
GRACE_S = 0.3
MAX_GRACE_S = 5.0
#: records kept until acknowledged (the oldest go first, counted in `lost`)
MAX_RECORDS = 32
#: phases one schedule may hold (the controller sends the nearest ones, then the last)
MAX_PHASES = 64
#: text kept of one step's outcome, and outcomes per record
MAX_DETAIL = 160
MAX_RESULTS = 16
#: the longest wait between two looks at the wall clock (it may be set while we wait)
MAX_WAIT_S = 5.0


class ScheduleError(ValueError):
    """A ``deputy`` message that cannot be used."""


@dataclass(frozen=True)
class Phase:
    index: int
    #: epoch seconds
    due: float
    steps: tuple[Step, ...]
    #: the lifespan's end: its steps kill the zone
    terminate: bool = False

    @classmethod
    def from_dict(cls, d: Any) -> Phase:
        if not isinstance(d, dict):
            raise ScheduleError("a phase must be an object")
        index, due = d.get("index"), d.get("due")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 2**31:
            raise ScheduleError("phase field 'index' must be an integer >= 0")
        if not isinstance(due, (int, float)) or isinstance(due, bool) or \
                not math.isfinite(due) or not 0 <= due < 2**40:
            raise ScheduleError(f"phase {index}: field 'due' must be epoch seconds")
        try:
            steps = steps_from(d.get("steps"), f"phase {index} 'steps'")
        except StepError as e:
            raise ScheduleError(f"phase {index}: {e}") from None
        return cls(index, float(due), steps, bool(d.get("terminate", False)))

    @property
    def stands_in(self) -> bool:
        """Some of it is only frozen until the controller applies the real thing."""
        return any(isinstance(s, STAND_INS) for s in self.steps)


@dataclass(frozen=True)
class Schedule:
    zone: str
    phases: tuple[Phase, ...]
    #: the highest phase the controller says is in force (-1: none)
    in_force: int = -1
    grace: float = GRACE_S
    #: what ends the zone when a step fails (fail closed)
    fail_closed: tuple[Step, ...] = ()
    #: the directory whose flock the controller's own writes of the zone's limits hold too
    #: (deputy_steps.zone_lock; None: none)
    lock: str | None = None

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> Schedule:
        phases = msg.get("phases")
        if not isinstance(phases, list) or len(phases) > MAX_PHASES:
            raise ScheduleError(f"'phases' must be a list of at most {MAX_PHASES} phases")
        grace = msg.get("grace", GRACE_S)
        if not isinstance(grace, (int, float)) or isinstance(grace, bool) or \
                not 0 <= grace <= MAX_GRACE_S:
            raise ScheduleError(f"'grace' must be 0-{MAX_GRACE_S:g} seconds")
        in_force = msg.get("in_force", -1)
        if not isinstance(in_force, int) or isinstance(in_force, bool) or in_force < -1:
            raise ScheduleError("'in_force' must be a phase index or -1")
        try:
            fail_closed = steps_from(msg.get("fail_closed") or [], "'fail_closed'")
        except StepError as e:
            raise ScheduleError(str(e)) from None
        lock = msg.get("lock")
        if lock is not None and (not isinstance(lock, str) or not lock.startswith("/")):
            raise ScheduleError("'lock' must be an absolute path")
        parsed = tuple(sorted((Phase.from_dict(p) for p in phases), key=lambda p: p.index))
        return cls(str(msg["id"]), parsed, in_force, float(grace), fail_closed, lock)


@dataclass(frozen=True)
class Decision:
    #: the phase to apply now (None: nothing is due)
    apply: Phase | None
    #: the phases below it that it brings in force too
    together: tuple[int, ...] = ()
    #: when to look again (None: nothing pending)
    wake_at: float | None = None


def decide(schedule: Schedule, in_force: int, now: float) -> Decision:
    """What the deputy does at `now` with `schedule`, `in_force` being the highest phase
    applied by anyone. Pure."""
    pending = [p for p in schedule.phases if p.index > in_force]
    ripe = [p for p in pending if p.due + schedule.grace <= now]
    later = [p.due + schedule.grace for p in pending if p.due + schedule.grace > now]
    wake = min(later) if later else None
    if not ripe:
        return Decision(None, (), wake)
    ending = [p for p in ripe if p.terminate]
    chosen = ending[0] if ending else ripe[-1]
    together = tuple(p.index for p in ripe if p.index < chosen.index)
    # after a terminate nothing is left to wait for; otherwise what is not ripe yet waits
    return Decision(chosen, together, None if chosen.terminate else wake)


@dataclass
class Record:
    """One phase the deputy applied."""

    seq: int
    zone: str
    phase: int
    due: float
    #: when the first step began and the last ended (epoch seconds)
    started: float
    finished: float
    ok: bool
    terminate: bool
    #: some of it is frozen until the controller applies it
    froze: bool
    #: no host was connected when it was applied
    alone: bool
    together: tuple[int, ...] = ()
    results: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "zone": self.zone, "phase": self.phase, "due": self.due,
                "started": self.started, "finished": self.finished, "ok": self.ok,
                "terminate": self.terminate, "froze": self.froze, "alone": self.alone,
                "together": list(self.together), "results": list(self.results),
                "error": self.error}


Emit = Callable[[dict[str, Any]], None]


class Deputy:
    """Holds each zone's schedule and applies what falls due (see the module docstring).
    `emit` sends a record to a connected host (an ``event``); `connected` says whether one
    is; `context` is what steps act through."""

    def __init__(self, context: Context, emit: Emit, connected: Callable[[], bool], *,
                 clock: Callable[[], float] = time.time) -> None:
        self._context = context
        self._emit = emit
        self._connected = connected
        self._clock = clock
        self._lock = threading.Condition()
        self._schedules: dict[str, Schedule] = {}
        self._in_force: dict[str, int] = {}
        self._records: list[Record] = []
        self._seq = 0
        self._lost = 0
        self._alone_since: float | None = None
        #: the stand-in freezes applied per zone, thawed when the controller says
        self._frozen: dict[str, list[Step]] = {}
        #: a message changed a schedule since the last look
        self._changed = False
        self._stopped = False
        #: the host's clock minus ours (a guest's clock may be off): every time the deputy
        #: compares or reports is the host's
        self._skew = 0.0

    def _now(self) -> float:
        return self._clock() + self._skew

    # -- the host's messages -------------------------------------------------------------

    def schedule(self, msg: dict[str, Any]) -> None:
        """A ``deputy`` message: the zone's schedule replaces the one before (no phases:
        the zone has none left to keep)."""
        schedule = Schedule.from_message(msg)
        sent = msg.get("sent")
        with self._lock:
            if isinstance(sent, (int, float)) and math.isfinite(sent):
                # read on receipt: the link's delay (milliseconds) is the error left
                self._skew = float(sent) - self._clock()
            if not schedule.phases:
                self._schedules.pop(schedule.zone, None)
            else:
                self._schedules[schedule.zone] = schedule
            self._in_force[schedule.zone] = max(self._in_force.get(schedule.zone, -1),
                                                schedule.in_force)
            self._changed = True
            self._lock.notify_all()

    def ack(self, zone: str, seq: int, *, thaw: bool = False) -> None:
        """The host audited the records up to `seq` of `zone` (and the time it was away);
        `thaw`: it applied what the stand-in freezes stood for, so they end."""
        with self._lock:
            self._records = [r for r in self._records if r.zone != zone or r.seq > seq]
            self._alone_since = None
            frozen = self._frozen.pop(zone, []) if thaw else []
        for step in frozen:
            step.thaw(self._context)

    # -- the link's state ----------------------------------------------------------------

    def host_lost(self) -> None:
        """The host went away: from now on the zones with a schedule run unattended."""
        with self._lock:
            if self._alone_since is None and self._schedules:
                self._alone_since = self._now()

    def report(self) -> dict[str, Any]:
        """For the ``hello``: what waits to be acknowledged, and since when no host was
        there (None: one was, or nothing happened meanwhile)."""
        with self._lock:
            return {"records": [r.to_dict() for r in self._records], "lost": self._lost,
                    "alone_since": self._alone_since,
                    "zones": {z: self._in_force.get(z, -1) for z in self._schedules}}

    def busy(self) -> bool:
        """A phase still to keep, or a record not acknowledged: the agent must stay."""
        with self._lock:
            return bool(self._records) or any(
                any(p.index > self._in_force.get(z, -1) for p in s.phases)
                for z, s in self._schedules.items())

    def records(self) -> list[Record]:
        with self._lock:
            return list(self._records)

    # -- the thread --------------------------------------------------------------------------

    def run(self) -> None:
        """The deputy's thread: until `close`. One failing turn is logged and the next
        one goes on (the controller's supervised loops do the same)."""
        while True:
            try:
                if not self.turn():
                    return
            except Exception:
                log.exception("deputy: a turn failed")
                with self._lock:
                    if self._stopped:
                        return
                    self._lock.wait(1.0)

    def turn(self) -> bool:
        """Apply what is due, then wait for the next due time or a new message (one that
        came while applying is not waited through). False once closed."""
        wake = self.step()
        with self._lock:
            if self._stopped:
                return False
            if not self._changed:
                now = self._now()
                self._lock.wait(MAX_WAIT_S if wake is None
                                else min(MAX_WAIT_S, max(0.0, wake - now)))
            return not self._stopped

    def step(self) -> float | None:
        """Apply what is due now; when to look again (None: nothing pending)."""
        with self._lock:
            self._changed = False
            now = self._now()
            due: list[tuple[Schedule, Decision]] = []
            wake: float | None = None
            for zone, schedule in self._schedules.items():
                decision = decide(schedule, self._in_force.get(zone, -1), now)
                if decision.apply is not None:
                    due.append((schedule, decision))
                if decision.wake_at is not None:
                    wake = decision.wake_at if wake is None else min(wake, decision.wake_at)
        for schedule, decision in due:
            self.apply(schedule, decision)
        return self._now() if due else wake

    def apply(self, schedule: Schedule, decision: Decision) -> Record:
        """Carry out `decision.apply` of `schedule` and record it (never raises). An end
        (the terminate phase, or the kill that fails closed) is told before the kill, as
        the agent's containment reports before it kills: a controller that hears of the
        zone's empty cgroup has heard of its cause first."""
        phase = decision.apply
        assert phase is not None
        alone = not self._connected()
        record = Record(0, schedule.zone, phase.index, phase.due, self._now(), 0.0, True,
                        phase.terminate, phase.stands_in, alone, decision.together)
        try:
            if phase.terminate:
                self._tell(record, ["killing the zone's processes"])
            with zone_lock(schedule.lock) if schedule.lock else _unlocked():
                for outcome in run_all(phase.steps, self._context):
                    record.results.append(outcome.detail[:MAX_DETAIL])
        except StepError as e:
            record.ok, record.terminate, record.froze = False, True, False
            record.error = str(e)[:MAX_DETAIL * 2]
            log.error("deputy: zone %s phase %d failed: %s; ending the zone to fail closed",
                      schedule.zone, phase.index, record.error)
            self._tell(record, [*record.results, "killing the zone's processes"])
            try:
                for outcome in run_all(schedule.fail_closed, self._context):
                    record.results.append(("fail closed: " + outcome.detail)[:MAX_DETAIL])
            except StepError as e2:
                record.results.append(f"fail closed failed: {e2}"[:MAX_DETAIL])
        record.finished = self._now()
        del record.results[MAX_RESULTS:]
        told = record.seq != 0  # an end was told before the kill
        self._keep(schedule, phase, record)
        log.warning("deputy: zone %s phase %d applied %.0f ms after its due time%s: %s",
                    schedule.zone, phase.index, (record.finished - phase.due) * 1000,
                    " (no controller)" if alone else "", "; ".join(record.results))
        if not alone and not told:
            self._emit(record.to_dict())
        return record

    def _tell(self, record: Record, results: list[str]) -> None:
        """Before an end: the record as it will be, numbered, sent to a connected host."""
        self._keep_seq(record)
        if not record.alone:
            told = Record(**{**record.__dict__, "results": list(results)[:MAX_RESULTS],
                             "finished": self._now()})
            self._emit(told.to_dict())

    def _keep_seq(self, record: Record) -> None:
        with self._lock:
            if record.seq == 0:
                self._seq += 1
                record.seq = self._seq

    def _keep(self, schedule: Schedule, phase: Phase, record: Record) -> None:
        """The record in the log, and what is in force now, whatever the host says later:
        the deputy never goes back."""
        self._keep_seq(record)
        with self._lock:
            self._in_force[schedule.zone] = max(self._in_force.get(schedule.zone, -1),
                                                phase.index)
            if record.terminate:
                self._schedules.pop(schedule.zone, None)
                self._frozen.pop(schedule.zone, None)
            elif record.froze:
                self._frozen.setdefault(schedule.zone, []).extend(
                    s for s in phase.steps if isinstance(s, STAND_INS))
            self._records.append(record)
            if len(self._records) > MAX_RECORDS:
                del self._records[0]
                self._lost += 1

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()


@contextlib.contextmanager
def _unlocked() -> Iterator[None]:
    yield


__all__ = ["GRACE_S", "MAX_RECORDS", "Decision", "Deputy", "Phase", "Record", "Schedule",
           "ScheduleError", "decide"]
