"""The warm pool's rows in the store: several processes (`hvtsm pool fill`, `hvtsm invoke`,
a daemon) share one pool through them. Every change of a guest's state is also a
`guest_event` row, written in the same transaction.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from hvtsm.controllers import process_start_time
from hvtsm.pool.rules import PoolKey
from hvtsm.restrictions import Restrictions
from hvtsm.store import Store
from hvtsm.store.invoke_models import GuestEvent, GuestState, WarmGuest
from hvtsm.store.models import Anomaly


def me() -> str:
    """This process as a holder: pid and start time (a reused pid is someone else)."""
    pid = os.getpid()
    return f"{pid}:{process_start_time(pid) or 0}"


def holder_alive(holder: str | None) -> bool:
    if not holder:
        return False
    try:
        pid_s, start_s = holder.split(":")
        return process_start_time(int(pid_s)) == int(start_s)
    except ValueError:
        return False


def record(session: Session, guest_id: str, kind: str, detail: str = "", *,
           zone_id: str | None = None, ts: float | None = None) -> None:
    session.add(GuestEvent(guest_id=guest_id, ts=ts or time.time(), kind=kind,
                           zone_id=zone_id, detail=detail))


def add_booting(store: Store, guest_id: str, key: PoolKey, memory: int) -> None:
    with store.session() as session:
        session.add(WarmGuest(id=guest_id, runtime=key.runtime, trust=key.trust,
                              state=GuestState.BOOTING, booted_at=time.time(),
                              memory=memory, holder=me()))
        record(session, guest_id, "booting", f"for {key}, memory {memory}")


def mark_idle(store: Store, guest_id: str, state: Mapping[str, Any], base: Restrictions, *,
              hold: bool, detail: str) -> None:
    """The guest is ready for a request. `hold`: this process keeps its agent link."""
    with store.session() as session:
        row = session.get(WarmGuest, guest_id)
        if row is None:
            raise KeyError(guest_id)
        row.state = GuestState.IDLE
        row.domain = str(state.get("domain", ""))
        row.channel = str(state.get("channel_path", ""))
        row.driver_state = json.dumps(state)
        row.baseline = json.dumps(base.to_json())
        row.holder = me() if hold else None
        record(session, guest_id, "idle", detail)


def claim(store: Store, key: PoolKey, *, zone_hint: str | None = None) -> WarmGuest | None:
    """Take one idle guest of `key` for this process, or None. Atomic across processes
    (UPDATE ... WHERE state = 'idle'): the loser of a race tries the next guest. Guests
    whose link another live process holds are skipped (the channel has one client)."""
    mine = me()
    with store.session() as session:
        rows = session.exec(select(WarmGuest).where(
            WarmGuest.runtime == key.runtime, WarmGuest.trust == key.trust,
            WarmGuest.state == GuestState.IDLE).order_by(col(WarmGuest.booted_at))).all()
        candidates = [r.id for r in rows if r.holder == mine] + [
            r.id for r in rows if r.holder != mine and not holder_alive(r.holder)]
    for guest_id in candidates:
        with store.session() as session:
            result = session.exec(
                update(WarmGuest)
                .where(col(WarmGuest.id) == guest_id, col(WarmGuest.state) == GuestState.IDLE)
                .values(state=GuestState.BUSY, holder=mine, claimed_at=time.time(),
                        zone_id=zone_hint))
            if result.rowcount != 1:
                continue  # another process claimed it first
            record(session, guest_id, "claimed", f"for a {key} request", zone_id=zone_hint)
        with store.session() as session:
            return session.get(WarmGuest, guest_id)
    return None


def claim_one(store: Store, guest_id: str) -> bool:
    """Take this idle guest (to drain or retire it); False if it is not idle any more."""
    with store.session() as session:
        result = session.exec(
            update(WarmGuest)
            .where(col(WarmGuest.id) == guest_id, col(WarmGuest.state) == GuestState.IDLE)
            .values(state=GuestState.BUSY, holder=me(), claimed_at=time.time()))
        return bool(result.rowcount == 1)


def bound_to(store: Store, guest_id: str, zone_id: str) -> None:
    with store.session() as session:
        row = session.get(WarmGuest, guest_id)
        if row is not None:
            row.zone_id = zone_id
        record(session, guest_id, "bound", f"serves zone {zone_id}", zone_id=zone_id)


def release(store: Store, guest_id: str, *, uses: int, hold: bool, detail: str) -> None:
    with store.session() as session:
        row = session.get(WarmGuest, guest_id)
        if row is None or row.state == GuestState.RETIRED:
            return
        row.state = GuestState.IDLE
        row.uses = uses
        row.holder = me() if hold else None
        record(session, guest_id, "released", detail, zone_id=row.zone_id)


def retire(store: Store, guest_id: str, reason: str, *, removed: list[str] | None = None,
           uses: int | None = None) -> bool:
    """Mark the guest retired (it never serves again); False if it already was."""
    with store.session() as session:
        row = session.get(WarmGuest, guest_id)
        if row is None or row.state == GuestState.RETIRED:
            return False
        row.state = GuestState.RETIRED
        row.tainted = reason
        row.retired_at = time.time()
        row.holder = None
        if uses is not None:
            row.uses = uses
        record(session, guest_id, "retired", reason, zone_id=row.zone_id)
        if removed:
            record(session, guest_id, "destroyed", ", ".join(removed), zone_id=row.zone_id)
    return True


def let_go(store: Store, guest_ids: list[str]) -> None:
    """This process closes its links to these idle guests: others may claim them now."""
    mine = me()
    with store.session() as session:
        for row in session.exec(select(WarmGuest).where(col(WarmGuest.id).in_(guest_ids))):
            if row.holder == mine and row.state == GuestState.IDLE:
                row.holder = None


def guests(store: Store, *, include_retired: bool = False,
           key: PoolKey | None = None) -> list[WarmGuest]:
    with store.session() as session:
        query = select(WarmGuest).order_by(col(WarmGuest.booted_at))
        if not include_retired:
            query = query.where(WarmGuest.state != GuestState.RETIRED)
        if key is not None:
            query = query.where(WarmGuest.runtime == key.runtime,
                                WarmGuest.trust == key.trust)
        return list(session.exec(query).all())


def served_anomalies(store: Store, guest_id: str) -> int:
    """Anomalies recorded for any zone the guest has served."""
    with store.session() as session:
        zones = select(GuestEvent.zone_id).where(GuestEvent.guest_id == guest_id,
                                                 col(GuestEvent.zone_id).is_not(None))
        return len(session.exec(select(Anomaly.id).where(
            col(Anomaly.zone_id).in_(zones))).all())


def trail(store: Store, guest_id: str) -> list[GuestEvent]:
    with store.session() as session:
        return list(session.exec(select(GuestEvent).where(GuestEvent.guest_id == guest_id)
                                 .order_by(col(GuestEvent.id))).all())
