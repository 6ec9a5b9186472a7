"""What `hvtsm cleanup` does, planned before anything is done: the dry run prints the very
plan the real run then carries out.

Resources on this host (cgroups, namespaces, NICs, agents, domains) of a zone whose
controller is gone are removed when the zone is recorded in this store. A zone this store
has no record of may be another store's, whose `hvtsm resume` would adopt it: it is left
alone, and listed as such, unless the operator names it or asks for unrecorded zones too.
Zones of a live controller (of any store: the host-wide owner marks tell) are never
touched, and neither are the idle guests of a live warm pool.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import select

from hvtsm.controllers import (
    dead_controllers,
    is_alive,
    release_zone,
    zone_owner_alive,
)
from hvtsm.errors import HvtsmError
from hvtsm.pool import cleanup as pool_cleanup
from hvtsm.store import Store
from hvtsm.store.audit import record_event, record_operator
from hvtsm.store.models import Controller, Zone, ZoneState
from hvtsm.timeline import drop_table
from hvtsm.zones.base import ZoneDriver


@dataclass
class Item:
    zone: str
    #: the store has a record of it
    recorded: bool
    #: "remove" or "leave"
    action: str
    backend: str | None = None
    #: what would go (planned) / what went (done), in the drivers' words
    resources: list[str] = field(default_factory=list)
    #: why it is left alone
    why: str = ""
    #: the warm pool retires the guest's row, and why
    pool: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"zone": self.zone, "known": self.recorded,
                               "action": self.action, "backend": self.backend,
                               "removed": self.resources}
        if self.why:
            out["why"] = self.why
        if self.pool is not None:
            out["pool"] = self.pool
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass
class Plan:
    items: list[Item]
    dead: list[Controller]
    #: live zone rows of dead controllers: their records are closed
    records: list[str]
    retire_guests: dict[str, str]

    @property
    def failed(self) -> bool:
        return any(i.error is not None for i in self.items)


def plan(store: Store, drivers: Sequence[ZoneDriver], *, names: Sequence[str] = (),
         unrecorded: bool = False) -> Plan:
    """What a cleanup would do now. `names`: only these zones (each removed even when this
    store has no record of it); `unrecorded`: remove zones of no record too."""
    wanted = set(names)
    guest_driver = next((d for d in drivers if hasattr(d, "guest_alive")), None)
    keep_guests, retire_guests = pool_cleanup.plan(
        store, getattr(guest_driver, "guest_alive", lambda _g: False))
    with store.session() as session:
        controllers = {c.id: c for c in session.exec(select(Controller)).all()}
        rows = {z.id: z for z in session.exec(select(Zone)).all()}
        dead = dead_controllers(session)

    def live_owner(zone_id: str) -> bool:
        if zone_owner_alive(zone_id):
            return True  # possibly a controller working with another store
        zone = rows.get(zone_id)
        if zone is None or not ZoneState(zone.state).live:
            return False
        owner = controllers.get(zone.controller_id or "")
        return owner is not None and is_alive(owner)

    items: list[Item] = []
    for driver in drivers:
        for zone_id in sorted(driver.leftovers()):
            if wanted and zone_id not in wanted:
                continue
            if live_owner(zone_id) or zone_id in keep_guests:
                continue
            recorded = zone_id in rows or zone_id in retire_guests
            item = Item(zone_id, recorded, "remove", str(driver.backend),
                        pool=retire_guests.get(zone_id))
            if not recorded and not unrecorded and zone_id not in wanted:
                item.action = "leave"
                item.why = ("not in this store: another store's `hvtsm resume` may adopt "
                            "it; name it, or pass --unrecorded, to remove it")
            try:
                item.resources = driver.resources(zone_id)
            except HvtsmError as exc:
                item.error = str(exc)
            items.append(item)
    listed = {i.zone for i in items}
    records = [z.id for z in rows.values()
               if ZoneState(z.state).live and not live_owner(z.id)
               and (not wanted or z.id in wanted)]
    for zone_id in records:
        if zone_id not in listed:
            items.append(Item(zone_id, True, "remove", rows[zone_id].backend))
            listed.add(zone_id)
    for guest_id, reason in retire_guests.items():
        if guest_id not in listed and (not wanted or guest_id in wanted):
            items.append(Item(guest_id, True, "remove", pool=reason))
    return Plan(items, dead if not wanted else [], records, retire_guests)


def carry_out(store: Store, drivers: Sequence[ZoneDriver], planned: Plan) -> Plan:
    """Do what `planned` says, and nothing else; each item then says what went."""
    by_backend = {str(d.backend): d for d in drivers}
    removed: dict[str, list[str]] = {}
    for item in planned.items:
        if item.action != "remove" or item.backend is None or item.error is not None:
            continue
        driver = by_backend.get(item.backend)
        if driver is None or item.zone not in driver.leftovers():
            item.resources = []
            continue
        try:
            item.resources = driver.remove(item.zone)
            removed[item.zone] = item.resources
            release_zone(item.zone)
        except HvtsmError as exc:
            item.error = str(exc)
    with store.session() as session:
        for zone_id in planned.records:
            zone = session.exec(select(Zone).where(Zone.id == zone_id)).one()
            zone.state = ZoneState.CLEANED
            zone.ended_at = time.time()
            zone.end_reason = "controller gone; removed by cleanup"
            record_event(session, zone_id=zone_id, kind="cleaned",
                         detail="controller gone; removed by `hvtsm cleanup`")
        for controller in planned.dead:
            row = session.get(Controller, controller.id)
            if row is not None:
                session.delete(row)
        done = [i.zone for i in planned.items if i.action == "remove"]
        if done:
            record_operator(session, actor="cleanup", action="cleanup",
                            args={"zones": done}, reason="orphans of dead controllers")
    retire = {g: r for g, r in planned.retire_guests.items()
              if any(i.zone == g and i.action == "remove" for i in planned.items)}
    pool_cleanup.apply(store, retire, removed)
    # after the session's commit: SQLite would refuse DDL beside its open write
    for controller in planned.dead:
        drop_table(store.engine, controller.jobs_table)
    return planned
