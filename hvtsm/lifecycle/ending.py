"""Where a zone ends: ended under its workload (`end`: policy, reaction, operator, fail
closed, its parent), or its workload ended on its own (`exited`); either way `finish`
records one outcome (who ended it, the status, hostile or not) and announces it.

The exit of a workload travels through the same queue as its anomalies (`watch` hands it
to the inbox), so the reaction to a containment that killed the workload is recorded before
the end it caused. An anomaly recorded after the end still counts: `late_anomaly`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from hvtsm.controllers import release_zone
from hvtsm.errors import HvtsmError
from hvtsm.lifecycle.core import Core
from hvtsm.lifecycle.notices import Ended
from hvtsm.lifecycle.outcome import EndCause, Outcome, exit_outcome
from hvtsm.lifecycle.zonerun import ZoneRun
from hvtsm.store.audit import record_event
from hvtsm.store.models import ZoneState

log = logging.getLogger(__name__)

ExitSink = Callable[[ZoneRun, "int | None"], None]


class Ending:
    def __init__(self, core: Core, exited_sink: ExitSink) -> None:
        self.core = core
        self._exited_sink = exited_sink

    def watch(self, run: ZoneRun) -> None:
        """Wait for the workload's end on a thread of its own; the end goes to the inbox."""
        workload = run.workload
        assert workload is not None

        def wait() -> None:
            status: int | None = None
            try:
                status = workload.wait()
            finally:  # even a failed wait ends the zone: never a zone nobody follows
                self._exited_sink(run, status)

        self.core.supervisor.once(f"wait-{run.zone_id}", wait)

    def end(self, run: ZoneRun, reason: str, cause: EndCause) -> None:
        """End the zone under its workload (caller holds run.lock). Once the driver has
        killed everything in it the zone is over: it finishes at once when the workload's
        status is known by then (the waiter's later news of it changes nothing), else when
        the waiter hears of it."""
        if not run.live:
            return
        run.state = ZoneState.TERMINATED
        run.end_cause = cause
        run.end_reason_given = reason
        self.core.timeline.cancel(run.zone_id, list(run.pending))
        self.end_children(run)
        if self._terminate(run):
            status = run.workload.poll() if run.workload is not None else None
            if run.workload is None or status is not None:
                self.finish(run, status)

    def exited(self, run: ZoneRun, status: int | None) -> None:
        """The workload ended (the inbox, after everything its agent said before)."""
        with run.lock:
            if run.state is not ZoneState.TERMINATED:
                run.state = ZoneState.EXITED
                self.core.timeline.cancel(run.zone_id, list(run.pending))
                # the workload's children die with the zone, as in a container, and so do
                # its transient zones
                self.end_children(run)
                self._terminate(run)
            self.finish(run, status)

    def finish(self, run: ZoneRun, status: int | None) -> None:
        if run.ended.is_set():
            return
        now = run.ended_at or time.time()
        if run.end_cause is not None:
            outcome = Outcome(run.end_cause, run.end_reason_given or str(run.end_cause),
                              status, run.anomalies)
        else:
            outcome = exit_outcome(status, contained=run.contained, anomalies=run.anomalies)
        run.outcome = outcome
        run.state = outcome.state
        with self.core.store.session() as session:
            record_event(session, zone_id=run.zone_id, kind=str(run.state),
                         detail=outcome.describe(), ts=now)
            self.core.save(session, run, ended_at=now, exit_status=status,
                           end_reason=outcome.reason, ended_by=str(outcome.cause),
                           hostile=outcome.hostile)
        release_zone(run.zone_id)
        self.core.channels().ended(run.zone_id)
        run.ended.set()
        self.core.notify(Ended(run.zone_id, now, status, str(run.state), outcome.reason,
                               str(outcome.cause), outcome.hostile, outcome.anomalies,
                               parent=run.parent, name=run.name,
                               zone_kind=str(run.kind) if run.parent else None))

    def late_anomaly(self, run: ZoneRun, *, contained_root: bool) -> None:
        """One more anomaly of a zone whose end is recorded already (caller holds its lock):
        the recorded outcome turns hostile."""
        if run.outcome is None:
            return
        run.outcome = run.outcome.with_anomaly(contained_root=contained_root)
        run.state = run.outcome.state
        with self.core.store.session() as session:
            self.core.save(session, run, ended_by=str(run.outcome.cause), hostile=True)

    def end_children(self, run: ZoneRun) -> None:
        """The zone ends: so do its transient zones, each audited (caller holds its lock)."""
        for child in self.core.zones.children(run):
            with child.lock:
                if not child.live:
                    continue
                reason = f"its parent zone {run.zone_id} ended"
                with self.core.store.session() as session:
                    record_event(session, zone_id=child.zone_id, kind="terminate",
                                 detail=reason)
                self.end(child, reason, EndCause.PARENT)

    def _terminate(self, run: ZoneRun) -> bool:
        """Kill and remove everything of the zone; False when that failed (audited)."""
        if run.handle is None:
            return True
        try:
            self.core.driver_of(run).terminate(run.handle)
            return True
        except HvtsmError as exc:
            # what is left is `hvtsm cleanup`'s; the zone is over for the lifecycle
            log.warning("zone %s: terminate: %s", run.zone_id, exc)
            with self.core.store.session() as session:
                record_event(session, zone_id=run.zone_id, kind="error",
                             detail=f"its resources could not all be removed: {exc}")
            return False
