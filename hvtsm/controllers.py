"""Controller registration and liveness: who owns which zones, and is that process alive."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
from pathlib import Path

from sqlmodel import Session, select

from hvtsm.store.models import Controller, Zone, ZoneState
from hvtsm.timeline import jobs_table_name

log = logging.getLogger(__name__)


def process_start_time(pid: int, *, proc_root: str = "/proc") -> int | None:
    """Start time in clock ticks since boot (field 22 of /proc/<pid>/stat), None if gone."""
    try:
        with open(f"{proc_root}/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def register_controller(session: Session) -> Controller:
    cid = "c" + secrets.token_hex(4)
    pid = os.getpid()
    row = Controller(id=cid, host=socket.gethostname(), pid=pid,
                     pid_start=process_start_time(pid) or 0, started_at=time.time(),
                     jobs_table=jobs_table_name(cid))
    session.add(row)
    return row


def is_alive(controller: Controller) -> bool:
    """True when the controller's process still runs. Controllers of other hosts count as
    alive: only they can tell."""
    if controller.host != socket.gethostname():
        return True
    return process_start_time(controller.pid) == controller.pid_start


def dead_controllers(session: Session) -> list[Controller]:
    return [c for c in session.exec(select(Controller)).all() if not is_alive(c)]


def orphaned_zones(session: Session) -> list[Zone]:
    """Live zones of this host whose controller is gone (or was never recorded)."""
    controllers = {c.id: c for c in session.exec(select(Controller)).all()}
    out: list[Zone] = []
    for zone in session.exec(select(Zone)).all():
        if not ZoneState(zone.state).live:
            continue
        owner = controllers.get(zone.controller_id or "")
        if owner is None or not is_alive(owner):
            out.append(zone)
    return out


#: host-wide marks of which controller process drives which zone; they let `hvtsm cleanup`
#: with one store tell a live zone of a controller using another store from an orphan
RUN_DIR = Path(os.environ.get("HVTSM_RUN_DIR", "/run/hvtsm"))


def _owner_file(zone_id: str, root: Path | None) -> Path:
    return (root or RUN_DIR / "owners") / zone_id


def claim_zone(zone_id: str, *, root: Path | None = None) -> None:
    """Mark this process as the zone's controller (atomically replacing an older mark)."""
    path = _owner_file(zone_id, root)
    pid = os.getpid()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{zone_id}.{pid}")
        tmp.write_text(f"{pid} {process_start_time(pid) or 0}\n")
        tmp.replace(path)
    except OSError as exc:
        log.warning("cannot mark zone %s as ours in %s: %s", zone_id, path.parent, exc)


def release_zone(zone_id: str, *, root: Path | None = None) -> None:
    with contextlib.suppress(OSError):
        _owner_file(zone_id, root).unlink()


def zone_owner_alive(zone_id: str, *, root: Path | None = None) -> bool:
    """True when the process that claimed the zone still runs."""
    try:
        pid_s, start_s = _owner_file(zone_id, root).read_text().split()
        return process_start_time(int(pid_s)) == int(start_s)
    except (OSError, ValueError):
        return False
