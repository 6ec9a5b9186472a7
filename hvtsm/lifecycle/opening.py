"""Where a zone comes to be: one path for a launched zone and a transient split.

`open_zone` registers the zone first (its row, its `created` event, its `ZoneRun` in the
registry), then lets the maker build it (a driver's create + start, a warm pool's bind +
start, or a driver's split), then begins it: the schedule is written (jobs first: a
controller killed from then on leaves a schedule to adopt), the start and the phases at 0
are recorded and announced, `opened` is set and the workload's end is watched. Whatever
goes wrong on the way leaves a `failed` record and nothing else; whatever goes wrong after
the workload runs ends it (fail closed).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hvtsm.controllers import claim_zone, release_zone
from hvtsm.lifecycle.core import Core
from hvtsm.lifecycle.ending import Ending
from hvtsm.lifecycle.notices import Started
from hvtsm.lifecycle.outcome import EndCause
from hvtsm.lifecycle.phases import Phases
from hvtsm.lifecycle.zonerun import ZoneKind, ZoneRun
from hvtsm.policy import Policy
from hvtsm.restrictions import Restrictions
from hvtsm.store.audit import record_event, record_phase
from hvtsm.store.models import Zone, ZoneState
from hvtsm.zones.base import Backend, StartFacts, Workload, ZoneHandle


@dataclass(frozen=True)
class Order:
    """What zone to open."""

    policy: Policy
    scale: float
    backend: Backend
    #: what the zone runs, as stored (a launch's argv, a transient zone's exec)
    command: Sequence[str]
    #: the policy text stored with the zone (an adopting controller follows it)
    policy_toml: str
    user: str | None = None
    kind: ZoneKind = ZoneKind.ZONE
    name: str | None = None
    group: str | None = None
    parent: str | None = None
    #: the `created` event's words
    created: str = ""
    #: audited on the parent's trail (a transient zone's split)
    parent_event: str | None = None


@dataclass(frozen=True)
class Begun:
    """What the maker built, and how to record and announce its start."""

    handle: ZoneHandle[Any]
    workload: Workload
    #: the `started` event's words
    detail: str
    facts: StartFacts = field(default_factory=StartFacts)
    #: what the phases at 0 put in force (a transient zone's are bounded by its parent)
    bound: Callable[[Restrictions], Restrictions] = lambda r: r
    zero_note: str = "in force before the workload started"
    #: the start notice's transient fields
    split: dict[str, Any] = field(default_factory=dict)


#: builds the registered zone (its id, its net index); raises HvtsmError, leaving nothing
Maker = Callable[[ZoneRun, int], Begun]


class Opener:
    def __init__(self, core: Core, ending: Ending, phases: Phases) -> None:
        self.core = core
        self.ending = ending
        self.phases = phases

    def open_zone(self, order: Order, make: Maker) -> ZoneRun:
        run, seq = self.register(order)
        try:
            begun = make(run, seq)
        except BaseException as exc:
            self.fail(run, f"{run.step}: {exc}")
            raise
        self.begin(run, begun)
        return run

    def register(self, order: Order) -> tuple[ZoneRun, int]:
        """The zone's row and its run, before anything of it exists."""
        zone_id = "z" + secrets.token_hex(4)
        policy = order.policy
        with self.core.store.session() as session:
            row = Zone(id=zone_id, backend=str(order.backend), state=ZoneState.CREATING,
                       policy_name=policy.name, policy_digest=policy.digest,
                       policy_source=policy.source, policy_toml=order.policy_toml,
                       lifespan_scale=order.scale, command=json.dumps(list(order.command)),
                       user=order.user, controller_id=self.core.controller.id,
                       created_at=time.time(), name=order.name, group_id=order.group,
                       parent_id=order.parent, kind=str(order.kind))
            session.add(row)
            record_event(session, zone_id=zone_id, kind="created", detail=order.created)
            if order.parent is not None and order.parent_event:
                record_event(session, zone_id=order.parent, kind="split",
                             detail=order.parent_event.replace("{zone}", zone_id))
            session.flush()
            seq = row.seq or 0
        claim_zone(zone_id)
        run = ZoneRun(zone_id=zone_id, policy=policy, scale=order.scale, kind=order.kind,
                      name=order.name, group=order.group, parent=order.parent)
        self.core.zones.add(run)
        return run, seq

    def fail(self, run: ZoneRun, detail: str) -> None:
        """The zone could not be made: a `failed` record and nothing else."""
        with run.notes_lock:
            run.announced = True  # nothing more to hold back: it never started
        release_zone(run.zone_id)
        self.core.channels().ended(run.zone_id)
        with run.lock:
            run.state = ZoneState.FAILED
            run.end_reason_given = detail
        with self.core.store.session() as session:
            record_event(session, zone_id=run.zone_id, kind="failed", detail=detail)
            self.core.save(session, run, ended_at=time.time(), end_reason=detail)
        run.opened.set()
        run.ended.set()

    def begin(self, run: ZoneRun, begun: Begun) -> None:
        """The workload runs: write its schedule and start, announce them, watch its end."""
        zero = self.phases.zero(run)
        started = time.time()
        try:
            with run.lock:
                policy, scale = run.policy, run.scale
                run.handle, run.workload, run.started_at = begun.handle, begun.workload, started
                run.pending = {p.index: started + p.at_ms * scale / 1000
                               for p in policy.later_phases()}
                run.phase_index = zero[-1].index if zero else -1
                run.state = ZoneState.RUNNING
                self.phases.schedule(run)
                with self.core.store.session() as session:
                    record_event(session, zone_id=run.zone_id, kind="started",
                                 detail=begun.detail, ts=started)
                    for note in begun.facts.notes:
                        record_event(session, zone_id=run.zone_id, kind="note", detail=note)
                    for phase in zero:
                        record_phase(session, zone_id=run.zone_id, phase_index=phase.index,
                                     scheduled_at=started, applied_at=started, late=False,
                                     changes=begun.bound(phase.restrictions).describe(),
                                     note=begun.zero_note)
                    self.core.save(session, run, started_at=started)
                self.phases.tell_deputy(run)
                with run.notes_lock:
                    run.announced = True
                    notes = tuple(run.opening_notes)
        except BaseException as exc:
            # the workload runs but its start is not recorded: it must not run on unwatched
            self.core.fault(run.zone_id, "recording the zone's start", exc)
            with run.notes_lock:
                run.announced = True
            with run.lock:
                self.ending.end(run, f"recording its start failed ({exc}); ended to fail "
                                "closed", EndCause.FAIL_CLOSED)
            run.opened.set()
            self.ending.watch(run)
            raise
        lifespan = policy.lifespan_ms
        self.core.notify(Started(
            run.zone_id, started, begun.workload.pid, policy.name, str(begun.handle.backend),
            scale, None if lifespan is None else lifespan * scale, accel=begun.facts.accel,
            boot_ms=begun.facts.boot_ms, notes=notes, **begun.split))
        for phase in zero:
            self.core.notify(self.phases.notice(run, phase.index, started, started,
                                                begun.bound(phase.restrictions).describe()))
        run.opened.set()
        self.ending.watch(run)
