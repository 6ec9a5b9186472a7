"""Taking over the zones of controllers that died: their live zones are rebuilt from the
store (`ZoneDriver.adopt` from the stored driver state, read again from the zone itself
where it can be ahead of the store), what each zone's deputy (its agent) applied meanwhile
is audited at the agent's times (lifecycle/deputy.py), their jobs move into this
controller's table, and every transition that fell due meanwhile and that no deputy
applied fires at once, audited as late ("fell due while no controller ran"). A transition
half-applied before the crash is finished by that same firing: the driver finds the done
part in force (audited "already in force"), so it never fails on it and never ends the
zone early.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from hvtsm.controllers import claim_zone, dead_controllers, orphaned_zones
from hvtsm.errors import ZoneError
from hvtsm.lifecycle.core import Core
from hvtsm.lifecycle.deputy import BACK_TIMEOUT_S, Deputies
from hvtsm.lifecycle.ending import Ending
from hvtsm.lifecycle.notices import Adopted
from hvtsm.lifecycle.zonerun import ZoneKind, ZoneRun
from hvtsm.policy import parse_policy
from hvtsm.policy.loader import EVERY_CPU
from hvtsm.restrictions import Restrictions
from hvtsm.store.audit import record_event
from hvtsm.store.models import Controller, Zone, ZoneState
from hvtsm.timeline import job_id
from hvtsm.zones.base import Backend

log = logging.getLogger(__name__)


class Adoption:
    def __init__(self, core: Core, ending: Ending, deputies: Deputies) -> None:
        self.core = core
        self.ending = ending
        self.deputies = deputies

    def orphans(self) -> tuple[list[Zone], list[Controller]]:
        """The live zones of dead controllers this one can take over, and those controllers
        (a dead controller's schedule moves as a whole, so only controllers whose zones this
        one can all drive are taken over)."""
        with self.core.store.session() as session:
            orphans = orphaned_zones(session)
            backends = {str(b) for b in self.core.drivers}
            blocked = {z.controller_id for z in orphans if z.backend not in backends}
            dead = [c for c in dead_controllers(session) if c.id not in blocked]
            return [z for z in orphans if z.controller_id not in blocked], dead

    def adopt_all(self, zones: list[Zone]) -> list[ZoneRun]:
        """Take over each zone; returns those still running. Every zone's agent is taken
        back before any of their reports is waited for, so their reconnections overlap."""
        taken = [self._take(zone) for zone in zones]
        return [run for run, dead in taken if self._settle(run, dead)]

    def _take(self, zone: Zone) -> tuple[ZoneRun, str | None]:
        """The zone's handle and run, registered (its agent reconnects meanwhile)."""
        policy = parse_policy(zone.policy_toml.encode(), source=zone.policy_source,
                              host_cpus=EVERY_CPU)
        applied = Restrictions.from_json(json.loads(zone.applied))
        driver = self.core.driver_for(Backend(zone.backend))
        stored = json.loads(zone.driver_state)
        handle, workload = driver.adopt(zone.id, stored, applied)
        found = drift(stored, handle.state.to_json())
        run = ZoneRun(zone_id=zone.id, policy=policy, scale=zone.lifespan_scale,
                      kind=ZoneKind(zone.kind), name=zone.name, group=zone.group_id,
                      parent=zone.parent_id, handle=handle, workload=workload,
                      started_at=zone.started_at or zone.created_at,
                      pending={int(k): v for k, v in json.loads(zone.pending).items()},
                      phase_index=zone.phase_index, state=ZoneState(zone.state),
                      announced=True)
        if zone.name is not None and workload is not None:
            # its group's held messages died with the old controller; it can go on sending
            with contextlib.suppress(ZoneError):
                broker = self.core.channels()
                broker.register(zone.id, name=zone.name, group=zone.group_id,
                                grants=policy.channels, phase=zone.phase_index)
                broker.started(zone.id)
        self.core.zones.add(run)
        claim_zone(zone.id)
        with self.core.store.session() as session:
            record_event(session, zone_id=zone.id, kind="adopted",
                         detail=f"by controller {self.core.controller.id}; "
                         f"{len(run.pending)} transition(s) pending"
                         + (f"; read from the zone: {', '.join(found)}" if found else ""))
            self.core.save(session, run)
        assert run.started_at is not None
        self.core.notify(Adopted(zone.id, run.started_at, tuple(sorted(run.pending))))
        return run, zone.controller_id

    def _settle(self, run: ZoneRun, dead: str | None) -> bool:
        """What the zone's deputy applied while no controller ran is audited first; only
        what it did not apply is overdue (applied by this controller at once, late). False
        when the zone is over."""
        assert run.handle is not None
        driver = self.core.driver_of(run)
        deputy = driver.deputy(run.handle)
        report = None if deputy is None else deputy.report(BACK_TIMEOUT_S)
        with run.lock:
            self.deputies.adopted(run, report, dead_controller=dead)
            run.overdue = {i for i, due in run.pending.items() if due <= time.time()}
        run.opened.set()
        if not run.live:
            return False  # its deputy ended it (its lifespan, or failing closed)
        if run.workload is None:
            with run.lock:
                run.state = ZoneState.EXITED
                driver.terminate(run.handle)
                self.ending.finish(run, None)
            return False
        self.ending.watch(run)
        return True

    def reschedule(self, runs: list[ZoneRun]) -> None:
        """Jobs an adopted zone should have and its table lost (a crash between writing the
        zone's row and its schedule) are made again."""
        scheduled = self.core.timeline.pending()
        for run in runs:
            with run.lock:
                for index, due in run.pending.items():
                    if job_id(run.zone_id, index) not in scheduled:
                        self.core.timeline.schedule(run.zone_id, index, due)

    def forget(self, dead: list[Controller]) -> None:
        with self.core.store.session() as session:
            for c in dead:
                row = session.get(Controller, c.id)
                if row is not None:
                    session.delete(row)


def drift(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What a driver read from the zone at adoption that its stored state did not say
    ("nic true -> false": a NIC the kernel no longer has, a cut done just before the old
    controller died), field by field."""
    return [f"{key} {json.dumps(stored.get(key))} -> {json.dumps(value)}"
            for key, value in now.items() if key in stored and stored[key] != value]
