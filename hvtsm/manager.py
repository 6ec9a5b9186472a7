"""The manager: zones' lifecycles, where a due phase becomes an applied restriction and an
anomaly becomes a reaction. Every step is written to the store before it is announced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import select

from hvtsm.channels.broker import Broker
from hvtsm.controllers import (
    claim_zone,
    dead_controllers,
    orphaned_zones,
    register_controller,
    release_zone,
)
from hvtsm.errors import HvtsmError, ZoneError
from hvtsm.monitor.anomalies import AnomalyReport
from hvtsm.monitor.code_path import CodePath
from hvtsm.monitor.link import AgentLink
from hvtsm.policy import Policy, Reaction, parse_policy
from hvtsm.restrictions import Restrictions
from hvtsm.store import Store
from hvtsm.store.audit import (
    record_anomaly,
    record_event,
    record_operator,
    record_phase,
    record_reaction,
)
from hvtsm.store.models import Controller, Zone, ZoneState
from hvtsm.timeline import Timeline, job_id
from hvtsm.transient import Transients, monitor_transient, transient_policy
from hvtsm.zones.base import Backend, Workload, WorkloadIO, ZoneDriver, ZoneHandle, ZoneSpec

log = logging.getLogger(__name__)

#: a phase applied more than this behind schedule is audited as late
LATE_AFTER_MS = 1000.0


@dataclass(frozen=True)
class Notice:
    """Something that happened to a zone, for whoever watches (the CLI, later the TUI)."""

    kind: str  # "start" | "phase" | "note" | "anomaly" | "reaction" | "exit"
    zone_id: str
    ts: float
    data: dict[str, Any]


Listener = Callable[[Notice], None]


@dataclass
class ZoneRun:
    """A zone this controller drives."""

    zone_id: str
    policy: Policy
    scale: float
    handle: ZoneHandle
    workload: Workload | None
    started_at: float
    #: phase index -> due epoch of transitions not yet applied
    pending: dict[int, float]
    phase_index: int
    state: ZoneState = ZoneState.RUNNING
    #: transitions that fell due while no controller ran (found on adoption)
    overdue: set[int] = field(default_factory=set)
    exit_status: int | None = None
    end_reason: str | None = None
    #: anomalies seen so far (repeated anomalies escalate)
    anomalies: int = 0
    #: name within its group, the group (pipeline, invocation) and the zone it was split
    #: from (transient zones)
    name: str | None = None
    group: str | None = None
    parent: str | None = None
    #: "zone", "segment" or "transient"
    kind: str = "zone"
    #: the policy its transient zones get (None: they are off), their ids, and how many
    #: were ever split off (max_zones counts those)
    transient_policy: Policy | None = None
    children: list[str] = field(default_factory=list)
    splits: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock)
    ended: threading.Event = field(default_factory=threading.Event)


class Manager:
    def __init__(self, store: Store, drivers: ZoneDriver | Sequence[ZoneDriver], *,
                 listener: Listener | None = None, actor: str = "operator") -> None:
        """`drivers`: one per backend this controller may drive; the first is the default
        for `launch`."""
        self.store = store
        listed = [drivers] if not isinstance(drivers, Sequence) else list(drivers)
        self.drivers: dict[Backend, ZoneDriver] = {d.backend: d for d in listed}
        self.driver = listed[0]
        #: messages between zones (named zones of a group): see hvtsm/channels/broker.py
        self.broker = Broker(store, link_of=self._channel_link, anomaly=self._driver_anomaly)
        for driver in listed:
            if hasattr(driver, "report"):
                driver.report = self._driver_report
            if hasattr(driver, "anomaly"):
                driver.anomaly = self._driver_anomaly
            if hasattr(driver, "code_path"):
                driver.code_path = self._driver_code_path
            if hasattr(driver, "channels"):
                driver.channels = self.broker.on_message
        self.listener = listener
        self.actor = actor
        self.zones: dict[str, ZoneRun] = {}
        self._zones_lock = threading.Lock()
        with store.session() as session:
            self.controller: Controller = register_controller(session)
        self.timeline = Timeline(store.engine, self.controller.id)
        self._started = False
        self._held: dict[str, list[Notice]] = {}
        self._held_lock = threading.Lock()
        # anomalies arrive on agent-link reader threads, which a reaction (terminate)
        # may need to stop: reactions run on a thread of their own, in arrival order
        # held code paths (transient zones) go the same way, so an anomaly reported after
        # a split finds the transient zone made
        self._anomalies: queue.Queue[tuple[str, AnomalyReport | CodePath] | None] = \
            queue.Queue()
        self.transients = Transients(self)
        self._reactor = threading.Thread(target=self._react_loop, name="reactions",
                                         daemon=True)
        self._reactor.start()

    # -- controller lifecycle -------------------------------------------------------------

    def start(self, *, adopt: bool = False) -> list[str]:
        """Start the timeline. With adopt, first take over the live zones of dead
        controllers on this host; their overdue transitions then fire at once.
        Returns the adopted zone ids."""
        adopted: list[str] = []
        tables: list[str] = []
        if adopt:
            with self.store.session() as session:
                orphans = orphaned_zones(session)
                # a dead controller's schedule moves as a whole, so only controllers
                # whose zones this one can all drive are taken over
                blocked = {z.controller_id for z in orphans
                           if z.backend not in {str(b) for b in self.drivers}}
                dead = [c for c in dead_controllers(session) if c.id not in blocked]
                tables = [c.jobs_table for c in dead]
                orphans = [z for z in orphans if z.controller_id not in blocked]
            for zone in orphans:
                if self._adopt(zone):
                    adopted.append(zone.id)
            self.transients.relink()
        self.timeline.start(self._phase_due, adopt_tables=tables)
        scheduled = self.timeline.pending()
        for zone_id in adopted:
            run = self.zones[zone_id]
            with run.lock:
                for index, due in run.pending.items():
                    # the zone row is written with its schedule; a job lost in a crash
                    # between the two writes is made again
                    if job_id(zone_id, index) not in scheduled:
                        self.timeline.schedule(zone_id, index, due)
        if adopt:
            with self.store.session() as session:
                for c in dead:
                    row = session.get(Controller, c.id)
                    if row is not None:
                        session.delete(row)
        self._started = True
        return adopted

    def shutdown(self, *, reason: str = "controller shutting down") -> None:
        """End every zone still running here, then stop the timeline and deregister."""
        for run in list(self.zones.values()):
            if not run.ended.is_set():
                self.terminate(run.zone_id, reason=reason, by="operator")
                run.ended.wait(10)
        self._anomalies.put(None)
        self._reactor.join(10)
        self.broker.close()
        for driver in self.drivers.values():
            close = getattr(driver, "close", None)
            if close is not None:
                close()
        self.timeline.shutdown(drop=True)
        with self.store.session() as session:
            row = session.get(Controller, self.controller.id)
            if row is not None:
                session.delete(row)

    # -- zones ------------------------------------------------------------------------------

    def launch(self, policy: Policy, argv: Sequence[str], *, io: WorkloadIO | None = None,
               user: str | None = None, scale: float = 1.0,
               policy_toml: str | None = None, backend: Backend | None = None,
               name: str | None = None, group: str | None = None,
               kind: str = "zone", expect_exec: Sequence[str] = (),
               cwd: str | None = None, env: Mapping[str, str] | None = None,
               create: Callable[[ZoneSpec, Restrictions], ZoneHandle] | None = None,
               ) -> ZoneRun:
        """Make a zone, start `argv` in it and schedule its phases. Raises ZoneError with
        nothing left behind but the zone's (failed) audit record. `name` and `group` place
        the zone among others made together (a pipeline's segments). `expect_exec`: the
        programs the analysis found, which run without a transient zone (hvtsm.transient).
        `create` makes the zone instead of the driver's `create` (a warm pool binds an
        already booted guest); it must behave like it (all or nothing, ZoneError)."""
        if not argv:
            raise ZoneError("no command to run", hint="give it after '--'")
        driver = self._driver_for(backend or self.driver.backend)
        zone_id = "z" + secrets.token_hex(4)
        initial = policy.initial()
        tpolicy = transient_policy(policy) if policy.anomaly.monitor else None
        monitor: dict[str, Any] | None = None
        if policy.anomaly.monitor:
            monitor = policy.anomaly.profile()
            watch = monitor_transient(policy, argv, expect_exec)
            if watch is not None:
                monitor["transient"] = watch
        zero = [p for p in policy.phases if p.at_ms == 0 and not p.terminate]
        if name is not None:
            # a named zone gets a channel: it joins its group's broker before it exists
            self.broker.register(zone_id, name=name, group=group, grants=policy.channels,
                                 phase=zero[-1].index if zero else -1)
        toml = policy_toml if policy_toml is not None else _read_text(policy.source)
        with self.store.session() as session:
            row = Zone(id=zone_id, backend=str(driver.backend), state=ZoneState.CREATING,
                       policy_name=policy.name, policy_digest=policy.digest,
                       policy_source=policy.source, policy_toml=toml, lifespan_scale=scale,
                       command=json.dumps(list(argv)), user=user,
                       controller_id=self.controller.id, created_at=time.time(),
                       name=name, group_id=group, kind=kind)
            session.add(row)
            record_event(session, zone_id=zone_id, kind="created",
                         detail=f"policy {policy.name}, scale {scale:g}, command {list(argv)}")
            session.flush()
            assert row.seq is not None
            seq = row.seq
        claim_zone(zone_id)
        self._hold(zone_id)
        try:
            spec = ZoneSpec(
                zone_id=zone_id, net_index=seq, user=user, memory_dump=policy.memory_dump,
                monitor=monitor, expect_exec=tuple(expect_exec), cwd=cwd, env=env,
                channel=name)
            handle = (create or driver.create)(spec, initial)
        except HvtsmError as exc:
            self._fail(zone_id, f"could not create the zone: {exc}")
            self._release(zone_id)
            raise
        try:
            workload = driver.start(handle, argv, io or WorkloadIO())
        except HvtsmError as exc:
            driver.terminate(handle)
            self._fail(zone_id, f"could not start {argv[0]!r}: {exc}")
            self._release(zone_id)
            raise
        started = time.time()
        pending = {p.index: started + p.at_ms * scale / 1000 for p in policy.later_phases()}
        run = ZoneRun(zone_id=zone_id, policy=policy, scale=scale, handle=handle,
                      workload=workload, started_at=started, pending=pending,
                      phase_index=zero[-1].index if zero else -1, name=name, group=group,
                      kind=kind, transient_policy=tpolicy)
        with self._zones_lock:
            self.zones[zone_id] = run
        if name is not None:
            self.broker.started(zone_id)  # what was held for it goes now
        # jobs first: a controller killed from here on leaves a schedule to adopt
        for index, due in pending.items():
            self.timeline.schedule(zone_id, index, due)
        with self.store.session() as session:
            note = getattr(workload, "start_note", None)  # e.g. a pooled guest's standby
            record_event(session, zone_id=zone_id, kind="started",
                         detail=f"pid {workload.pid}" + (f"; {note}" if note else ""),
                         ts=started)
            for phase in zero:
                record_phase(session, zone_id=zone_id, phase_index=phase.index,
                             scheduled_at=started, applied_at=started, late=False,
                             changes=phase.restrictions.describe(),
                             note="in force before the workload started")
            self._save(session, run, state=ZoneState.RUNNING, started_at=started)
        lifespan = policy.lifespan_ms
        self._notify("start", zone_id, started, {
            "pid": workload.pid, "policy": policy.name, "backend": str(driver.backend),
            "scale": scale, "lifespan_ms": None if lifespan is None else lifespan * scale,
            **{k: handle.state[k] for k in ("accel", "boot_ms") if k in handle.state}})
        for phase in zero:
            self._notify("phase", zone_id, started, self._phase_data(run, phase.index, started,
                                                                      started,
                                                                      phase.restrictions
                                                                      .describe()))
        self._release(zone_id)
        self._watch(run)
        return run

    def _watch(self, run: ZoneRun) -> None:
        threading.Thread(target=self._wait_exit, args=(run,), name=f"wait-{run.zone_id}",
                         daemon=True).start()

    def wait(self, zone_id: str, timeout: float | None = None) -> ZoneRun:
        run = self.zones[zone_id]
        run.ended.wait(timeout)
        return run

    # -- steering: every call is audited ----------------------------------------------------

    def accelerate(self, zone_id: str, factor: float, *, reason: str,
                   anomaly_id: int | None = None, by: str = "operator") -> dict[int, float]:
        """Divide the time left before each pending transition by `factor`."""
        if factor <= 1:
            raise ZoneError(f"acceleration factor {factor:g} must be above 1", zone_id=zone_id)
        run = self._run(zone_id)
        with run.lock:
            now = time.time()
            moved = {i: now + max(0.0, due - now) / factor for i, due in run.pending.items()}
            for index, due in moved.items():
                self.timeline.move(zone_id, index, due)
            run.pending.update(moved)
            with self.store.session() as session:
                self._audit_steer(session, run, "accelerate", {"factor": factor}, reason, by,
                                  anomaly_id)
                self._save(session, run)
        return moved

    def jump(self, zone_id: str, *, reason: str, by: str = "operator",
             anomaly_id: int | None = None) -> int | None:
        """Bring the next pending transition forward to now. Returns its phase index."""
        run = self._run(zone_id)
        with run.lock:
            if not run.pending:
                return None
            index = min(run.pending)
            run.pending[index] = time.time()
            self.timeline.move(zone_id, index, run.pending[index])
            with self.store.session() as session:
                self._audit_steer(session, run, "jump", {"phase": index}, reason, by,
                                  anomaly_id)
                self._save(session, run)
        return index

    def freeze(self, zone_id: str, *, reason: str, by: str = "operator",
               anomaly_id: int | None = None) -> None:
        run = self._run(zone_id)
        with run.lock:
            self._driver_for(run.handle.backend).freeze(run.handle)
            run.state = ZoneState.FROZEN
            with self.store.session() as session:
                self._audit_steer(session, run, "freeze", {}, reason, by, anomaly_id)
                self._save(session, run)

    def thaw(self, zone_id: str, *, reason: str, by: str = "operator") -> None:
        run = self._run(zone_id)
        with run.lock:
            self._driver_for(run.handle.backend).thaw(run.handle)
            run.state = ZoneState.RUNNING
            with self.store.session() as session:
                self._audit_steer(session, run, "thaw", {}, reason, by, None)
                self._save(session, run)

    def terminate(self, zone_id: str, *, reason: str, by: str = "operator",
                  anomaly_id: int | None = None) -> None:
        run = self._run(zone_id)
        with run.lock:
            if run.state is ZoneState.TERMINATED or run.ended.is_set():
                return
            with self.store.session() as session:
                self._audit_steer(session, run, "terminate", {}, reason, by, anomaly_id)
            self._end(run, reason)

    def report_anomaly(self, zone_id: str, *, kind: str, detail: str, source: str,
                       evidence: dict[str, Any] | None = None) -> Reaction | None:
        """Record an anomaly and react as the zone's policy says (repeated anomalies
        escalate). Returns the reaction taken (None once the zone has ended)."""
        return self._react(zone_id, AnomalyReport(kind, detail, source, evidence or {}))

    def _react(self, zone_id: str, report: AnomalyReport) -> Reaction | None:
        zone_id = self.transients.attribute(zone_id, report)
        return self._react_in(zone_id, report)

    def _react_in(self, zone_id: str, report: AnomalyReport) -> Reaction | None:
        run = self._run(zone_id)
        if report.category == "events-dropped" and not run.policy.anomaly.drops_are_anomalies:
            self._driver_report(zone_id, "events-dropped", report.detail)  # counted, no more
            return None
        now = time.time()
        with self.store.session() as session:
            anomaly_id = record_anomaly(session, zone_id=zone_id, kind=report.category,
                                        detail=report.detail, source=report.source,
                                        evidence=report.evidence_json(), ts=now)
        self._notify("anomaly", zone_id, now, {"kind": report.category,
                                                "detail": report.detail,
                                                "source": report.source,
                                                "evidence": report.evidence})
        with run.lock:
            if run.ended.is_set() or run.state is ZoneState.TERMINATED:
                return None
            run.anomalies += 1
            reaction = run.policy.anomaly.reaction_for(report.category, run.anomalies)
            reason = f"anomaly {report.category} (#{run.anomalies}): {report.detail}"
            if reaction is Reaction.TERMINATE:
                self.terminate(zone_id, reason=reason, by="reaction", anomaly_id=anomaly_id)
            elif reaction is Reaction.FREEZE:
                if run.state is not ZoneState.FROZEN:
                    self.freeze(zone_id, reason=reason, by="reaction", anomaly_id=anomaly_id)
            elif reaction is Reaction.JUMP:
                self.jump(zone_id, reason=reason, by="reaction", anomaly_id=anomaly_id)
            else:
                self.accelerate(zone_id, run.policy.anomaly.factor, reason=reason,
                                anomaly_id=anomaly_id, by="reaction")
        return reaction

    def _driver_anomaly(self, zone_id: str, report: AnomalyReport) -> None:
        """From a driver's agent link (any thread): queued for the reactions thread."""
        self._anomalies.put((zone_id, report))

    def _driver_code_path(self, zone_id: str, request: CodePath) -> None:
        """From a driver's agent link: a held code path, queued for the reactions thread."""
        self._anomalies.put((zone_id, request))

    def _react_loop(self) -> None:
        while (item := self._anomalies.get()) is not None:
            zone_id, report = item
            # an act right after exec can be reported before launch registered the zone
            deadline = time.monotonic() + 5
            while zone_id not in self.zones and time.monotonic() < deadline:
                time.sleep(0.01)
            try:
                if isinstance(report, CodePath):
                    self.transients.split(zone_id, report)
                    continue
                self._react(zone_id, report)
            except ZoneError as exc:  # a zone whose launch failed (audited as such)
                log.info("no reaction to %s: %s", report.category, exc)
            except Exception:  # one failed reaction must not stop the others
                log.exception("reaction to %s in %s failed", report.category, zone_id)
            finally:
                self._anomalies.task_done()

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait until every anomaly reported so far has been reacted to (audited)."""
        deadline = time.monotonic() + timeout
        while self._anomalies.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._anomalies.unfinished_tasks

    # -- internals ---------------------------------------------------------------------------

    def _driver_for(self, backend: Backend) -> ZoneDriver:
        driver = self.drivers.get(backend)
        if driver is None:
            raise ZoneError(f"this controller has no {backend} driver",
                            hint=f"start it with the {backend} backend available")
        return driver

    def _run(self, zone_id: str) -> ZoneRun:
        with self._zones_lock:
            run = self.zones.get(zone_id)
        if run is None:
            raise ZoneError("not driven by this controller", zone_id=zone_id)
        return run

    def _phase_due(self, zone_id: str, phase_index: int, due: float) -> None:
        """Timeline callback (scheduler thread). Applies the phase and everything before it
        that has not been applied yet, in one step."""
        with self._zones_lock:
            run = self.zones.get(zone_id)
        if run is None:
            log.warning("phase %d fell due for zone %s, which this controller does not drive",
                        phase_index, zone_id)
            return
        with run.lock:
            if run.ended.is_set() or run.state is ZoneState.TERMINATED:
                return
            if phase_index <= run.phase_index:
                return  # already in force: applied together with a later phase
            phase = run.policy.phases[phase_index]
            previous = run.handle.applied
            if phase.terminate:
                self._end(run, f"policy {run.policy.name}: lifespan ended (phase {phase_index})",
                          due=due, phase_index=phase_index)
                return
            target = self.transients.bound(run, phase.restrictions)
            try:
                report = self._driver_for(run.handle.backend).apply(run.handle, target)
            except HvtsmError as exc:
                applied = time.time()
                with self.store.session() as session:
                    record_event(session, zone_id=zone_id, kind="error",
                                 detail=f"phase {phase_index} could not be applied: {exc}")
                # fail closed: a zone whose tightening failed must not keep running looser
                self._end(run, f"phase {phase_index} could not be applied ({exc}); "
                          "terminated to fail closed", due=due, phase_index=phase_index,
                          applied=applied)
                return
            applied = time.time()
            changes = target.changes_from(previous)
            self._mark_applied(run, phase_index, due, applied, changes, "; ".join(report.notes))
            self.transients.follow_parent(run)
        self._notify("phase", zone_id, applied, self._phase_data(run, phase_index, due, applied,
                                                                 changes))

    def _mark_applied(self, run: ZoneRun, phase_index: int, due: float, applied: float,
                      changes: dict[str, str], note: str = "") -> None:
        skipped = sorted(i for i in run.pending if i < phase_index)
        self.timeline.cancel(run.zone_id, skipped)
        run.pending.pop(phase_index, None)
        with self.store.session() as session:
            for index in skipped:
                record_phase(session, zone_id=run.zone_id, phase_index=index,
                             scheduled_at=run.pending.pop(index), applied_at=applied,
                             late=(applied - due) * 1000 > LATE_AFTER_MS
                             or index in run.overdue, changes={},
                             note=f"applied together with phase {phase_index}")
            overdue = phase_index in run.overdue
            notes = ["fell due while no controller ran"] if overdue else []
            record_phase(session, zone_id=run.zone_id, phase_index=phase_index,
                         scheduled_at=due, applied_at=applied,
                         late=overdue or (applied - due) * 1000 > LATE_AFTER_MS, changes=changes,
                         note="; ".join([*notes, note] if note else notes))
            run.phase_index = phase_index
            self._save(session, run)
        self.broker.phase(run.zone_id, phase_index)

    def _phase_data(self, run: ZoneRun, index: int, due: float, applied: float,
                    changes: dict[str, str]) -> dict[str, Any]:
        phase = run.policy.phases[index]
        return {"phase": index, "at_ms": phase.at_ms * run.scale, "scheduled": due,
                "lag_ms": round((applied - due) * 1000, 3),
                "late": index in run.overdue or (applied - due) * 1000 > LATE_AFTER_MS,
                "changes": changes}

    def _end(self, run: ZoneRun, reason: str, *, due: float | None = None,
             phase_index: int | None = None, applied: float | None = None) -> None:
        """Terminate (caller holds run.lock). The exit waiter records the end."""
        run.state = ZoneState.TERMINATED
        run.end_reason = reason
        self.timeline.cancel(run.zone_id, [i for i in run.pending if i != phase_index])
        self.transients.end_children(run)
        self._driver_for(run.handle.backend).terminate(run.handle)
        done = applied or time.time()
        if phase_index is not None and due is not None:
            self._mark_applied(run, phase_index, due, done, {"action": "terminate"})
            self._notify("phase", run.zone_id, done, self._phase_data(
                run, phase_index, due, done, {"action": "terminate"}))
        if run.workload is None:
            self._finish(run, None)

    def _wait_exit(self, run: ZoneRun) -> None:
        assert run.workload is not None
        status = run.workload.wait()
        if run.policy.anomaly.monitor:
            if status == -9:
                # likely the agent's containment: its report is on the way; the host's
                # reaction to it belongs before the end of the zone
                time.sleep(0.1)
            self.settle(2)
        with run.lock:
            if run.state is not ZoneState.TERMINATED:
                run.state = ZoneState.EXITED
                self.timeline.cancel(run.zone_id, list(run.pending))
                # the workload's children die with the zone, as in a container, and so do
                # its transient zones
                self.transients.end_children(run)
                self._driver_for(run.handle.backend).terminate(run.handle)
            self._finish(run, status)

    def _finish(self, run: ZoneRun, status: int | None) -> None:
        if run.ended.is_set():
            return
        now = time.time()
        run.exit_status = status
        if run.state is ZoneState.EXITED:
            run.end_reason = "workload exited" if status is not None else "workload ended"
        with self.store.session() as session:
            record_event(session, zone_id=run.zone_id, kind=str(run.state),
                         detail=f"{run.end_reason}; exit status {status}")
            self._save(session, run, ended_at=now, exit_status=status, end_reason=run.end_reason)
        release_zone(run.zone_id)
        self.broker.ended(run.zone_id)
        run.ended.set()
        data: dict[str, Any] = {"status": status, "state": str(run.state),
                                "reason": run.end_reason}
        if run.parent is not None:
            data.update(parent=run.parent, kind=run.kind, name=run.name)
        self._notify("exit", run.zone_id, now, data)

    def _fail(self, zone_id: str, detail: str) -> None:
        release_zone(zone_id)
        self.broker.ended(zone_id)
        with self.store.session() as session:
            record_event(session, zone_id=zone_id, kind="failed", detail=detail)
            row = session.exec(select(Zone).where(Zone.id == zone_id)).one()
            row.state = ZoneState.FAILED
            row.ended_at = time.time()
            row.end_reason = detail

    def _adopt(self, zone: Zone) -> bool:
        """Take over a zone whose controller died. Returns False when nothing runs in it."""
        policy = parse_policy(zone.policy_toml.encode(), source=zone.policy_source)
        applied = Restrictions.from_json(json.loads(zone.applied))
        driver = self._driver_for(Backend(zone.backend))
        handle, workload = driver.adopt(zone.id, json.loads(zone.driver_state), applied)
        run = ZoneRun(zone_id=zone.id, policy=policy, scale=zone.lifespan_scale, handle=handle,
                      workload=workload, started_at=zone.started_at or zone.created_at,
                      pending={int(k): v for k, v in json.loads(zone.pending).items()},
                      phase_index=zone.phase_index, state=ZoneState(zone.state),
                      name=zone.name, group=zone.group_id, parent=zone.parent_id,
                      kind=zone.kind)
        now = time.time()
        run.overdue = {i for i, due in run.pending.items() if due <= now}
        if zone.name is not None and workload is not None:
            # its group's held messages died with the old controller; it can go on sending
            with contextlib.suppress(ZoneError):
                self.broker.register(zone.id, name=zone.name, group=zone.group_id,
                                     grants=policy.channels, phase=zone.phase_index)
                self.broker.started(zone.id)
        with self._zones_lock:
            self.zones[zone.id] = run
        claim_zone(zone.id)
        with self.store.session() as session:
            record_event(session, zone_id=zone.id, kind="adopted",
                         detail=f"by controller {self.controller.id}; "
                         f"{len(run.pending)} transition(s) pending")
            self._save(session, run)
        if workload is None:
            with run.lock:
                run.state = ZoneState.EXITED
                driver.terminate(handle)
                self._finish(run, None)
            return False
        self._watch(run)
        return True

    def _audit_steer(self, session: Any, run: ZoneRun, action: str, args: dict[str, Any],
                     reason: str, by: str, anomaly_id: int | None) -> None:
        if by == "operator":
            record_operator(session, actor=self.actor, action=action, zone_id=run.zone_id,
                            args=args, reason=reason)
        else:
            record_reaction(session, zone_id=run.zone_id, action=action, reason=reason,
                            anomaly_id=anomaly_id)
            self._notify("reaction", run.zone_id, time.time(), {"action": action, **args,
                                                                  "reason": reason})
        record_event(session, zone_id=run.zone_id, kind=action, detail=f"{by}: {reason}")

    def _save(self, session: Any, run: ZoneRun, **extra: Any) -> None:
        row = session.exec(select(Zone).where(Zone.id == run.zone_id)).one()
        row.state = str(run.state)
        row.phase_index = run.phase_index
        row.applied = json.dumps(run.handle.applied.to_json())
        row.driver_state = json.dumps(run.handle.state)
        row.pending = json.dumps({str(k): v for k, v in run.pending.items()})
        row.controller_id = self.controller.id
        for key, value in extra.items():
            setattr(row, key, value)

    def _channel_link(self, zone_id: str) -> AgentLink | None:
        """The agent link of a zone's channel, from whichever driver runs it."""
        for driver in self.drivers.values():
            find = getattr(driver, "channel_link", None)
            link = find(zone_id) if find is not None else None
            if link is not None:
                return link
        return None

    def _driver_report(self, zone_id: str, kind: str, detail: str) -> None:
        """A fact a driver learned after `apply` returned (an unplug completing, what the
        guest sees): audited and announced like everything else."""
        now = time.time()
        with self.store.session() as session:
            record_event(session, zone_id=zone_id, kind=kind, detail=detail, ts=now)
        self._notify("note", zone_id, now, {"kind": kind, "detail": detail})

    def _hold(self, zone_id: str) -> None:
        """Notes a driver reports while the zone is being made (the agent's "monitor"
        line) are audited at once but announced after the zone's "start"."""
        with self._held_lock:
            self._held[zone_id] = []

    def _release(self, zone_id: str) -> None:
        with self._held_lock:
            held = self._held.pop(zone_id, [])
        for notice in held:
            self._notify(notice.kind, notice.zone_id, notice.ts, notice.data)

    def _notify(self, kind: str, zone_id: str, ts: float, data: dict[str, Any]) -> None:
        if kind != "start":
            with self._held_lock:
                if zone_id in self._held:
                    self._held[zone_id].append(Notice(kind, zone_id, ts, data))
                    return
        if self.listener is not None:
            try:
                self.listener(Notice(kind, zone_id, ts, data))
            except Exception:  # a broken watcher must never stop the timeline
                log.exception("listener failed on %s notice", kind)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()
