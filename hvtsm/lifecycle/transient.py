"""Transient zones at run time: when a zone's agent holds a code path nobody foresaw (an
exec of a program outside the expected ones, or the first connect off the host of a
process), the process subtree gets a zone of its own with a shorter policy, while the
parent goes on. What is foreseen and which policy applies is decided at launch
(hvtsm/policy/transient.py); the drivers' part is `ZoneDriver.split`/`refuse`.

* **Never looser than the parent**: every restriction is the tighter of the transient
  policy's and the parent's in force, at the split, at each of its phases (`bound`), and
  whenever the parent tightens later (`follow_parent`).
* **Limits**: more than `max_zones` splits from one zone (counted over its life, so churn
  cannot get around it) is a `transient-limit` anomaly of the parent and the call is
  refused. Any failure to split refuses the call too (fail closed).
* **Ends**: the transient zone ends on its own schedule (its subtree killed, the parent
  going on), when its processes are gone, or with its parent (hvtsm/lifecycle/ending.py).
* **Anomalies** of a process inside a transient zone (the agent names the zone) are
  recorded against, and reacted to in, the transient zone (`attribute`).

Splits run on the inbox's thread: code paths arrive in order with the anomalies, so an
anomaly that follows a split already finds the transient zone made.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlmodel import func, select

from hvtsm.errors import HvtsmError, PolicyError, ZoneError
from hvtsm.lifecycle.core import Core
from hvtsm.lifecycle.ending import Ending
from hvtsm.lifecycle.opening import Begun, Opener, Order
from hvtsm.lifecycle.outcome import EndCause
from hvtsm.lifecycle.zonerun import ZoneKind, ZoneRun
from hvtsm.monitor.anomalies import AnomalyReport
from hvtsm.monitor.code_path import CodePath
from hvtsm.policy import Policy
from hvtsm.policy.transient import transient_policy
from hvtsm.restrictions import Restrictions
from hvtsm.store.audit import record_event
from hvtsm.store.models import Zone
from hvtsm.zones.base import StartFacts, ZoneSpec

log = logging.getLogger(__name__)

#: an anomaly the host itself raises (transient-limit), queued like an agent's
RaiseAnomaly = Callable[[str, AnomalyReport], None]


class Transients:
    def __init__(self, core: Core, opener: Opener, ending: Ending, *,
                 raise_anomaly: RaiseAnomaly) -> None:
        self.core = core
        self.opener = opener
        self.ending = ending
        self._raise = raise_anomaly

    def split(self, parent_id: str, request: CodePath) -> None:
        parent = self.core.zones.require(parent_id)
        parent.opened.wait()
        with parent.lock:
            tpolicy = parent.transient_policy
            if not parent.live or tpolicy is None or parent.handle is None:
                why = "the zone is ending" if tpolicy is not None else \
                    "transient zones are off in its policy"
                self._refuse(parent, request, why)
                return
            rules = parent.policy.transient
            if parent.splits >= rules.max_zones:
                self._refuse(parent, request, "max_zones reached")
                self._raise(parent_id, AnomalyReport(
                    "transient-limit",
                    f"{request.describe()} refused: the zone already split off "
                    f"{parent.splits} transient zone(s) (max_zones {rules.max_zones})",
                    "host", dict(request.data)))
                return
            parent.splits += 1
            try:
                self._make(parent, tpolicy, request, parent.splits)
            except HvtsmError as exc:  # fail closed: an unplaced code path does not run
                self._refuse(parent, request, f"no transient zone could be made: {exc}")

    def _refuse(self, parent: ZoneRun, request: CodePath, why: str) -> None:
        if parent.handle is not None:
            try:
                self.core.driver_of(parent).refuse(parent.handle, request, why)
            except HvtsmError as exc:  # the agent's own timeout refuses it then
                log.warning("zone %s: cannot refuse %s: %s", parent.zone_id,
                            request.describe(), exc)
        with self.core.store.session() as session:
            record_event(session, zone_id=parent.zone_id, kind="code-path-refused",
                         detail=f"{request.describe()} (pid {request.pid}) refused: {why}")

    def _make(self, parent: ZoneRun, tpolicy: Policy, request: CodePath, number: int) -> None:
        parent_handle = parent.require_handle()
        driver = self.core.driver_of(parent)
        name = f"{parent.name or parent.zone_id}.t{number}"
        scale = parent.scale * parent.policy.transient.lifespan_scale
        initial = tpolicy.initial().tighter(parent_handle.applied)
        what = f"{request.describe()} (pid {request.pid})"
        user = parent_handle.state.user
        toml = tpolicy.text or _read_text(tpolicy.source)
        order = Order(policy=tpolicy, scale=scale, backend=parent_handle.backend,
                      command=request.command(), policy_toml=toml, user=user,
                      kind=ZoneKind.TRANSIENT, name=name, group=parent.group,
                      parent=parent.zone_id,
                      created=f"split from {parent.zone_id} on {what}; policy "
                              f"{tpolicy.name}, scale {scale:g}",
                      parent_event=f"transient zone {{zone}} ({name}) made for {what}")

        def make(run: ZoneRun, seq: int) -> Begun:
            run.step = f"could not split from {parent.zone_id}"
            t0 = time.monotonic()
            handle, workload = driver.split(parent_handle, ZoneSpec(
                zone_id=run.zone_id, net_index=seq, user=user, parent=parent.zone_id),
                request, initial)
            placed_ms = (time.monotonic() - t0) * 1000
            parent.children.append(run.zone_id)
            return Begun(
                handle=handle, workload=workload,
                detail=f"pid {request.pid} placed in {placed_ms:.1f} ms: "
                       + ", ".join(f"{k} {v}" for k, v in initial.describe().items()),
                facts=StartFacts(notes=handle.state.facts().notes),
                bound=lambda r: r.tighter(parent_handle.applied),
                zero_note="in force when the subtree was placed",
                split={"parent": parent.zone_id, "name": name,
                       "split_on": request.describe(), "placed_ms": round(placed_ms, 3)})

        self.opener.open_zone(order, make)

    # -- steps the lifecycle calls ---------------------------------------------------------

    def bound(self, run: ZoneRun, restrictions: Restrictions) -> Restrictions:
        """A transient zone's phase, never looser than its parent now."""
        if run.parent is None:
            return restrictions
        parent = self.core.zones.get(run.parent)
        if parent is None or parent.handle is None:
            return restrictions
        return restrictions.tighter(parent.handle.applied)

    def follow_parent(self, parent: ZoneRun) -> None:
        """The parent tightened: its live transient zones tighten with it (caller holds
        the parent's lock)."""
        for child in self.core.zones.children(parent):
            with child.lock:
                if not child.live or child.handle is None or parent.handle is None:
                    continue
                target = child.handle.applied.tighter(parent.handle.applied)
                if target == child.handle.applied:
                    continue
                try:
                    changes = target.changes_from(child.handle.applied)
                    report = self.core.driver_of(child).apply(child.handle, target)
                except HvtsmError as exc:
                    self.ending.end(child, f"could not follow its parent's tightening "
                                    f"({exc}); terminated to fail closed",
                                    EndCause.FAIL_CLOSED)
                    continue
                with self.core.store.session() as session:
                    self.core.save(session, child)
                already = "; already in force: " + ", ".join(map(str, report.already)) \
                    if report.already else ""
                self.core.note(child.zone_id, "tightened", "follows its parent "
                               + parent.zone_id + ": "
                               + ", ".join(f"{k} {v}" for k, v in changes.items()) + already)

    def attribute(self, zone_id: str, report: AnomalyReport) -> str:
        """The zone an anomaly belongs to: the transient zone the agent names, when it is
        one of `zone_id`'s (a name it cannot vouch for stays with the parent)."""
        named = report.evidence.get("zone")
        run = self.core.zones.get(zone_id)
        if isinstance(named, str) and run is not None and named in run.children:
            return named
        return zone_id

    def relink(self) -> None:
        """After adoption: parents learn their transient zones again, and their policy."""
        runs = self.core.zones.all()
        for run in runs:
            parent = self.core.zones.get(run.parent) if run.parent is not None else None
            if parent is not None and run.zone_id not in parent.children:
                parent.children.append(run.zone_id)
        with self.core.store.session() as session:
            for run in runs:
                if run.parent is not None:
                    continue
                try:
                    run.transient_policy = transient_policy(run.policy)
                except PolicyError as exc:
                    log.warning("zone %s: no transient zones after adoption: %s",
                                run.zone_id, exc)
                run.splits = session.exec(select(func.count()).select_from(Zone).where(
                    Zone.parent_id == run.zone_id)).one()


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ZoneError(f"cannot read the transient policy {path}: {exc}",
                        hint="the policy file moved since the zone was launched") from exc
