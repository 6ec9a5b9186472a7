"""The live view of `hvtsm run`, `resume` and `pipeline`: the lifecycle's typed notices as
lines on stderr, or as JSON lines on stdout (`--json`). A zone's own end line is printed by
the command once the workload's output is drained (`print_end`); a transient zone's end is
printed as it comes."""

from __future__ import annotations

from hvtsm.cli.output import clock, emit_json, say
from hvtsm.lifecycle.notices import (
    Adopted,
    AnomalySeen,
    ChannelNotice,
    Ended,
    Note,
    Notice,
    PhaseApplied,
    ReactionTaken,
    Started,
)
from hvtsm.lifecycle.zonerun import ZoneRun
from hvtsm.store.audit import evidence_text
from hvtsm.units import format_duration_ms


class LivePrinter:
    def __init__(self, *, json_mode: bool) -> None:
        self.json_mode = json_mode
        self.started: dict[str, float] = {}

    def __call__(self, notice: Notice) -> None:
        if isinstance(notice, Ended) and notice.parent is None:
            return  # printed by the command once the output is drained
        if isinstance(notice, Started | Adopted):
            self.started[notice.zone_id] = notice.ts
        if self.json_mode:
            fields = notice.to_json()
            event, ts = fields.pop("event"), fields.pop("ts")
            emit_json(event, ts, **fields)
            return
        say(self.line(notice))

    def line(self, notice: Notice) -> str:
        start = self.started.get(notice.zone_id)
        prefix = f"hvtsm {clock(notice.ts)} {notice.zone_id}" if start is None else (
            f"hvtsm {clock(notice.ts)} +{notice.ts - start:.3f}s {notice.zone_id}")
        if isinstance(notice, Started):
            return "\n".join([_started(notice), *(f"{prefix} {kind}: {detail}"
                                                  for kind, detail in notice.notes)])
        if isinstance(notice, PhaseApplied):
            changes = ", ".join(f"{k} {v}" for k, v in notice.changes.items()) or "no change"
            late = "  LATE" if notice.late else ""
            already = f"  (already in force: {', '.join(notice.already)})" \
                if notice.already else ""
            by = "  by the zone's agent" if notice.by == "agent" else ""
            return (f"{prefix} phase {notice.phase} (at {format_duration_ms(notice.at_ms)}): "
                    f"{changes}  [lag {notice.lag_ms:.1f} ms]{late}{already}{by}")
        if isinstance(notice, Note):
            return f"{prefix} {notice.note}: {notice.detail}"
        if isinstance(notice, Adopted):
            return (f"hvtsm: adopted zone {notice.zone_id} ({len(notice.pending)} "
                    "transition(s) pending)")
        if isinstance(notice, AnomalySeen):
            said = evidence_text(dict(notice.evidence))
            return (f"{prefix} ANOMALY {notice.category}: {notice.detail}"
                    + (f" [{said}]" if said else ""))
        if isinstance(notice, ReactionTaken):
            effect = f" ({notice.effect})" if notice.effect else ""
            return f"{prefix} REACTION {notice.action}{effect}: {notice.reason}"
        if isinstance(notice, ChannelNotice):
            return (f"{prefix} channel {notice.sender} -> {notice.receiver}: {notice.size} B "
                    f"{notice.verdict}" + (f" ({notice.reason})" if notice.reason else ""))
        if isinstance(notice, Ended):
            return (f"hvtsm {clock(notice.ts)} zone {notice.zone_id} ({notice.name}, "
                    f"transient zone of {notice.parent}) {notice.state}: {notice.reason}")
        return f"{prefix} {notice.kind} {notice.fields()}"


def _started(notice: Started) -> str:
    life = "no lifespan limit" if notice.lifespan_ms is None else (
        f"lifespan {format_duration_ms(notice.lifespan_ms)}")
    if notice.parent is not None:  # a transient zone split off a running one
        placed = notice.placed_ms or 0.0
        return (f"hvtsm {clock(notice.ts)} zone {notice.zone_id} ({notice.name}) split from "
                f"{notice.parent} on {notice.split_on}: policy {notice.policy} ({life}), "
                f"pid {notice.pid}, placed in {placed:.1f} ms")
    extra = "".join(f", {k} {v}" for k, v in (("accel", notice.accel),
                                               ("boot_ms", notice.boot_ms)) if v is not None)
    return (f"hvtsm {clock(notice.ts)} zone {notice.zone_id} started: backend "
            f"{notice.backend}{extra}, policy {notice.policy} ({life}), pid {notice.pid}")


def print_end(run: ZoneRun, ts: float, *, json_mode: bool) -> None:
    """A zone's end line: who ended it, the status, hostile or not."""
    outcome = run.outcome
    if json_mode:
        emit_json("exit", ts, zone=run.zone_id, status=run.exit_status, state=str(run.state),
                  reason=run.end_reason,
                  ended_by=str(outcome.cause) if outcome is not None else None,
                  hostile=outcome.hostile if outcome is not None else None,
                  anomalies=outcome.anomalies if outcome is not None else run.anomalies)
        return
    text = outcome.describe() if outcome is not None else f"{run.end_reason}"
    say(f"hvtsm {clock(ts)} zone {run.zone_id} {run.state}: {text}")
