"""A zone's deputy as the lifecycle sees it: the agent beside or inside the zone that keeps
its schedule when no controller does (guest_agent/deputy.py).

The deputy is told the zone's pending phases (index, due time, the restrictions in force
from each) whenever they change: when the zone begins, when a phase is applied (so it knows
what is in force), when a reaction or an operator moves the schedule, when a controller
adopts the zone. It applies a phase on its own DEPUTY_GRACE_S after its due time unless the
controller said it is in force.

What it applied comes back two ways: at once while the controller is connected (it was
only late: `reported`, through the inbox), or in its agent's hello when a controller takes
the zone over (`adopted`). Either way each phase is completed by the controller (the
driver's own `apply`, idempotent: the NIC unplugged, allow-lists written, the real limit
set where the agent only froze the zone, which is then thawed), recorded as applied at the
agent's time ("applied by the zone's agent ..."), and the deputy is told it may forget it.
A terminate phase the agent applied ends the zone at the agent's time. The stretch with
no controller is an `unattended_span` row (`hvtsm zones` shows it).

If the agent is gone too, nothing changes from before: the adopting controller applies
the overdue phases itself, audited as late (fail closed).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from hvtsm.errors import HvtsmError
from hvtsm.lifecycle.core import Core
from hvtsm.lifecycle.ending import Ending
from hvtsm.lifecycle.outcome import EndCause
from hvtsm.lifecycle.phases import Bound, Follow, Phases
from hvtsm.lifecycle.zonerun import ZoneRun
from hvtsm.monitor.deputy import DeputyRecord, DeputyReport
from hvtsm.store.audit import record_event, record_unattended
from hvtsm.store.models import ZoneState
from hvtsm.zones.base import DeputyOrders, DeputyPhase

log = logging.getLogger(__name__)

#: seconds past a phase's due time before the deputy applies it: the controller applies at
#: due and tells the deputy within milliseconds; the deputy's lag stays well inside
#: LATE_AFTER_MS (1 s)
DEPUTY_GRACE_S = 0.3
#: how long an adopting controller waits for a zone's agent to come back with its report
#: (agents retry their connection every 0.5 s at most)
BACK_TIMEOUT_S = 3.0
#: the phases one schedule carries at most (the nearest ones, and always the last): each
#: phase's steps bring the zone to all of that phase's restrictions, so one left out is
#: applied with the next one sent, and the schedule is sent again after each phase
MAX_PHASES = 48

NOTE_ALONE = "applied by the zone's agent while no controller ran"
NOTE_LATE = "applied by the zone's agent: the controller had not applied it in time"


class Deputies:
    def __init__(self, core: Core, ending: Ending, phases: Phases, *, bound: Bound,
                 follow: Follow) -> None:
        self.core = core
        self.ending = ending
        self.phases = phases
        self._bound = bound
        self._follow = follow

    # -- telling the deputy ----------------------------------------------------------------

    def orders(self, run: ZoneRun, *, ack: int | None = None,
               thaw: bool = False) -> DeputyOrders:
        """The zone's pending phases as its deputy gets them (caller holds run.lock)."""
        pending = sorted(run.pending.items())
        if len(pending) > MAX_PHASES:
            pending = pending[:MAX_PHASES - 1] + pending[-1:]
        phases = []
        for index, due in pending:
            phase = run.policy.phases[index]
            phases.append(DeputyPhase(index, due, self._bound(run, phase.restrictions),
                                      terminate=phase.terminate))
        return DeputyOrders(tuple(phases), run.phase_index, DEPUTY_GRACE_S, ack, thaw)

    def send(self, run: ZoneRun, *, ack: int | None = None, thaw: bool = False) -> None:
        """Give the zone's deputy its schedule as it stands (caller holds run.lock). One
        that cannot be reached is audited once: the controller still keeps the schedule,
        and a lost agent is an anomaly of its own."""
        if run.handle is None or not run.live:
            return
        deputy = self.core.driver_of(run).deputy(run.handle)
        if deputy is None:
            return
        try:
            deputy.delegate(self.orders(run, ack=ack, thaw=thaw))
        except HvtsmError as exc:
            if not run.deputy_lost:
                run.deputy_lost = True
                self.core.note(run.zone_id, "deputy-unreachable",
                               f"the zone's agent cannot keep its schedule while no "
                               f"controller runs: {exc}")

    # -- what the deputy applied -------------------------------------------------------------

    def reported(self, zone_id: str, report: DeputyReport) -> None:
        """Live records (the inbox's handler): the controller was connected but late."""
        run = self.core.zones.get(zone_id)
        if run is None:
            return
        run.opened.wait()
        with run.lock:
            thaw = any([self._take(run, r, NOTE_LATE) for r in report.records])
            self.send(run, ack=report.last_seq, thaw=thaw)

    def adopted(self, run: ZoneRun, report: DeputyReport | None, *,
                dead_controller: str | None) -> None:
        """A controller takes the zone over: audit what its deputy applied meanwhile and the
        stretch without a controller, then give it the schedule again (caller holds
        run.lock). With no report (no agent, or it did not come back) nothing is changed:
        the overdue phases are applied by the controller, late."""
        if report is None:
            return
        back = time.time()
        records = [r for r in report.records if r.zone == run.zone_id]
        thaw = any([self._take(run, r, NOTE_ALONE) for r in records])
        since = report.alone_since
        if since is not None or records:
            with self.core.store.session() as session:
                record_unattended(session, zone_id=run.zone_id, since=since, until=back,
                                  controller_id=dead_controller,
                                  phases=[_span_phase(r) for r in records],
                                  note=f"{report.lost} record(s) lost by the agent"
                                  if report.lost else "")
        self.send(run, ack=report.last_seq if records else 0, thaw=thaw)

    def _take(self, run: ZoneRun, record: DeputyRecord, note: str) -> bool:
        """One record: the phase completed by the controller and audited, or the zone's end.
        True when the deputy's freeze may now be thawed (caller holds run.lock)."""
        if not run.live or run.handle is None:
            return False
        if not record.ok:
            self._failed(run, record)
            return False
        if not 0 <= record.phase < len(run.policy.phases):
            self.core.note(run.zone_id, "deputy", f"its agent reported phase "
                           f"{record.phase}, which the policy does not have: ignored")
            return False
        phase = run.policy.phases[record.phase]
        steps = "; ".join(record.results) or "nothing to change"
        if phase.terminate:
            self._ended(run, record, f"{note} ({steps})")
            return False
        if record.phase <= run.phase_index:
            self.core.note(run.zone_id, "deputy", f"its agent applied phase {record.phase} "
                           f"too, {record.lag_ms:.0f} ms after its due time ({steps})")
            return record.froze and run.state is not ZoneState.FROZEN
        # the controller completes what the agent began (the NIC unplugged, allow-lists,
        # the real limit where it froze): the driver's apply only tightens, idempotently
        previous = run.handle.applied
        target = self._bound(run, phase.restrictions)
        try:
            report = self.core.driver_of(run).apply(run.handle, target)
        except HvtsmError as exc:
            self.ending.end(run, f"phase {record.phase}, applied by the zone's agent, could "
                            f"not be completed ({exc}); terminated to fail closed",
                            EndCause.FAIL_CLOSED)
            return False
        completed = time.time()
        done = "; ".join(report.notes)
        changes = target.changes_from(previous)
        self.core.timeline.cancel(run.zone_id, [record.phase])
        self.phases.mark(run, record.phase, record.due, record.finished, changes,
                         f"{note} ({steps}); completed by the controller "
                         f"{completed - record.finished:.1f} s later" +
                         (f": {done}" if done else ""))
        self._follow(run)
        self.core.notify(self.phases.notice(run, record.phase, record.due, record.finished,
                                            changes, by="agent"))
        return record.froze and run.state is not ZoneState.FROZEN

    def _ended(self, run: ZoneRun, record: DeputyRecord, note: str) -> None:
        """The agent applied the terminate phase: the zone ended then."""
        changes = {"action": "terminate"}
        self.core.timeline.cancel(run.zone_id, [record.phase])
        self.phases.mark(run, record.phase, record.due, record.finished, changes, note)
        self.core.notify(self.phases.notice(run, record.phase, record.due, record.finished,
                                            changes, by="agent"))
        run.ended_at = record.finished
        self.ending.end(run, f"policy {run.policy.name}: lifespan ended (phase "
                        f"{record.phase}, applied by the zone's agent)", EndCause.POLICY)

    def _failed(self, run: ZoneRun, record: DeputyRecord) -> None:
        """A step failed in the agent, which killed the zone to fail closed."""
        with self.core.store.session() as session:
            record_event(session, zone_id=run.zone_id, kind="error", ts=record.finished,
                         detail=f"phase {record.phase} could not be applied by the zone's "
                         f"agent: {record.describe()}")
        run.ended_at = record.finished
        self.ending.end(run, f"phase {record.phase} could not be applied by the zone's agent "
                        f"({record.error}); it ended the zone to fail closed",
                        EndCause.FAIL_CLOSED)


def _span_phase(record: DeputyRecord) -> dict[str, Any]:
    return {"phase": record.phase, "due": record.due, "applied": record.finished,
            "lag_ms": record.lag_ms, "ok": record.ok, "terminate": record.terminate,
            "froze": record.froze}
