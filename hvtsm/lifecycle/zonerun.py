"""A zone this controller drives, and the registry of them.

A `ZoneRun` is registered the moment its store row exists, before its driver makes anything
and long before its workload's first instruction: whatever a driver reports about the zone
finds it. `opened` is set once its launch is complete (the schedule exists) or has failed;
the reactions wait for it, so an anomaly reported right after exec is reacted to against
the zone's real schedule, by construction rather than by a timed poll.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hvtsm.errors import ZoneError
from hvtsm.lifecycle.outcome import EndCause, Outcome
from hvtsm.policy import Policy
from hvtsm.store.models import ZoneState
from hvtsm.zones.base import Workload, ZoneHandle


class ZoneKind(StrEnum):
    ZONE = "zone"
    #: a stage of a pipeline
    SEGMENT = "segment"
    #: split off a running zone on an unforeseen code path
    TRANSIENT = "transient"


@dataclass
class ZoneRun:
    zone_id: str
    policy: Policy
    scale: float
    kind: ZoneKind = ZoneKind.ZONE
    #: name within its group, the group (pipeline, invocation) and the zone it was split
    #: from (transient zones)
    name: str | None = None
    group: str | None = None
    parent: str | None = None
    handle: ZoneHandle[Any] | None = None
    workload: Workload | None = None
    #: epoch when the workload's first instruction ran (None: not yet)
    started_at: float | None = None
    #: phase index -> due epoch of transitions not yet applied
    pending: dict[int, float] = field(default_factory=dict)
    phase_index: int = -1
    state: ZoneState = ZoneState.CREATING
    #: transitions that fell due while no controller ran (found on adoption)
    overdue: set[int] = field(default_factory=set)
    #: anomalies recorded so far (repeated anomalies escalate)
    anomalies: int = 0
    #: set by whoever ends the zone under its workload, before the driver kills it
    end_cause: EndCause | None = None
    end_reason_given: str | None = None
    #: when its end took effect, if before it was recorded (its agent ended it while no
    #: controller ran); None: when recorded
    ended_at: float | None = None
    #: its deputy could not be given its schedule (audited once)
    deputy_lost: bool = False
    #: why the agent killed the workload's first process, when an anomaly said it did
    contained: str | None = None
    outcome: Outcome | None = None
    #: what opening the zone is doing now, for the `failed` record when it fails
    step: str = "could not make the zone"
    #: notes its driver reported while the zone was being made (audited at once): the
    #: start notice carries them, the first thing announced about a zone being its start
    opening_notes: list[tuple[str, str]] = field(default_factory=list)
    announced: bool = False
    #: guards the two above alone: a link's reader thread takes it, and must never wait
    #: for `lock`, which a phase holds while it waits for that very reader
    notes_lock: threading.Lock = field(default_factory=threading.Lock)
    #: the policy its transient zones get (None: they are off), their ids, and how many
    #: were ever split off (max_zones counts those)
    transient_policy: Policy | None = None
    children: list[str] = field(default_factory=list)
    splits: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock)
    opened: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)

    @property
    def live(self) -> bool:
        """Neither ended nor being ended."""
        return not self.ended.is_set() and self.state is not ZoneState.TERMINATED

    @property
    def exit_status(self) -> int | None:
        return self.outcome.status if self.outcome is not None else None

    @property
    def end_reason(self) -> str | None:
        if self.outcome is not None:
            return self.outcome.reason
        return self.end_reason_given

    @property
    def root_pid(self) -> int | None:
        return self.workload.pid if self.workload is not None else None

    def require_handle(self) -> ZoneHandle[Any]:
        if self.handle is None:
            raise ZoneError("the zone has not been made yet", zone_id=self.zone_id)
        return self.handle


class Registry:
    """The zones this controller drives, by id (any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, ZoneRun] = {}

    def add(self, run: ZoneRun) -> None:
        with self._lock:
            self._runs[run.zone_id] = run

    def get(self, zone_id: str) -> ZoneRun | None:
        with self._lock:
            return self._runs.get(zone_id)

    def require(self, zone_id: str) -> ZoneRun:
        run = self.get(zone_id)
        if run is None:
            raise ZoneError("not driven by this controller", zone_id=zone_id)
        return run

    def all(self) -> list[ZoneRun]:
        with self._lock:
            return list(self._runs.values())

    def __contains__(self, zone_id: object) -> bool:
        with self._lock:
            return zone_id in self._runs

    def __getitem__(self, zone_id: str) -> ZoneRun:
        return self.require(zone_id)

    def children(self, run: ZoneRun) -> list[ZoneRun]:
        with self._lock:
            return [self._runs[c] for c in run.children if c in self._runs]
