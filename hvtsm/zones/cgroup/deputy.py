"""The cgroup driver's side of a zone's deputy (guest_agent/deputy.py, run by the agent
beside the zone): the monotonic steps that put a phase in force, the schedule sent to the
agent, and the controller's own limit changes made through the very same steps.

What a phase needs, as steps (guest_agent/deputy_steps.py): its limits as `LowerLimit`,
`LowerCpuMax`/`LowerCfsQuota` and `NarrowCpus` of the zone's cgroup files; a network cut as
eth0 down in the zone's namespace (`LinkDown`; the controller unplugs the NIC when it
returns), `none` also the loopback down; `ro` as `RemountReadOnly` of the pinned mount
namespace; the lifespan's end as `Kill`. An egress allow-list that shrinks needs nft
rules the agent does not write: the zone is frozen instead (`Freeze`), until the controller
writes them and thaws.

Both writers of a zone's limit files (the controller in `limits.tighten`, the deputy) hold
the zone's lock (`limits.lock_path`, a flock on a root-only file) and only ever
lower a value, so whichever comes second finds its target in force: a late controller
never raises what the deputy lowered.
"""

from __future__ import annotations

from typing import Any

from guest_agent.deputy_steps import (
    Freeze,
    Kill,
    LinkDown,
    LoopbackDown,
    LowerCfsQuota,
    LowerCpuMax,
    LowerLimit,
    NarrowCpus,
    RemountReadOnly,
    Step,
)
from hvtsm.errors import ZoneError
from hvtsm.monitor.deputy import DeputyReport
from hvtsm.restrictions import FilesystemMode, NetworkMode, Restrictions
from hvtsm.zones.base import DeputyOrders, ZoneHandle
from hvtsm.zones.cgroup import limits, netns
from hvtsm.zones.cgroup.agents import ZoneAgents
from hvtsm.zones.cgroup.cgroupfs import (
    CPU_PERIOD_US,
    CgroupV1,
    CgroupV2,
    ZoneCgroup,
    quota_us,
    shares_to_weight,
)
from hvtsm.zones.cgroup.state import CgroupZoneState


def limit_steps(cgroup: ZoneCgroup, name: str, value: Any) -> list[Step]:
    """The steps that bring limit field `name` down to `value` (None: no limit, which is
    never a tightening: no step)."""
    if value is None:
        return []
    if isinstance(cgroup, CgroupV2):
        return _v2(cgroup, name, value)
    assert isinstance(cgroup, CgroupV1)
    return _v1(cgroup, name, value)


def _v2(cgroup: CgroupV2, name: str, value: Any) -> list[Step]:
    d = cgroup.path
    if name == "memory":
        steps: list[Step] = [LowerLimit(str(d / "memory.max"), int(value))]
        if (d / "memory.swap.max").exists():
            steps.append(LowerLimit(str(d / "memory.swap.max"), 0))
        return steps
    if name == "pids":
        return [LowerLimit(str(d / "pids.max"), int(value))]
    if name == "cpu_shares":
        return [LowerLimit(str(d / "cpu.weight"), shares_to_weight(int(value)))]
    if name == "cpu_quota":
        return [LowerCpuMax(str(d / "cpu.max"), quota_us(float(value)), CPU_PERIOD_US)]
    return [NarrowCpus(str(d / "cpuset.cpus"), tuple(sorted(value)),
                       str(d / "cpuset.cpus.effective"))]


def _v1(cgroup: CgroupV1, name: str, value: Any) -> list[Step]:
    controller = {"memory": "memory", "pids": "pids", "cpu_shares": "cpu",
                  "cpu_quota": "cpu", "cpus": "cpuset"}[name]
    d = cgroup.dir(controller)
    if d is None:
        raise ZoneError(f"cannot limit {name}: this host has no cgroup v1 '{controller}' "
                        "hierarchy mounted", zone_id=cgroup.zone_id)
    if name == "memory":
        # the limit first, then memsw: the kernel keeps limit <= memsw at every moment
        steps: list[Step] = [LowerLimit(str(d / "memory.limit_in_bytes"), int(value))]
        if (d / "memory.memsw.limit_in_bytes").exists():
            steps.append(LowerLimit(str(d / "memory.memsw.limit_in_bytes"), int(value)))
        return steps
    if name == "pids":
        return [LowerLimit(str(d / "pids.max"), int(value))]
    if name == "cpu_shares":
        return [LowerLimit(str(d / "cpu.shares"), int(value))]
    if name == "cpu_quota":
        return [LowerCfsQuota(str(d / "cpu.cfs_quota_us"), str(d / "cpu.cfs_period_us"),
                              quota_us(float(value)), CPU_PERIOD_US)]
    return [NarrowCpus(str(d / "cpuset.cpus"), tuple(sorted(value)))]


def freeze_step(cgroup: ZoneCgroup) -> Freeze:
    if isinstance(cgroup, CgroupV2):
        return Freeze(str(cgroup.path / "cgroup.freeze"), 2)
    assert isinstance(cgroup, CgroupV1)
    d = cgroup.dir("freezer")
    if d is None:
        raise ZoneError("cannot freeze: this host has no cgroup v1 'freezer' hierarchy",
                        zone_id=cgroup.zone_id)
    return Freeze(str(d / "freezer.state"), 1)


def kill_step(cgroup: ZoneCgroup) -> Kill:
    procs = tuple(str(p) for p in cgroup.procs_files())
    if isinstance(cgroup, CgroupV2):
        return Kill(procs, 2, kill=str(cgroup.path / "cgroup.kill"))
    assert isinstance(cgroup, CgroupV1)
    freezer = cgroup.dir("freezer")
    return Kill(procs, 1, freezer=None if freezer is None else str(freezer / "freezer.state"))


def phase_steps(zone_id: str, cgroup: ZoneCgroup, state: CgroupZoneState,
                applied: Restrictions, target: Restrictions) -> list[Step]:
    """The steps that bring the zone from `applied` (in force now) to `target`."""
    steps: list[Step] = []
    where = str(netns.netns_path(zone_id))
    if target.network is not NetworkMode.FULL and state.nic:
        steps.append(LinkDown(where, "eth0"))
    if target.network is NetworkMode.NONE and state.lo_up:
        steps.append(LoopbackDown(where))
    if target.network is NetworkMode.FULL and target.egress != applied.egress:
        steps.append(freeze_step(cgroup))  # until the controller writes the nft rules
    if target.filesystem is FilesystemMode.RO and applied.filesystem is FilesystemMode.RW \
            and state.pid is not None:
        steps.append(RemountReadOnly(state.ns_ref,
                                     tuple(str(p) for p in cgroup.procs_files())))
    for name in limits.FIELDS:
        value = getattr(target, name)
        if value != getattr(applied, name):
            steps += limit_steps(cgroup, name, value)
    return steps


def schedule(zone_id: str, cgroup: ZoneCgroup, state: CgroupZoneState,
             applied: Restrictions, orders: DeputyOrders) -> dict[str, Any]:
    """The ``deputy`` message's fields (without type and id)."""
    kill = kill_step(cgroup).to_dict()
    phases = [{"index": p.index, "due": p.due, "terminate": p.terminate,
               "steps": [kill] if p.terminate else
               [s.to_dict() for s in phase_steps(zone_id, cgroup, state, applied,
                                                 p.restrictions)]}
              for p in orders.phases]
    return {"phases": phases, "in_force": orders.in_force, "grace": orders.grace,
            "fail_closed": [kill], "lock": limits.lock_path(zone_id)}


class CgroupDeputy:
    """The deputy of one cgroup zone: the agent beside it (`hvtsm.zones.base.ZoneDeputy`)."""

    def __init__(self, handle: ZoneHandle[CgroupZoneState], cgroup: ZoneCgroup,
                 agents: ZoneAgents) -> None:
        self.handle = handle
        self.cgroup = cgroup
        self.agents = agents

    def delegate(self, orders: DeputyOrders) -> None:
        zone_id, state = self.handle.zone_id, self.handle.state
        if orders.thaw and state.frozen:
            # the controller applied what the freeze stood in for; the freezer is its own
            self.cgroup.thaw()
            state.frozen = False
        link = self.agents.link(zone_id)
        if link is None:
            raise ZoneError("the zone's agent is not connected", zone_id=zone_id)
        link.delegate(zone_id, schedule(zone_id, self.cgroup, state, self.handle.applied,
                                        orders), ack=orders.ack)

    def report(self, timeout: float) -> DeputyReport | None:
        link = self.agents.back(self.handle.zone_id, timeout)
        hello = link.hello if link is not None else None
        return None if hello is None else hello.deputy.of(self.handle.zone_id)
