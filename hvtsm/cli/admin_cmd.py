"""`hvtsm zones`, `hvtsm audit` and `hvtsm cleanup`."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from sqlmodel import col, select

from hvtsm import cleanup
from hvtsm.cli.exits import EXIT_INVALID, EXIT_OK
from hvtsm.cli.output import iso, say, table
from hvtsm.cli.run_cmd import add_libvirt_options, libvirt_options
from hvtsm.errors import StoreError
from hvtsm.host import probe_host
from hvtsm.store import Store
from hvtsm.store.audit import find_zone, list_zones, span_phases, unattended_spans, zone_trail
from hvtsm.store.models import UnattendedSpan, Zone
from hvtsm.zones.base import Backend
from hvtsm.zones.factory import drivers_for
from hvtsm.zones.logged import LoggedEvents


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

    clean = commands.add_parser(
        "cleanup", help="remove what dead controllers left behind",
        description="Find cgroups, network namespaces, NICs, agents and domains of zones "
        "whose controller is gone, kill their processes and remove them; close their store "
        "records. A zone this store has no record of may be another store's (its `hvtsm "
        "resume` adopts it): it is listed and left alone unless named or --unrecorded is "
        "given. --dry-run prints exactly what the run would do.")
    clean.add_argument("zones", nargs="*", metavar="ZONE",
                       help="only these zones (removed even when this store has no record "
                       "of them)")
    clean.add_argument("--unrecorded", action="store_true",
                       help="also remove zones this store has no record of")
    clean.add_argument("--dry-run", action="store_true", help="only list what would go")
    clean.add_argument("--json", action="store_true", help="print JSON")
    add_libvirt_options(clean)
    clean.set_defaults(handler=cmd_cleanup)


def cmd_zones(args: argparse.Namespace) -> int:
    store = Store(args.db)
    with store.session() as session:
        zones = list_zones(session, include_ended=args.all)
        spans = unattended_spans(session, zone_ids=[z.id for z in zones])
    if args.json:
        for z in zones:
            print(json.dumps({
                "zone": z.id, "state": z.state, "backend": z.backend, "policy": z.policy_name,
                "phase": z.phase_index, "command": json.loads(z.command),
                "created": iso(z.created_at), "started": iso(z.started_at),
                "ended": iso(z.ended_at), "exit_status": z.exit_status,
                "reason": z.end_reason, "controller": z.controller_id, "kind": z.kind,
                "name": z.name, "parent": z.parent_id,
                "unattended": [_span_json(s) for s in spans.get(z.id, [])]}))
        return EXIT_OK
    if not zones:
        say("no zones" + ("" if args.all else " running (--all shows ended ones)"))
        return EXIT_OK
    now = time.time()
    print(table(["ZONE", "STATE", "BACKEND", "POLICY", "PHASE", "AGE", "UNATTENDED", "PARENT",
                 "COMMAND"], [
        [z.id, z.state, z.backend, z.policy_name, z.phase_index,
         _age((z.ended_at or now) - (z.started_at or z.created_at)),
         _unattended(spans.get(z.id, [])), z.parent_id or "-",
         " ".join(json.loads(z.command))[:40]] for z in zones]))
    return EXIT_OK


def _span_json(span: UnattendedSpan) -> dict[str, Any]:
    """One stretch without a controller, for `zones --json`."""
    return {"since": iso(span.since), "until": iso(span.until),
            "seconds": None if span.since is None else round(span.until - span.since, 3),
            "controller": span.controller_id,
            "phases": [{"phase": p.get("phase"), "due": _iso(p.get("due")),
                        "applied": _iso(p.get("applied")), "lag_ms": p.get("lag_ms"),
                        "ok": p.get("ok"), "terminate": p.get("terminate"),
                        "froze": p.get("froze")} for p in span_phases(span)]}


def _iso(value: Any) -> str | None:
    return iso(float(value)) if isinstance(value, int | float) else None


def _unattended(spans: list[UnattendedSpan]) -> str:
    """`12s: 1,2 by agent` per stretch (the seconds without a controller, the phases its
    agent applied meanwhile); "-" when a controller always ran."""
    if not spans:
        return "-"
    parts = []
    for span in spans:
        took = "?" if span.since is None else _age(span.until - span.since)
        phases = ",".join(str(p.get("phase")) for p in span_phases(span))
        parts.append(f"{took}: {phases} by agent" if phases else f"{took}: none applied")
    return "; ".join(parts)


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
                                 .order_by(col(Zone.created_at))))
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
                          events=LoggedEvents(), libvirt=libvirt_options(args), optional=True)
    planned = cleanup.plan(store, drivers, names=args.zones, unrecorded=args.unrecorded)
    if not args.dry_run:
        cleanup.carry_out(store, drivers, planned)
    if args.json:
        print(json.dumps({"dry_run": args.dry_run,
                          "zones": [i.to_json() for i in planned.items],
                          "dead_controllers": [c.id for c in planned.dead]}))
    else:
        if not any(i.action == "remove" for i in planned.items):
            print("nothing to clean up")
        for item in planned.items:
            print(_cleanup_line(item, dry_run=args.dry_run))
    return EXIT_INVALID if planned.failed else EXIT_OK


def _cleanup_line(item: cleanup.Item, *, dry_run: bool) -> str:
    where = "" if item.recorded else " (not in this store)"
    if item.error is not None:
        return f"{item.zone}{where}: error: {item.error}"
    if item.action == "leave":
        return f"{item.zone}{where}: {'would leave' if dry_run else 'left'} it: {item.why}"
    what = ", ".join(item.resources) or "store record only"
    if item.pool:
        what += f"; pool guest retired: {item.pool}"
    return f"{item.zone}{where}: {'would remove' if dry_run else 'removed'} {what}"
