"""The manager: the one object callers hold (the CLI, a pipeline, an invoker). A thin
facade over the lifecycle's parts; see the package docstring for which part does what.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hvtsm.channels.audit import ChannelRecord
from hvtsm.channels.broker import Broker
from hvtsm.controllers import register_controller
from hvtsm.lifecycle.adoption import Adoption
from hvtsm.lifecycle.core import Core
from hvtsm.lifecycle.deputy import Deputies
from hvtsm.lifecycle.ending import Ending
from hvtsm.lifecycle.inbox import Handlers, Inbox
from hvtsm.lifecycle.launch import Create, Launcher
from hvtsm.lifecycle.notices import ChannelNotice, Listener, Notifier
from hvtsm.lifecycle.opening import Opener
from hvtsm.lifecycle.phases import Phases
from hvtsm.lifecycle.reactions import Reactions
from hvtsm.lifecycle.transient import Transients
from hvtsm.lifecycle.zonerun import Registry, ZoneKind, ZoneRun
from hvtsm.monitor.anomalies import AnomalyReport
from hvtsm.monitor.link import AgentLink
from hvtsm.policy import Policy, Reaction
from hvtsm.restrictions import Restrictions
from hvtsm.store import Store
from hvtsm.store.models import Controller
from hvtsm.supervise import Supervisor
from hvtsm.timeline import Timeline, job_id
from hvtsm.zones.base import Backend, DriverFactory, WorkloadIO, ZoneDriver


class Manager:
    def __init__(self, store: Store, drivers: DriverFactory | Sequence[DriverFactory], *,
                 listener: Listener | None = None, actor: str = "operator") -> None:
        """`drivers`: how to make one driver per backend this controller may drive (each
        gets the events it reports to); the first is the default for `launch`."""
        factories = list(drivers) if isinstance(drivers, Sequence) else [drivers]
        self.store = store
        self.notices = Notifier(listener)
        self.supervisor = Supervisor()
        with store.session() as session:
            controller: Controller = register_controller(session)
        core = self._core = Core(store, controller, notifier=self.notices,
                                 supervisor=self.supervisor, actor=actor)
        self.supervisor.on_fault = lambda what, exc: core.fault(None, what, exc)
        self.events = Inbox(self.supervisor, notes=core.note,
                            channel=lambda zone, msg: core.channels().on_message(zone, msg))
        self._ending = Ending(core, self.events.exited)
        self._phases = Phases(core, self._ending, bound=self._bound, follow=self._follow,
                              deputy=self._tell_deputy)
        self._deputies = Deputies(core, self._ending, self._phases, bound=self._bound,
                                  follow=self._follow)
        self._opener = Opener(core, self._ending, self._phases)
        self._transients = Transients(core, self._opener, self._ending,
                                      raise_anomaly=self.events.anomaly)
        self._reactions = Reactions(core, self._ending, attribute=self._transients.attribute,
                                    deputy=self._tell_deputy)
        self._launcher = Launcher(core, self._opener)
        self._adoption = Adoption(core, self._ending, self._deputies)
        core.broker = Broker(store, link_of=self.channel_link, anomaly=self.events.anomaly,
                             recorded=self._channel_recorded)
        made = [factory(self.events) for factory in factories]
        core.drivers = {d.backend: d for d in made}
        self.driver: ZoneDriver = made[0]
        self.events.start(Handlers(anomaly=self._reactions.react,
                                   code_path=self._transients.split,
                                   exited=self._ending.exited, failed=self._reactions.failed,
                                   deputy=self._deputies.reported))
        self._started = False

    # -- what callers look at -------------------------------------------------------------

    @property
    def zones(self) -> Registry:
        return self._core.zones

    @property
    def drivers(self) -> Mapping[Backend, ZoneDriver]:
        return self._core.drivers

    @property
    def timeline(self) -> Timeline:
        return self._core.timeline

    @property
    def broker(self) -> Broker:
        return self._core.channels()

    @property
    def transients(self) -> Transients:
        return self._transients

    @property
    def controller(self) -> Controller:
        return self._core.controller

    def channel_link(self, zone_id: str) -> AgentLink | None:
        """The agent link of a zone's channel, from whichever driver runs it."""
        for driver in self._core.drivers.values():
            link = driver.channel_link(zone_id)
            if link is not None:
                return link
        return None

    # -- controller lifecycle -------------------------------------------------------------

    def start(self, *, adopt: bool = False) -> list[str]:
        """Start the timeline. With adopt, first take over the live zones of dead
        controllers on this host; their overdue transitions then fire at once.
        Returns the adopted zone ids."""
        adopted: list[ZoneRun] = []
        dead: list[Controller] = []
        if adopt:
            orphans, dead = self._adoption.orphans()
            adopted = self._adoption.adopt_all(orphans)
            self._transients.relink()
        pending = {job_id(run.zone_id, index) for run in adopted for index in run.pending}
        self.timeline.start(self._phases.guarded_due,
                            adopt_tables=[c.jobs_table for c in dead],
                            keep=pending.__contains__)
        self._adoption.reschedule(adopted)
        self._adoption.forget(dead)
        self._started = True
        return [run.zone_id for run in adopted]

    def shutdown(self, *, reason: str = "controller shutting down") -> None:
        """End every zone still running here, then stop the timeline and deregister."""
        for run in self.zones.all():
            if run.live and run.handle is not None:
                self.terminate(run.zone_id, reason=reason, by="operator")
                run.ended.wait(10)
        self.events.settle(10)
        self.events.stop()
        self.broker.close()
        for driver in self.drivers.values():
            driver.close()
        self.timeline.shutdown(drop=True)
        with self.store.session() as session:
            row = session.get(Controller, self.controller.id)
            if row is not None:
                session.delete(row)

    # -- zones -----------------------------------------------------------------------------

    def launch(self, policy: Policy, argv: Sequence[str], *, io: WorkloadIO | None = None,
               user: str | None = None, scale: float = 1.0, policy_toml: str | None = None,
               backend: Backend | None = None, name: str | None = None,
               group: str | None = None, kind: str = "zone", expect_exec: Sequence[str] = (),
               cwd: str | None = None, env: Mapping[str, str] | None = None,
               create: Create | None = None) -> ZoneRun:
        """Make a zone, start `argv` in it and schedule its phases. Raises ZoneError with
        nothing left behind but the zone's (failed) audit record. `name` and `group` place
        the zone among others made together (a pipeline's segments). `expect_exec`: the
        programs the analysis found, which run without a transient zone. `create` makes the
        zone instead of the driver's `create` (a warm pool binds an already booted guest);
        it must behave like it (all or nothing, ZoneError)."""
        return self._launcher.launch(
            policy, argv, io=io, user=user, scale=scale, policy_toml=policy_toml,
            backend=backend or self.driver.backend, name=name, group=group,
            kind=ZoneKind(kind), expect_exec=expect_exec, cwd=cwd, env=env, create=create)

    def wait(self, zone_id: str, timeout: float | None = None) -> ZoneRun:
        run = self.zones.require(zone_id)
        run.ended.wait(timeout)
        return run

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait until everything drivers reported so far has been worked off (audited)."""
        return self.events.settle(timeout)

    # -- steering: every call is audited ---------------------------------------------------

    def accelerate(self, zone_id: str, factor: float, *, reason: str,
                   anomaly_id: int | None = None, by: str = "operator") -> dict[int, float]:
        return self._reactions.accelerate(zone_id, factor, reason=reason,
                                          anomaly_id=anomaly_id, by=by)

    def jump(self, zone_id: str, *, reason: str, by: str = "operator",
             anomaly_id: int | None = None) -> int | None:
        return self._reactions.jump(zone_id, reason=reason, by=by, anomaly_id=anomaly_id)

    def freeze(self, zone_id: str, *, reason: str, by: str = "operator",
               anomaly_id: int | None = None) -> None:
        self._reactions.freeze(zone_id, reason=reason, by=by, anomaly_id=anomaly_id)

    def thaw(self, zone_id: str, *, reason: str, by: str = "operator") -> None:
        self._reactions.thaw(zone_id, reason=reason, by=by)

    def terminate(self, zone_id: str, *, reason: str, by: str = "operator",
                  anomaly_id: int | None = None) -> None:
        self._reactions.terminate(zone_id, reason=reason, by=by, anomaly_id=anomaly_id)

    def report_anomaly(self, zone_id: str, *, kind: str, detail: str, source: str,
                       evidence: dict[str, Any] | None = None) -> Reaction | None:
        """Record an anomaly and react as the zone's policy says, on the caller's thread
        (repeated anomalies escalate). Returns the reaction recorded."""
        return self._reactions.react(zone_id, AnomalyReport(kind, detail, source,
                                                            evidence or {}))

    # -- wiring between parts --------------------------------------------------------------

    def _channel_recorded(self, record: ChannelRecord) -> None:
        self.notices.emit(ChannelNotice(record.sender_zone, record.ts, record.sender_name,
                                        record.receiver_name, record.size, record.verdict,
                                        record.reason))

    def _bound(self, run: ZoneRun, restrictions: Restrictions) -> Restrictions:
        return self._transients.bound(run, restrictions)

    def _follow(self, run: ZoneRun) -> None:
        self._transients.follow_parent(run)

    def _tell_deputy(self, run: ZoneRun) -> None:
        self._deputies.send(run)

