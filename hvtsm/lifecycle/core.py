"""What every part of the lifecycle shares: the store, the zones driven here, the drivers,
the timeline, the broker and the notices; and the two writes everything does (a zone's row,
an audited note). The parts (opening, phases, reactions, ending, adoption, transient zones)
each take a `Core`; none reaches into another's insides.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from sqlmodel import Session, select

from hvtsm.channels.broker import Broker
from hvtsm.errors import ZoneError
from hvtsm.lifecycle.notices import Note, Notice, Notifier
from hvtsm.lifecycle.zonerun import Registry, ZoneRun
from hvtsm.store import Store
from hvtsm.store.audit import record_event
from hvtsm.store.models import Controller, Zone
from hvtsm.supervise import Supervisor
from hvtsm.timeline import Timeline
from hvtsm.zones.base import Backend, ZoneDriver

log = logging.getLogger(__name__)

#: a phase applied more than this behind schedule is audited as late
LATE_AFTER_MS = 1000.0


class Core:
    def __init__(self, store: Store, controller: Controller, *, notifier: Notifier,
                 supervisor: Supervisor, actor: str) -> None:
        self.store = store
        self.controller = controller
        self.notifier = notifier
        self.supervisor = supervisor
        self.actor = actor
        self.zones = Registry()
        self.drivers: dict[Backend, ZoneDriver] = {}
        self.timeline = Timeline(store.engine, controller.id)
        self.broker: Broker | None = None

    # -- lookups -----------------------------------------------------------------------------

    def driver_for(self, backend: Backend) -> ZoneDriver:
        driver = self.drivers.get(backend)
        if driver is None:
            raise ZoneError(f"this controller has no {backend} driver",
                            hint=f"start it with the {backend} backend available")
        return driver

    def driver_of(self, run: ZoneRun) -> ZoneDriver:
        return self.driver_for(run.require_handle().backend)

    def channels(self) -> Broker:
        assert self.broker is not None, "the broker is made with the manager"
        return self.broker

    # -- writes -------------------------------------------------------------------------------

    def save(self, session: Session, run: ZoneRun, **extra: Any) -> None:
        """The zone's row as the run is now (plus `extra` columns)."""
        row = session.exec(select(Zone).where(Zone.id == run.zone_id)).one()
        row.state = str(run.state)
        row.phase_index = run.phase_index
        if run.handle is not None:
            row.applied = json.dumps(run.handle.applied.to_json())
            row.driver_state = json.dumps(run.handle.state.to_json())
        row.pending = json.dumps({str(k): v for k, v in run.pending.items()})
        row.controller_id = self.controller.id
        for key, value in extra.items():
            setattr(row, key, value)

    def note(self, zone_id: str, kind: str, detail: str, *, ts: float | None = None) -> None:
        """Audit a fact of the zone and announce it (with its start, while it is being
        made)."""
        now = ts or time.time()
        with self.store.session() as session:
            record_event(session, zone_id=zone_id, kind=kind, detail=detail, ts=now)
        run = self.zones.get(zone_id)
        if run is not None:
            with run.notes_lock:
                if not run.announced:
                    run.opening_notes.append((kind, detail))
                    return
        self.notify(Note(zone_id, now, kind, detail))

    def notify(self, notice: Notice) -> None:
        self.notifier.emit(notice)

    def fault(self, zone_id: str | None, what: str, exc: BaseException) -> None:
        """A controller fault: logged, and audited against the zone when there is one."""
        text = f"{what}: {type(exc).__name__}: {exc}"[:1000]
        log.error("controller fault in zone %s: %s", zone_id, text)
        if zone_id is None:
            return
        try:
            self.note(zone_id, "controller-fault", text)
        except Exception:
            log.exception("auditing a controller fault of zone %s failed", zone_id)
