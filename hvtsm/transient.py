"""Transient zones: when a zone's agent holds a code path nobody foresaw (an exec of a
program outside the expected ones, or the first connect off the host of a process), the
process subtree gets a zone of its own with a shorter policy, while the parent goes on.

The manager's part lives here (the drivers' in `ZoneDriver.split`/`refuse`):

* **Which programs are expected**: the workload's own program (as given and resolved), the
  policy's `[transient] expect_exec`, and what the caller passes (`Manager.launch
  expect_exec`: the programs `hvtsm analyze` found). They travel to the agent in the
  monitoring profile's `transient` field.
* **The transient policy**: `[transient] policy` when set, else `policies/transient.toml`
  (short and tight). Not the parent's own policy scaled: that one was written for the code
  the analysis saw, usually with the network open at first, which is exactly what an
  unforeseen path should not get. Its lifespan is scaled by parent scale x lifespan_scale.
* **Never looser than the parent**: every restriction is the tighter of the transient
  policy's and the parent's in force (`tighter`), at the split, at each of its phases, and
  whenever the parent tightens later.
* **Limits**: more than `max_zones` splits from one zone (counted over its life, so churn
  cannot get around it) is a `transient-limit` anomaly of the parent and the call is
  refused. Any failure to split refuses the call too (fail closed).
* **Ends**: the transient zone ends on its own schedule (its subtree killed, the parent
  going on), when its processes are gone, or with its parent.
* **Anomalies** of a process inside a transient zone (the agent names the zone) are
  recorded against, and reacted to in, the transient zone.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hvtsm.controllers import claim_zone
from hvtsm.errors import HvtsmError, PolicyError, ZoneError
from hvtsm.monitor.anomalies import AnomalyReport, zone_profile
from hvtsm.monitor.code_path import CodePath
from hvtsm.policy import Policy
from hvtsm.policy.catalog import load_referenced, resolve
from hvtsm.restrictions import EgressRule, NetworkMode, Restrictions
from hvtsm.store.audit import record_event, record_phase
from hvtsm.store.models import Zone, ZoneState
from hvtsm.zones.base import ZoneSpec

if TYPE_CHECKING:
    from hvtsm.manager import Manager, ZoneRun

log = logging.getLogger(__name__)

#: the shipped transient policy (policies/transient.toml), used when [transient] names none
DEFAULT_TRANSIENT_POLICY = "transient"
KIND = "transient"


# -- restrictions -------------------------------------------------------------------------

def tighter(a: Restrictions, b: Restrictions) -> Restrictions:
    """Each field at the tighter of `a` and `b`: what a transient zone may do is never more
    than its parent may."""
    network = a.network if a.network.rank() >= b.network.rank() else b.network
    egress: tuple[EgressRule, ...] | None
    if a.egress is None:
        egress = b.egress
    elif b.egress is None:
        egress = a.egress
    else:  # destinations both allow: each side's rules the other side covers
        both = [r for r in a.egress if any(e.covers(r) for e in b.egress)]
        both += [r for r in b.egress if any(e.covers(r) for e in a.egress)]
        egress = tuple(sorted(set(both)))
    cpus = a.cpus if b.cpus is None else b.cpus if a.cpus is None else (a.cpus & b.cpus
                                                                          or b.cpus)
    return Restrictions(
        network=network, egress=egress if network is NetworkMode.FULL else None,
        cpu_shares=_least(a.cpu_shares, b.cpu_shares), cpu_quota=_least(a.cpu_quota,
                                                                          b.cpu_quota),
        cpus=cpus, memory=_least(a.memory, b.memory), pids=_least(a.pids, b.pids),
        filesystem=a.filesystem if a.filesystem.rank() >= b.filesystem.rank()
        else b.filesystem)


def _least(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def limits_of(restrictions: Restrictions) -> dict[str, Any]:
    """The `transient.limits` of the wire protocol (a guest's transient cgroup)."""
    return {"memory": restrictions.memory, "pids": restrictions.pids,
            "cpu_quota": restrictions.cpu_quota, "cpu_shares": restrictions.cpu_shares}


def agent_network(restrictions: Restrictions) -> str:
    """The network the agent judges a transient zone's connects against."""
    return str(zone_profile({}, restrictions)["network"])


# -- at launch ----------------------------------------------------------------------------

def transient_policy(policy: Policy) -> Policy | None:
    """The policy a zone's transient zones get (None: the policy has them off). Loaded at
    launch so a bad reference fails the launch, not the first split."""
    rules = policy.transient
    if not rules.enabled:
        return None
    if rules.policy is not None:
        return load_referenced(rules.policy, beside=policy.source, field="transient.policy")
    path = resolve(DEFAULT_TRANSIENT_POLICY)
    if not path.exists():
        raise PolicyError(f"[transient] names no policy and the default {path} is missing",
                          file=policy.source, field="transient.policy",
                          hint="set [transient] policy, or reinstall hvtsm's policies")
    return load_referenced(str(path), beside=policy.source, field="transient.policy")


def expected_programs(policy: Policy, argv: Sequence[str],
                      extra: Sequence[str] = ()) -> list[str]:
    """The workload's own program as given and resolved, the policy's expect_exec and
    `extra` (the analysis's), in that order, without repeats."""
    out = [argv[0]] if argv[0].startswith("/") else []
    found = shutil.which(argv[0])
    if found:
        out += [os.path.abspath(found), os.path.realpath(found)]
    out += list(policy.transient.expect_exec) + list(extra)
    return list(dict.fromkeys(p for p in out if p))


def monitor_transient(policy: Policy, argv: Sequence[str],
                      extra: Sequence[str] = ()) -> dict[str, Any] | None:
    """The monitoring profile's `transient` field for a zone of `policy` (None: off)."""
    rules = policy.transient
    if not rules.enabled or not rules.triggers:
        return None
    return {"triggers": list(rules.triggers),
            "expect_exec": expected_programs(policy, argv, extra)}


# -- at run time --------------------------------------------------------------------------

class Transients:
    """The manager's transient-zone steps; runs on the manager's reactions thread (code
    paths arrive in order with the anomalies, so an anomaly that follows a split already
    finds the transient zone)."""

    def __init__(self, manager: Manager) -> None:
        self.m = manager

    def split(self, parent_id: str, request: CodePath) -> None:
        m = self.m
        parent = m._run(parent_id)
        driver = m._driver_for(parent.handle.backend)
        with parent.lock:
            tpolicy = parent.transient_policy
            if parent.ended.is_set() or parent.state is ZoneState.TERMINATED \
                    or tpolicy is None:
                why = "the zone is ending" if tpolicy is not None else \
                    "transient zones are off in its policy"
                self._refuse(parent, request, why)
                return
            rules = parent.policy.transient
            if parent.splits >= rules.max_zones:
                self._refuse(parent, request, "max_zones reached")
                m._react(parent_id, AnomalyReport(
                    "transient-limit",
                    f"{request.describe()} refused: the zone already split off "
                    f"{parent.splits} transient zone(s) (max_zones {rules.max_zones})",
                    "host", dict(request.data)))
                return
            parent.splits += 1
            try:
                self._make(parent, driver, tpolicy, request, parent.splits)
            except HvtsmError as exc:  # fail closed: an unplaced code path does not run
                self._refuse(parent, request, f"no transient zone could be made: {exc}")

    def _refuse(self, parent: ZoneRun, request: CodePath, why: str) -> None:
        try:
            self.m._driver_for(parent.handle.backend).refuse(parent.handle, request, why)
        except HvtsmError as exc:  # the agent's own timeout refuses it then
            log.warning("zone %s: cannot refuse %s: %s", parent.zone_id,
                        request.describe(), exc)
        with self.m.store.session() as session:
            record_event(session, zone_id=parent.zone_id, kind="code-path-refused",
                         detail=f"{request.describe()} (pid {request.pid}) refused: {why}")

    def _make(self, parent: ZoneRun, driver: Any, tpolicy: Policy, request: CodePath,
              number: int) -> None:
        m = self.m
        zone_id = "z" + secrets.token_hex(4)
        name = f"{parent.name or parent.zone_id}.t{number}"
        scale = parent.scale * parent.policy.transient.lifespan_scale
        initial = tighter(tpolicy.initial(), parent.handle.applied)
        what = f"{request.describe()} (pid {request.pid})"
        toml = _read_text(tpolicy.source)
        with m.store.session() as session:
            row = Zone(id=zone_id, backend=str(driver.backend), state=ZoneState.CREATING,
                       policy_name=tpolicy.name, policy_digest=tpolicy.digest,
                       policy_source=tpolicy.source, policy_toml=toml,
                       lifespan_scale=scale, command=json.dumps(request.command()),
                       user=parent.handle.state.get("user"),
                       controller_id=m.controller.id, created_at=time.time(), name=name,
                       group_id=parent.group, parent_id=parent.zone_id, kind=KIND)
            session.add(row)
            record_event(session, zone_id=zone_id, kind="created",
                         detail=f"split from {parent.zone_id} on {what}; policy "
                         f"{tpolicy.name}, scale {scale:g}")
            record_event(session, zone_id=parent.zone_id, kind="split",
                         detail=f"transient zone {zone_id} ({name}) made for {what}")
            session.flush()
            seq = row.seq or 0
        claim_zone(zone_id)
        m._hold(zone_id)
        t0 = time.monotonic()
        try:
            handle, workload = driver.split(parent.handle, ZoneSpec(
                zone_id=zone_id, net_index=seq, user=parent.handle.state.get("user"),
                parent=parent.zone_id), request, initial)
        except HvtsmError as exc:
            m._fail(zone_id, f"could not split from {parent.zone_id}: {exc}")
            m._release(zone_id)
            raise
        started = time.time()
        placed_ms = (time.monotonic() - t0) * 1000
        from hvtsm.manager import ZoneRun

        zero = [p for p in tpolicy.phases if p.at_ms == 0 and not p.terminate]
        pending = {p.index: started + p.at_ms * scale / 1000 for p in tpolicy.later_phases()}
        run = ZoneRun(zone_id=zone_id, policy=tpolicy, scale=scale, handle=handle,
                      workload=workload, started_at=started, pending=pending,
                      phase_index=zero[-1].index if zero else -1, name=name,
                      group=parent.group, parent=parent.zone_id, kind=KIND)
        with m._zones_lock:
            m.zones[zone_id] = run
        parent.children.append(zone_id)
        for index, due in pending.items():
            m.timeline.schedule(zone_id, index, due)
        with m.store.session() as session:
            record_event(session, zone_id=zone_id, kind="started",
                         detail=f"pid {request.pid} placed in {placed_ms:.1f} ms: "
                         + ", ".join(f"{k} {v}" for k, v in initial.describe().items()),
                         ts=started)
            for note in handle.state.get("notes", []):
                record_event(session, zone_id=zone_id, kind="note", detail=str(note))
            for phase in zero:
                record_phase(session, zone_id=zone_id, phase_index=phase.index,
                             scheduled_at=started, applied_at=started, late=False,
                             changes=tighter(phase.restrictions,
                                             parent.handle.applied).describe(),
                             note="in force when the subtree was placed")
            m._save(session, run, state=ZoneState.RUNNING, started_at=started)
        lifespan = tpolicy.lifespan_ms
        m._notify("start", zone_id, started, {
            "pid": request.pid, "policy": tpolicy.name, "backend": str(driver.backend),
            "scale": scale, "lifespan_ms": None if lifespan is None else lifespan * scale,
            "kind": KIND, "parent": parent.zone_id, "name": name,
            "split_on": request.describe(), "placed_ms": round(placed_ms, 3)})
        for phase in zero:
            m._notify("phase", zone_id, started, m._phase_data(
                run, phase.index, started, started, phase.restrictions.describe()))
        m._release(zone_id)
        m._watch(run)

    # -- steps the manager calls --------------------------------------------------------

    def bound(self, run: ZoneRun, restrictions: Restrictions) -> Restrictions:
        """A transient zone's phase, never looser than its parent now."""
        if run.parent is None:
            return restrictions
        parent = self.m.zones.get(run.parent)
        if parent is None:
            return restrictions
        return tighter(restrictions, parent.handle.applied)

    def follow_parent(self, parent: ZoneRun) -> None:
        """The parent tightened: its live transient zones tighten with it (caller holds
        the parent's lock)."""
        for child in self._children(parent):
            with child.lock:
                if child.ended.is_set() or child.state is ZoneState.TERMINATED:
                    continue
                target = tighter(child.handle.applied, parent.handle.applied)
                if target == child.handle.applied:
                    continue
                driver = self.m._driver_for(child.handle.backend)
                try:
                    changes = target.changes_from(child.handle.applied)
                    driver.apply(child.handle, target)
                except HvtsmError as exc:
                    self.m._end(child, f"could not follow its parent's tightening ({exc}); "
                                "terminated to fail closed")
                    continue
                now = time.time()
                detail = "follows its parent " + parent.zone_id + ": " + ", ".join(
                    f"{k} {v}" for k, v in changes.items())
                with self.m.store.session() as session:
                    record_event(session, zone_id=child.zone_id, kind="tightened",
                                 detail=detail, ts=now)
                    self.m._save(session, child)
                self.m._notify("note", child.zone_id, now, {"kind": "tightened",
                                                            "detail": detail})

    def end_children(self, parent: ZoneRun) -> None:
        """The parent ends: so do its transient zones, each audited (caller holds the
        parent's lock)."""
        for child in self._children(parent):
            with child.lock:
                if child.ended.is_set() or child.state is ZoneState.TERMINATED:
                    continue
                reason = f"its parent zone {parent.zone_id} ended"
                with self.m.store.session() as session:
                    record_event(session, zone_id=child.zone_id, kind="terminate",
                                 detail=reason)
                try:
                    self.m._end(child, reason)
                except HvtsmError as exc:
                    log.warning("zone %s: %s", child.zone_id, exc)

    def attribute(self, zone_id: str, report: AnomalyReport) -> str:
        """The zone an anomaly belongs to: the transient zone the agent names, when it is
        one of `zone_id`'s (a name it cannot vouch for stays with the parent)."""
        named = report.evidence.get("zone")
        run = self.m.zones.get(zone_id)
        if isinstance(named, str) and run is not None and named in run.children:
            return named
        return zone_id

    def relink(self) -> None:
        """After adoption: parents learn their transient zones again."""
        runs = list(self.m.zones.values())
        for run in runs:
            if run.parent is not None and run.parent in self.m.zones:
                parent = self.m.zones[run.parent]
                if run.zone_id not in parent.children:
                    parent.children.append(run.zone_id)
        with self.m.store.session() as session:
            for run in runs:
                if run.parent is not None:
                    continue
                try:
                    run.transient_policy = transient_policy(run.policy)
                except PolicyError as exc:
                    log.warning("zone %s: no transient zones after adoption: %s",
                                run.zone_id, exc)
                from sqlmodel import func, select

                run.splits = session.exec(select(func.count()).select_from(Zone).where(
                    Zone.parent_id == run.zone_id)).one()

    def _children(self, parent: ZoneRun) -> list[ZoneRun]:
        return [self.m.zones[c] for c in parent.children if c in self.m.zones]


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ZoneError(f"cannot read the transient policy {path}: {exc}",
                        hint="the policy file moved since the zone was launched") from exc
