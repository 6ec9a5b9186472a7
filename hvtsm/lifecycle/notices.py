"""The notices a zone emits, as typed values: whoever watches (the live printer, `--json`
output, later the daemon's event stream) consumes these same types.

Every notice is announced after what it tells was written to the store. `to_json` gives the
documented JSON line (`{"event": KIND, "ts": ..., "zone": ..., ...fields}`); the field names
are part of the CLI's interface (README, "Running things").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Notice:
    """Base of all notices: which zone, when (epoch seconds)."""

    kind: ClassVar[str] = "notice"
    zone_id: str
    ts: float

    def fields(self) -> dict[str, Any]:
        """The notice's own fields, as its JSON line carries them."""
        return {}

    def to_json(self) -> dict[str, Any]:
        return {"event": self.kind, "ts": self.ts, "zone": self.zone_id, **self.fields()}


@dataclass(frozen=True)
class Started(Notice):
    """The workload's first instruction ran (the zone's clock starts), or a transient zone
    was split off a running one (`parent` set)."""

    kind: ClassVar[str] = "start"
    pid: int
    policy: str
    backend: str
    scale: float
    lifespan_ms: float | None
    accel: str | None = None
    boot_ms: float | None = None
    #: a transient zone: where it came from and how long placing it took
    parent: str | None = None
    name: str | None = None
    split_on: str | None = None
    placed_ms: float | None = None
    #: (kind, detail) of the notes audited while the zone was made (the agent watching)
    notes: tuple[tuple[str, str], ...] = ()

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": self.pid, "policy": self.policy,
                               "backend": self.backend, "scale": self.scale,
                               "lifespan_ms": self.lifespan_ms}
        if self.notes:
            out["notes"] = [{"kind": k, "detail": d} for k, d in self.notes]
        for key in ("accel", "boot_ms"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.parent is not None:
            out.update(kind="transient", parent=self.parent, name=self.name,
                       split_on=self.split_on, placed_ms=self.placed_ms)
        return out


@dataclass(frozen=True)
class PhaseApplied(Notice):
    kind: ClassVar[str] = "phase"
    phase: int
    at_ms: float
    scheduled: float
    lag_ms: float
    late: bool
    changes: Mapping[str, str]
    #: the steps the zone already had in force ("network (NIC absent)": the phase was
    #: half-applied before its controller died, or a limit was already tighter)
    already: tuple[str, ...] = ()
    #: who put it in force: "controller", or "agent" (the zone's deputy, on its own)
    by: str = "controller"

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phase": self.phase, "at_ms": self.at_ms,
                               "scheduled": self.scheduled, "lag_ms": self.lag_ms,
                               "late": self.late, "changes": dict(self.changes),
                               "by": self.by}
        if self.already:
            out["already"] = list(self.already)
        return out


@dataclass(frozen=True)
class Note(Notice):
    """A fact worth telling that is not a phase (an unplug completing, the agent watching,
    a transient zone following its parent's tightening, a controller fault)."""

    kind: ClassVar[str] = "note"
    note: str
    detail: str

    def fields(self) -> dict[str, Any]:
        return {"kind": self.note, "detail": self.detail}


@dataclass(frozen=True)
class AnomalySeen(Notice):
    kind: ClassVar[str] = "anomaly"
    category: str
    detail: str
    source: str
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        return {"kind": self.category, "detail": self.detail, "source": self.source,
                "evidence": dict(self.evidence)}


@dataclass(frozen=True)
class ReactionTaken(Notice):
    """The host's reaction to an anomaly; `effect` says what it did (or why nothing could
    be done any more: the zone had ended)."""

    kind: ClassVar[str] = "reaction"
    action: str
    reason: str
    effect: str = ""
    args: Mapping[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"action": self.action, **dict(self.args),
                               "reason": self.reason}
        if self.effect:
            out["effect"] = self.effect
        return out


@dataclass(frozen=True)
class ChannelNotice(Notice):
    """A message between zones (or a refusal), as the broker judged it."""

    kind: ClassVar[str] = "channel"
    sender: str
    receiver: str
    size: int
    verdict: str
    reason: str = ""

    def fields(self) -> dict[str, Any]:
        return {"from": self.sender, "to": self.receiver, "size": self.size,
                "verdict": self.verdict, "reason": self.reason}


@dataclass(frozen=True)
class Adopted(Notice):
    """A controller took the zone over (`hvtsm resume`); `ts` is the zone's start, so later
    lines count from it. Told before anything its adoption audits (its deputy's phases)."""

    kind: ClassVar[str] = "adopt"
    pending: tuple[int, ...] = ()

    def fields(self) -> dict[str, Any]:
        return {"pending": list(self.pending)}


@dataclass(frozen=True)
class Ended(Notice):
    """The zone ended: who ended it, the workload's status, whether it was hostile."""

    kind: ClassVar[str] = "exit"
    status: int | None
    state: str
    reason: str
    ended_by: str
    hostile: bool
    anomalies: int
    #: a transient zone: where it belonged
    parent: str | None = None
    name: str | None = None
    zone_kind: str | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "state": self.state,
                               "reason": self.reason, "ended_by": self.ended_by,
                               "hostile": self.hostile, "anomalies": self.anomalies}
        if self.parent is not None:
            out.update(parent=self.parent, kind=self.zone_kind, name=self.name)
        return out


Listener = Callable[[Notice], None]


class Notifier:
    """Hands each notice to the listeners, in the order they are announced. A listener that
    fails is logged and skipped: a broken watcher never stops the timeline."""

    def __init__(self, *listeners: Listener | None) -> None:
        self._listeners = [lst for lst in listeners if lst is not None]

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, notice: Notice) -> None:
        for listener in list(self._listeners):
            try:
                listener(notice)
            except Exception:
                log.exception("a listener failed on a %s notice", notice.kind)
