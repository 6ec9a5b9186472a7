"""`hvtsm zones`, `hvtsm audit` and `hvtsm cleanup`."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from sqlmodel import select

from hvtsm.cli.exits import EXIT_INVALID, EXIT_OK
from hvtsm.cli.output import iso, say, table
from hvtsm.cli.run_cmd import add_libvirt_options, libvirt_options
from hvtsm.controllers import dead_controllers, is_alive, release_zone, zone_owner_alive
from hvtsm.errors import HvtsmError, StoreError
from hvtsm.host import probe_host
from hvtsm.pool import cleanup as pool_cleanup
from hvtsm.store import Store
from hvtsm.store.audit import find_zone, list_zones, record_event, record_operator, zone_trail
from hvtsm.store.models import Controller, Zone, ZoneState
from hvtsm.timeline import drop_table
from hvtsm.zones.base import Backend
from hvtsm.zones.factory import drivers_for


def add_parsers(commands: Any) -> None:
    zones = commands.add_parser("zones", help="list zones", description="List zones.")
    zones.add_argument("--all", action="store_true", help="include ended zones")
    zones.add_argument("--json", action="store_true", help="print JSON")
    zones.set_defaults(handler=cmd_zones)

    audit = commands.add_parser("audit", help="print a zone's audit trail",
                                description="Print everything recorded about a zone, oldest "
                                "first: lifecycle, applied phases with lag, anomalies, "
                                "reactions, operator actions.")
    audit.add_argument("zone", metavar="ZONE", help="zone id (or a unique prefix)")
    audit.add_argument("--json", action="store_true", help="print JSON lines")
    audit.set_defaults(handler=cmd_audit)

    cleanup = commands.add_parser(
        "cleanup", help="remove what dead controllers left behind",
        description="Find cgroups, network namespaces and NICs of zones whose controller is "
        "gone, kill their processes and remove them; close their store records.")
    cleanup.add_argument("--dry-run", action="store_true", help="only list what would go")
    cleanup.add_argument("--json", action="store_true", help="print JSON")
    add_libvirt_options(cleanup)
    cleanup.set_defaults(handler=cmd_cleanup)


def cmd_zones(args: argparse.Namespace) -> int:
    store = Store(args.db)
    with store.session() as session:
        zones = list_zones(session, include_ended=args.all)
    if args.json:
        for z in zones:
            print(json.dumps({
                "zone": z.id, "state": z.state, "backend": z.backend, "policy": z.policy_name,
                "phase": z.phase_index, "command": json.loads(z.command),
                "created": iso(z.created_at), "started": iso(z.started_at),
                "ended": iso(z.ended_at), "exit_status": z.exit_status,
                "reason": z.end_reason, "controller": z.controller_id, "kind": z.kind,
                "name": z.name, "parent": z.parent_id}))
        return EXIT_OK
    if not zones:
        say("no zones" + ("" if args.all else " running (--all shows ended ones)"))
        return EXIT_OK
    now = time.time()
    print(table(["ZONE", "STATE", "BACKEND", "POLICY", "PHASE", "AGE", "PARENT", "COMMAND"], [
        [z.id, z.state, z.backend, z.policy_name, z.phase_index,
         _age((z.ended_at or now) - (z.started_at or z.created_at)),
         z.parent_id or "-", " ".join(json.loads(z.command))[:40]] for z in zones]))
    return EXIT_OK


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def cmd_audit(args: argparse.Namespace) -> int:
    store = Store(args.db)
    with store.session() as session:
        zone = find_zone(session, zone_id=args.zone)
        if zone is None:
            raise StoreError(f"no zone {args.zone!r} in {store.safe_url}",
                             hint="`hvtsm zones --all` lists them")
        trail = zone_trail(session, zone_id=zone.id)
        kids = list(session.exec(select(Zone).where(Zone.parent_id == zone.id)
                                 .order_by(Zone.created_at)))
    if args.json:
        for e in trail:
            print(json.dumps({"ts": iso(e.ts), "kind": e.kind, **e.data}))
        return EXIT_OK
    print(f"zone {zone.id}: {zone.state}, backend {zone.backend}, policy {zone.policy_name} "
          f"({zone.policy_source}, sha256 {zone.policy_digest[:12]}), "
          f"command {' '.join(json.loads(zone.command))}")
    if zone.parent_id:
        print(f"{zone.kind} zone {zone.name or ''} of zone {zone.parent_id}")
    if kids:
        print("transient zones: " + ", ".join(f"{k.id} ({k.name}, {k.state})" for k in kids))
    print(table(["TIME", "KIND", "WHAT"], [[iso(e.ts), e.kind, e.summary] for e in trail]))
    return EXIT_OK


def cmd_cleanup(args: argparse.Namespace) -> int:
    store = Store(args.db)
    drivers = drivers_for([Backend.CGROUP, Backend.LIBVIRT], probe_host(),
                          libvirt=libvirt_options(args), optional=True)
    actions: list[dict[str, Any]] = []
    failed = False
    # warm pool guests are no zone's: idle ones of a live pool stay, dead ones go
    running = {d.backend: d for d in drivers}.get(Backend.LIBVIRT)
    keep_guests, retire_guests = pool_cleanup.plan(
        store, running.guest_alive if running is not None else lambda _g: False)  # type: ignore[attr-defined]
    guest_removed: dict[str, list[str]] = {}
    with store.session() as session:
        controllers = {c.id: c for c in session.exec(select(Controller)).all()}
        rows = {z.id: z for z in session.exec(select(Zone)).all()}

        def owned_by_live_controller(zone_id: str) -> bool:
            if zone_owner_alive(zone_id):
                return True  # possibly a controller working with another store
            zone = rows.get(zone_id)
            if zone is None or not ZoneState(zone.state).live:
                return False
            owner = controllers.get(zone.controller_id or "")
            return owner is not None and is_alive(owner)

        for driver in drivers:
            for zone_id in sorted(driver.leftovers()):
                if owned_by_live_controller(zone_id) or zone_id in keep_guests:
                    continue
                entry: dict[str, Any] = {"zone": zone_id,
                                         "known": zone_id in rows or zone_id in retire_guests,
                                         "backend": str(driver.backend)}
                if not args.dry_run:
                    try:
                        entry["removed"] = driver.remove(zone_id)
                        guest_removed[zone_id] = entry["removed"]
                        release_zone(zone_id)
                    except HvtsmError as exc:
                        entry["error"] = str(exc)
                        failed = True
                actions.append(entry)
        for zone in rows.values():
            if ZoneState(zone.state).live and not owned_by_live_controller(zone.id):
                if not any(a["zone"] == zone.id for a in actions):
                    actions.append({"zone": zone.id, "known": True, "removed": []})
                if not args.dry_run:
                    zone.state = ZoneState.CLEANED
                    zone.ended_at = time.time()
                    zone.end_reason = "controller gone; removed by cleanup"
                    record_event(session, zone_id=zone.id, kind="cleaned",
                                 detail="controller gone; removed by `hvtsm cleanup`")
        dead = dead_controllers(session)
        if not args.dry_run:
            for controller in dead:
                session.delete(controller)
            if actions:
                record_operator(session, actor="cleanup", action="cleanup",
                                args={"zones": [a["zone"] for a in actions]},
                                reason="orphans of dead controllers")
    if not args.dry_run:
        pool_cleanup.apply(store, retire_guests, guest_removed)
    for guest_id, reason in retire_guests.items():
        if not any(a["zone"] == guest_id for a in actions):
            actions.append({"zone": guest_id, "known": True, "removed": [],
                            "pool": reason})
    if not args.dry_run:
        # after the session's commit: SQLite would refuse DDL beside its open write
        for controller in dead:
            drop_table(store.engine, controller.jobs_table)
    verb = "would remove" if args.dry_run else "removed"
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "zones": actions,
                          "dead_controllers": [c.id for c in dead]}))
    elif not actions:
        print("nothing to clean up")
    else:
        for a in actions:
            what = ", ".join(a.get("removed", [])) or "store record only"
            status = f"error: {a['error']}" if "error" in a else f"{verb} {what}"
            print(f"{a['zone']}{'' if a['known'] else ' (not in this store)'}: {status}")
    return EXIT_INVALID if failed else EXIT_OK
