"""Data functions over the store: keyword-only, each receiving a session."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from hvtsm.channels import audit as channel_audit
from hvtsm.store.models import (
    Anomaly,
    OperatorAction,
    PhaseApplied,
    Reaction,
    UnattendedSpan,
    Zone,
    ZoneEvent,
)


def record_event(session: Session, *, zone_id: str, kind: str, detail: str = "",
                 ts: float | None = None) -> None:
    session.add(ZoneEvent(zone_id=zone_id, ts=ts or time.time(), kind=kind, detail=detail))


def record_phase(session: Session, *, zone_id: str, phase_index: int, scheduled_at: float,
                 applied_at: float, late: bool, changes: dict[str, str], note: str = "") -> None:
    session.add(PhaseApplied(
        zone_id=zone_id, phase_index=phase_index, scheduled_at=scheduled_at,
        applied_at=applied_at, lag_ms=(applied_at - scheduled_at) * 1000, late=late,
        changes=json.dumps(changes), note=note,
    ))


def record_anomaly(session: Session, *, zone_id: str, kind: str, detail: str,
                   source: str, evidence: str = "{}", ts: float | None = None) -> int:
    row = Anomaly(zone_id=zone_id, ts=ts or time.time(), kind=kind, detail=detail,
                  source=source, evidence=evidence)
    session.add(row)
    session.flush()
    assert row.id is not None
    return row.id


def record_reaction(session: Session, *, zone_id: str, action: str, reason: str,
                    anomaly_id: int | None = None) -> None:
    session.add(Reaction(zone_id=zone_id, ts=time.time(), action=action, reason=reason,
                         anomaly_id=anomaly_id))


def record_operator(session: Session, *, actor: str, action: str, zone_id: str | None = None,
                    args: dict[str, Any] | None = None, reason: str = "") -> None:
    session.add(OperatorAction(zone_id=zone_id, ts=time.time(), actor=actor, action=action,
                               args=json.dumps(args or {}), reason=reason))


def record_unattended(session: Session, *, zone_id: str, since: float | None, until: float,
                      controller_id: str | None, phases: list[dict[str, Any]],
                      note: str = "") -> None:
    session.add(UnattendedSpan(zone_id=zone_id, since=since, until=until,
                               controller_id=controller_id, phases=json.dumps(phases),
                               note=note))


def unattended_spans(session: Session, *, zone_ids: list[str]) -> dict[str, list[UnattendedSpan]]:
    """Each zone's stretches without a controller, oldest first."""
    out: dict[str, list[UnattendedSpan]] = {z: [] for z in zone_ids}
    if not zone_ids:
        return out
    query = select(UnattendedSpan).where(col(UnattendedSpan.zone_id).in_(zone_ids)) \
        .order_by(col(UnattendedSpan.until))
    for span in session.exec(query):
        out.setdefault(span.zone_id, []).append(span)
    return out


def span_phases(span: UnattendedSpan) -> list[dict[str, Any]]:
    value = json.loads(span.phases or "[]")
    return [p for p in value if isinstance(p, dict)] if isinstance(value, list) else []


def find_zone(session: Session, *, zone_id: str) -> Zone | None:
    """Exact id, or a unique prefix of one (as operators type them)."""
    zone = session.exec(select(Zone).where(Zone.id == zone_id)).first()
    if zone is not None:
        return zone
    matches = session.exec(select(Zone).where(col(Zone.id).startswith(zone_id))).all()
    return matches[0] if len(matches) == 1 else None


def list_zones(session: Session, *, include_ended: bool) -> list[Zone]:
    query = select(Zone).order_by(col(Zone.seq).desc())
    if not include_ended:
        query = query.where(col(Zone.state).in_(["creating", "running", "frozen"]))
    return list(session.exec(query).all())


@dataclass(frozen=True)
class TrailEntry:
    ts: float
    kind: str
    summary: str
    data: dict[str, Any]


def zone_trail(session: Session, *, zone_id: str) -> list[TrailEntry]:
    """Everything recorded about a zone, oldest first."""
    entries: list[TrailEntry] = []
    for ev in session.exec(select(ZoneEvent).where(ZoneEvent.zone_id == zone_id)):
        entries.append(TrailEntry(ev.ts, ev.kind, ev.detail, {"detail": ev.detail}))
    for ph in session.exec(select(PhaseApplied).where(PhaseApplied.zone_id == zone_id)):
        changes = json.loads(ph.changes)
        what = ", ".join(f"{k} {v}" for k, v in changes.items()) or "nothing new"
        late = " LATE" if ph.late else ""
        note = f" ({ph.note})" if ph.note else ""
        entries.append(TrailEntry(ph.applied_at, "phase", f"phase {ph.phase_index}: {what}; "
                                  f"lag {ph.lag_ms:.1f} ms{late}{note}", {
                                      "phase": ph.phase_index, "scheduled_at": ph.scheduled_at,
                                      "applied_at": ph.applied_at, "lag_ms": ph.lag_ms,
                                      "late": ph.late, "changes": changes, "note": ph.note}))
    for an in session.exec(select(Anomaly).where(Anomaly.zone_id == zone_id)):
        evidence = _json_object(an.evidence)
        summary = f"{an.kind}: {an.detail}"
        if said := evidence_text(evidence):
            summary += f" [{said}]"
        entries.append(TrailEntry(an.ts, "anomaly", summary, {
            "id": an.id, "category": an.kind, "detail": an.detail, "source": an.source,
            "evidence": evidence}))
    for re_ in session.exec(select(Reaction).where(Reaction.zone_id == zone_id)):
        entries.append(TrailEntry(re_.ts, "reaction", f"{re_.action}: {re_.reason}", {
            "action": re_.action, "reason": re_.reason, "anomaly_id": re_.anomaly_id}))
    for op in session.exec(select(OperatorAction).where(OperatorAction.zone_id == zone_id)):
        entries.append(TrailEntry(op.ts, "operator", f"{op.actor}: {op.action} {op.reason}"
                                  .strip(), {"actor": op.actor, "action": op.action,
                                             "args": json.loads(op.args), "reason": op.reason}))
    for span in session.exec(select(UnattendedSpan).where(UnattendedSpan.zone_id == zone_id)):
        phases = span_phases(span)
        since = "an unknown time" if span.since is None else f"{span.until - span.since:.1f} s"
        applied = ", ".join(str(p.get("phase")) for p in phases) or "none"
        entries.append(TrailEntry(span.until, "unattended",
                                  f"ran {since} without a controller; phases applied by its "
                                  f"agent meanwhile: {applied}", {
                                      "since": span.since, "until": span.until,
                                      "controller": span.controller_id, "phases": phases,
                                      "note": span.note}))
    for ch in channel_audit.channel_rows(session, zone_id=zone_id):
        entries.append(TrailEntry(ch.ts, "channel", channel_audit.summary(ch),
                                  channel_audit.data(ch)))
    entries.sort(key=lambda e: e.ts)
    return entries


def _json_object(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {"unreadable": text}
    return value if isinstance(value, dict) else {"value": value}


def evidence_text(evidence: dict[str, Any]) -> str:
    """The evidence of an anomaly in one line: who, which call, with what, what was done."""
    parts = []
    if evidence.get("pid") is not None:
        parts.append(f"pid {evidence['pid']}")
    if evidence.get("program"):
        parts.append(str(evidence["program"]))
    if evidence.get("syscall"):
        parts.append(f"{evidence['syscall']}()")
    args = evidence.get("args")
    if isinstance(args, dict) and args:
        parts.append(", ".join(f"{k}={json.dumps(v)}" for k, v in args.items()))
    if evidence.get("contained") not in (None, "none"):
        parts.append(str(evidence["contained"]))
    if evidence.get("problem"):
        parts.append(f"link problem {evidence['problem']}")
    return "; ".join(parts)
