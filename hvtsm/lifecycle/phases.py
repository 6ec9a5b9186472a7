"""Where a due phase becomes an applied restriction.

The timeline fires one job per pending transition (scheduler threads); `due` applies that
phase and every earlier one not applied yet in one step, records a `phase_applied` row
(scheduled, applied, lag, late) and announces it. A phase that cannot be applied ends the
zone (fail closed: a zone must not keep running looser than its policy says), and so does
any unexpected failure of the step itself (`guarded_due`). A phase whose effect the zone
already has (a controller killed after the kernel's change and before its record; the
driver looks first) is applied all the same, its row's note saying "already in force".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from hvtsm.errors import HvtsmError
from hvtsm.lifecycle.core import LATE_AFTER_MS, Core
from hvtsm.lifecycle.ending import Ending
from hvtsm.lifecycle.notices import PhaseApplied
from hvtsm.lifecycle.outcome import EndCause
from hvtsm.lifecycle.zonerun import ZoneRun
from hvtsm.policy.model import Phase
from hvtsm.restrictions import Restrictions
from hvtsm.store.audit import record_event, record_phase

log = logging.getLogger(__name__)

#: a zone's restrictions bounded by whatever bounds them beyond their own policy (a
#: transient zone's parent)
Bound = Callable[[ZoneRun, Restrictions], Restrictions]
#: a zone tightened: whatever follows it (its transient zones) follows
Follow = Callable[[ZoneRun], None]
#: the zone's schedule changed: its deputy is told (lifecycle/deputy.py)
Tell = Callable[[ZoneRun], None]


class Phases:
    def __init__(self, core: Core, ending: Ending, *, bound: Bound, follow: Follow,
                 deputy: Tell) -> None:
        self.core = core
        self.ending = ending
        self._bound = bound
        self._follow = follow
        self._deputy = deputy

    def tell_deputy(self, run: ZoneRun) -> None:
        """The zone's schedule changed (caller holds run.lock): its deputy hears of it."""
        self._deputy(run)

    def schedule(self, run: ZoneRun) -> None:
        """One job per pending transition (caller holds run.lock)."""
        for index, due in sorted(run.pending.items()):
            self.core.timeline.schedule(run.zone_id, index, due)

    def guarded_due(self, zone_id: str, phase_index: int, due: float) -> None:
        """The timeline's callback: `due`, failing closed on any unexpected error."""
        try:
            self.due(zone_id, phase_index, due)
        except Exception as exc:
            self.core.supervisor.report(f"phase {phase_index} of zone {zone_id}", exc)
            self.core.fault(zone_id, f"applying phase {phase_index}", exc)
            run = self.core.zones.get(zone_id)
            if run is not None:
                with run.lock:
                    self.ending.end(run, f"phase {phase_index} failed in the controller "
                                    f"({type(exc).__name__}: {exc}); ended to fail closed",
                                    EndCause.FAIL_CLOSED)

    def due(self, zone_id: str, phase_index: int, due: float) -> None:
        run = self.core.zones.get(zone_id)
        if run is None:
            log.warning("phase %d fell due for zone %s, which this controller does not drive",
                        phase_index, zone_id)
            return
        run.opened.wait()  # its launch finished writing the schedule this job belongs to
        with run.lock:
            if not run.live or run.handle is None or phase_index <= run.phase_index:
                return  # ended, or already in force: applied together with a later phase
            phase = run.policy.phases[phase_index]
            if phase.terminate:
                self._terminating(run, phase_index, due)
                self.ending.end(run, f"policy {run.policy.name}: lifespan ended "
                                f"(phase {phase_index})", EndCause.POLICY)
                return
            previous = run.handle.applied
            target = self._bound(run, phase.restrictions)
            try:
                report = self.core.driver_of(run).apply(run.handle, target)
            except HvtsmError as exc:
                with self.core.store.session() as session:
                    record_event(session, zone_id=zone_id, kind="error",
                                 detail=f"phase {phase_index} could not be applied: {exc}")
                self._terminating(run, phase_index, due)
                self.ending.end(run, f"phase {phase_index} could not be applied ({exc}); "
                                "terminated to fail closed", EndCause.FAIL_CLOSED)
                return
            applied = time.time()
            changes = target.changes_from(previous)
            # a step the zone already had (the kernel ahead of the store after a crash)
            # is a success, audited as in force
            self.mark(run, phase_index, due, applied, changes, report.audit_note())
            self._follow(run)
            self.tell_deputy(run)  # in force now: the deputy must not apply it again
        self.core.notify(self.notice(run, phase_index, due, applied, changes,
                                     tuple(str(a) for a in report.already)))

    def _terminating(self, run: ZoneRun, phase_index: int, due: float) -> None:
        """The phase that ends the zone, recorded and told before the end it causes."""
        done = time.time()
        changes = {"action": "terminate"}
        self.mark(run, phase_index, due, done, changes)
        self.core.notify(self.notice(run, phase_index, due, done, changes))

    def mark(self, run: ZoneRun, phase_index: int, due: float, applied: float,
             changes: dict[str, str], note: str = "") -> None:
        """Record phase `phase_index` (and any skipped before it) as applied (caller holds
        run.lock)."""
        skipped = sorted(i for i in run.pending if i < phase_index)
        self.core.timeline.cancel(run.zone_id, skipped)
        with self.core.store.session() as session:
            for index in skipped:
                record_phase(session, zone_id=run.zone_id, phase_index=index,
                             scheduled_at=run.pending.pop(index), applied_at=applied,
                             late=self.late(run, index, due, applied), changes={},
                             note=f"applied together with phase {phase_index}")
            run.pending.pop(phase_index, None)
            notes = ["fell due while no controller ran"] if phase_index in run.overdue else []
            record_phase(session, zone_id=run.zone_id, phase_index=phase_index,
                         scheduled_at=due, applied_at=applied,
                         late=self.late(run, phase_index, due, applied), changes=changes,
                         note="; ".join([*notes, note] if note else notes))
            run.phase_index = phase_index
            self.core.save(session, run)
        self.core.channels().phase(run.zone_id, phase_index)

    def zero(self, run: ZoneRun) -> list[Phase]:
        """The phases at 0: in force before the workload's first instruction."""
        return [p for p in run.policy.phases if p.at_ms == 0 and not p.terminate]

    @staticmethod
    def late(run: ZoneRun, index: int, due: float, applied: float) -> bool:
        return index in run.overdue or (applied - due) * 1000 > LATE_AFTER_MS

    def notice(self, run: ZoneRun, index: int, due: float, applied: float,
               changes: dict[str, str], already: tuple[str, ...] = (), *,
               by: str = "controller") -> PhaseApplied:
        phase = run.policy.phases[index]
        return PhaseApplied(run.zone_id, applied, index, phase.at_ms * run.scale, due,
                            round((applied - due) * 1000, 3),
                            self.late(run, index, due, applied), dict(changes), already,
                            by=by)
