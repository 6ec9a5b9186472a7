"""What a zone's deputy reports (guest_agent/deputy.py), as the host takes it: typed, and
with nothing believed that cannot be true.

A record arrives as an ``event`` of kind ``deputy`` while the controller is connected, and
in each ``hello`` (its ``deputy`` field) until the controller acknowledges it, with the time
the agent lost its host. A compromised guest writes what it likes: a record with an
impossible value is dropped (counted in `DeputyReport.dropped`), texts are cut to size,
and the lists are bounded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: no time past this is believed (the link's own bound, hvtsm.monitor.link.MAX_EPOCH)
MAX_EPOCH = 2.0**35

#: records taken from one report, texts kept per record and their length
MAX_RECORDS = 64
MAX_RESULTS = 16
MAX_TEXT = 200


def _epoch(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and \
            math.isfinite(value) and 0 < value < MAX_EPOCH:
        return float(value)
    return None


def _index(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
        return value
    return None


@dataclass(frozen=True)
class DeputyRecord:
    """One phase the zone's agent applied on its own."""

    seq: int
    zone: str
    phase: int
    #: epoch seconds: when it was due, when the agent began and finished applying it
    due: float
    started: float
    finished: float
    #: False: a step failed and the agent ended the zone (fail closed)
    ok: bool
    #: the zone's processes are gone (its terminate phase, or the fail-closed kill)
    terminate: bool
    #: part of it is a freeze that stands in for a restriction the controller must apply
    froze: bool
    #: no controller was connected when it was applied
    alone: bool
    together: tuple[int, ...] = ()
    results: tuple[str, ...] = ()
    error: str | None = None

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> DeputyRecord | None:
        """The record, or None when a field cannot be true."""
        seq, phase = _index(data.get("seq")), _index(data.get("phase"))
        due, started, finished = (_epoch(data.get(k)) for k in ("due", "started", "finished"))
        zone = data.get("zone")
        if seq is None or phase is None or due is None or started is None \
                or finished is None or finished < started or not isinstance(zone, str) \
                or not zone or len(zone) > 128:
            return None
        flags = {k: data.get(k) is True for k in ("ok", "terminate", "froze", "alone")}
        together = data.get("together")
        results = data.get("results")
        error = data.get("error")
        return cls(
            seq, zone, phase, due, started, finished, flags["ok"], flags["terminate"],
            flags["froze"], flags["alone"],
            tuple(i for i in together[:MAX_RESULTS] if _index(i) is not None and i < phase)
            if isinstance(together, list) else (),
            tuple(str(r)[:MAX_TEXT] for r in results[:MAX_RESULTS])
            if isinstance(results, list) else (),
            str(error)[:MAX_TEXT] if error is not None else None)

    @property
    def lag_ms(self) -> float:
        """How long after its due time the phase was in force."""
        return round((self.finished - self.due) * 1000, 3)

    def describe(self) -> str:
        what = "; ".join(self.results) or "nothing to change"
        if not self.ok:
            return f"failed ({self.error}); the zone's processes were killed: {what}"
        return what


@dataclass(frozen=True)
class DeputyReport:
    """Records of one agent, and since when it had no controller (None: it had one, or
    said nothing about it)."""

    records: tuple[DeputyRecord, ...] = ()
    alone_since: float | None = None
    #: records the agent dropped for room, and records dropped here as impossible
    lost: int = 0
    dropped: int = 0

    @classmethod
    def parse(cls, data: Any) -> DeputyReport:
        if not isinstance(data, Mapping):
            return cls()
        raw = data.get("records")
        items = raw[:MAX_RECORDS] if isinstance(raw, list) else []
        parsed = [DeputyRecord.parse(r) if isinstance(r, Mapping) else None for r in items]
        lost = _index(data.get("lost")) or 0
        return cls(tuple(sorted((r for r in parsed if r is not None), key=lambda r: r.seq)),
                   _epoch(data.get("alone_since")), lost,
                   sum(r is None for r in parsed) + max(0, len(raw or []) - MAX_RECORDS)
                   if isinstance(raw, list) else 0)

    def of(self, zone: str) -> DeputyReport:
        """The part about `zone`."""
        return DeputyReport(tuple(r for r in self.records if r.zone == zone),
                            self.alone_since, self.lost, self.dropped)

    @property
    def last_seq(self) -> int:
        return max((r.seq for r in self.records), default=0)
