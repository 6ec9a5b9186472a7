"""Where an anomaly becomes a reaction, and the steering verbs reactions and operators share
(accelerate, jump, freeze, thaw, terminate). Every step is audited before it is announced.

An anomaly always gets its reaction recorded, whatever state the zone is in: one that
arrives after the zone ended (or while it is being ended) is recorded with the effect
"none: ...", and the zone's outcome turns hostile (`Ending.late_anomaly`). A reaction that
fails is not dropped: the zone is frozen, then ended, to fail closed (`fail_closed`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sqlmodel import Session

from hvtsm.errors import ZoneError
from hvtsm.lifecycle.core import Core
from hvtsm.lifecycle.ending import Ending
from hvtsm.lifecycle.inbox import AnomalyItem, CodePathItem, DeputyItem, ExitItem, Item
from hvtsm.lifecycle.notices import AnomalySeen, ReactionTaken
from hvtsm.lifecycle.outcome import EndCause, kills_root
from hvtsm.lifecycle.zonerun import ZoneRun
from hvtsm.monitor.anomalies import AnomalyReport
from hvtsm.policy import Reaction
from hvtsm.store.audit import record_anomaly, record_event, record_operator, record_reaction
from hvtsm.store.models import ZoneState

log = logging.getLogger(__name__)

#: which zone an anomaly belongs to (a transient zone the agent names, or the zone itself)
Attribute = Callable[[str, AnomalyReport], str]
#: the zone's schedule moved: its deputy is told (lifecycle/deputy.py)
Tell = Callable[[ZoneRun], None]


class Reactions:
    def __init__(self, core: Core, ending: Ending, *, attribute: Attribute,
                 deputy: Tell) -> None:
        self.core = core
        self.ending = ending
        self._attribute = attribute
        self._deputy = deputy

    # -- anomalies ---------------------------------------------------------------------------

    def react(self, zone_id: str, report: AnomalyReport) -> Reaction | None:
        """Record an anomaly and react as the zone's policy says (repeated anomalies
        escalate). Returns the reaction recorded (None: the category is not an anomaly under
        this policy, or the zone is not driven here)."""
        zone_id = self._attribute(zone_id, report)
        run = self.core.zones.get(zone_id)
        if run is None:
            log.warning("anomaly %s of zone %s, which this controller does not drive",
                        report.category, zone_id)
            return None
        if report.category == "events-dropped" and not run.policy.anomaly.drops_are_anomalies:
            self.core.note(zone_id, "events-dropped", report.detail)  # counted, no more
            return None
        now = time.time()
        with self.core.store.session() as session:
            anomaly_id = record_anomaly(session, zone_id=zone_id, kind=report.category,
                                        detail=report.detail, source=report.source,
                                        evidence=report.evidence_json(), ts=now)
        self.core.notify(AnomalySeen(zone_id, now, report.category, report.detail,
                                     report.source, report.evidence))
        run.opened.wait()  # its launch finished: the schedule a reaction moves exists
        with run.lock:
            run.anomalies += 1
            root = kills_root(report.evidence, run.root_pid)
            if root and run.contained is None:
                run.contained = f"{report.category}: {report.detail}"
            reaction = run.policy.anomaly.reaction_for(report.category, run.anomalies)
            reason = f"anomaly {report.category} (#{run.anomalies}): {report.detail}"
            if not run.live or run.handle is None:
                self._after_end(run, reaction, reason, anomaly_id, contained_root=root)
                return reaction
            self.apply(run, reaction, reason, anomaly_id)
        return reaction

    def apply(self, run: ZoneRun, reaction: Reaction, reason: str,
              anomaly_id: int | None) -> None:
        zone_id = run.zone_id
        if reaction is Reaction.TERMINATE:
            self.terminate(zone_id, reason=reason, by="reaction", anomaly_id=anomaly_id)
        elif reaction is Reaction.FREEZE:
            if run.state is ZoneState.FROZEN:
                self._record(run, reaction, reason, anomaly_id, "none: already frozen")
            else:
                self.freeze(zone_id, reason=reason, by="reaction", anomaly_id=anomaly_id)
        elif reaction is Reaction.JUMP:
            self.jump(zone_id, reason=reason, by="reaction", anomaly_id=anomaly_id)
        else:
            self.accelerate(zone_id, run.policy.anomaly.factor, reason=reason,
                            anomaly_id=anomaly_id, by="reaction")

    def _after_end(self, run: ZoneRun, reaction: Reaction, reason: str, anomaly_id: int,
                   *, contained_root: bool) -> None:
        effect = ("none: the zone had already ended" if run.ended.is_set()
                  else "none: the zone is being ended")
        self._record(run, reaction, reason, anomaly_id, effect)
        self.ending.late_anomaly(run, contained_root=contained_root)

    def _record(self, run: ZoneRun, reaction: Reaction, reason: str, anomaly_id: int | None,
                effect: str) -> None:
        with self.core.store.session() as session:
            record_reaction(session, zone_id=run.zone_id, action=str(reaction),
                            reason=f"{reason}; {effect}", anomaly_id=anomaly_id)
        self.core.notify(ReactionTaken(run.zone_id, time.time(), str(reaction), reason,
                                       effect))

    # -- failing closed ----------------------------------------------------------------------

    def failed(self, item: Item, exc: BaseException) -> None:
        """An item of the inbox could not be worked off (the inbox's `failed`)."""
        if isinstance(item, ExitItem):
            # the end must still be recorded: a zone nobody finishes is followed by nobody
            self.core.fault(item.run.zone_id, "recording the zone's end", exc)
            with item.run.lock:
                item.run.end_cause = item.run.end_cause or EndCause.FAIL_CLOSED
                item.run.end_reason_given = (item.run.end_reason_given
                                             or f"recording its end failed ({exc})")
                self.ending.finish(item.run, item.status)
            return
        what = ("the reaction to an anomaly" if isinstance(item, AnomalyItem)
                else "placing a held code path" if isinstance(item, CodePathItem)
                else "auditing what the zone's agent applied")
        assert isinstance(item, AnomalyItem | CodePathItem | DeputyItem)
        self.fail_closed(item.zone_id, what, exc)

    def fail_closed(self, zone_id: str, what: str, exc: BaseException) -> None:
        """`what` failed for the zone: freeze it, then end it (the strongest reaction)."""
        self.core.fault(zone_id, what, exc)
        run = self.core.zones.get(zone_id)
        if run is None:
            return
        with run.lock:
            if not run.live or run.handle is None:
                return
            try:
                self.core.driver_of(run).freeze(run.handle)
                run.state = ZoneState.FROZEN
            except Exception as frozen_exc:  # ending it below is what matters
                log.warning("zone %s: freezing to fail closed: %s", zone_id, frozen_exc)
            self.ending.end(run, f"{what} failed ({type(exc).__name__}: {exc}); ended to "
                            "fail closed", EndCause.FAIL_CLOSED)

    # -- steering: every call is audited -----------------------------------------------------

    def accelerate(self, zone_id: str, factor: float, *, reason: str,
                   anomaly_id: int | None = None, by: str = "operator") -> dict[int, float]:
        """Divide the time left before each pending transition by `factor`."""
        if not factor > 1:
            raise ZoneError(f"acceleration factor {factor:g} must be above 1", zone_id=zone_id)
        run = self.core.zones.require(zone_id)
        with run.lock:
            now = time.time()
            moved = {i: now + max(0.0, due - now) / factor for i, due in run.pending.items()}
            for index, due in moved.items():
                self.core.timeline.move(zone_id, index, due)
            run.pending.update(moved)
            with self.core.store.session() as session:
                told = self._audit(session, run, "accelerate", {"factor": factor}, reason, by,
                                   anomaly_id)
                self.core.save(session, run)
            self._deputy(run)
        self._tell(told)
        return moved

    def jump(self, zone_id: str, *, reason: str, by: str = "operator",
             anomaly_id: int | None = None) -> int | None:
        """Bring the next pending transition forward to now. Returns its phase index."""
        run = self.core.zones.require(zone_id)
        with run.lock:
            index = min(run.pending) if run.pending else None
            if index is not None:
                run.pending[index] = time.time()
                self.core.timeline.move(zone_id, index, run.pending[index])
            with self.core.store.session() as session:
                told = self._audit(session, run, "jump", {"phase": index}, reason, by,
                                   anomaly_id,
                                   effect="" if index is not None else "none: no phase left")
                self.core.save(session, run)
            self._deputy(run)
        self._tell(told)
        return index

    def freeze(self, zone_id: str, *, reason: str, by: str = "operator",
               anomaly_id: int | None = None) -> None:
        run = self.core.zones.require(zone_id)
        with run.lock:
            self.core.driver_of(run).freeze(run.require_handle())
            run.state = ZoneState.FROZEN
            with self.core.store.session() as session:
                told = self._audit(session, run, "freeze", {}, reason, by, anomaly_id)
                self.core.save(session, run)
        self._tell(told)

    def thaw(self, zone_id: str, *, reason: str, by: str = "operator") -> None:
        run = self.core.zones.require(zone_id)
        with run.lock:
            self.core.driver_of(run).thaw(run.require_handle())
            run.state = ZoneState.RUNNING
            with self.core.store.session() as session:
                told = self._audit(session, run, "thaw", {}, reason, by, None)
                self.core.save(session, run)
        self._tell(told)

    def terminate(self, zone_id: str, *, reason: str, by: str = "operator",
                  anomaly_id: int | None = None) -> None:
        run = self.core.zones.require(zone_id)
        with run.lock:
            if not run.live:
                return
            with self.core.store.session() as session:
                told = self._audit(session, run, "terminate", {}, reason, by, anomaly_id)
            self._tell(told)
            cause = EndCause.OPERATOR if by == "operator" else EndCause.REACTION
            self.ending.end(run, reason, cause)

    def _audit(self, session: Session, run: ZoneRun, action: str, args: dict[str, Any],
               reason: str, by: str, anomaly_id: int | None, *,
               effect: str = "") -> ReactionTaken | None:
        """Write the step's rows; the notice to announce once they are committed."""
        record_event(session, zone_id=run.zone_id, kind=action, detail=f"{by}: {reason}")
        if by == "operator":
            record_operator(session, actor=self.core.actor, action=action,
                            zone_id=run.zone_id, args=args, reason=reason)
            return None
        record_reaction(session, zone_id=run.zone_id, action=action,
                        reason=f"{reason}; {effect}" if effect else reason,
                        anomaly_id=anomaly_id)
        return ReactionTaken(run.zone_id, time.time(), action, reason, effect, args)

    def _tell(self, notice: ReactionTaken | None) -> None:
        if notice is not None:
            self.core.notify(notice)
