"""Transient zones of cgroup zones (hvtsm/lifecycle/transient.py): a child cgroup
`hvtsm/<parent>/<id>` that shares its parent's network and mount namespaces and agent.

The driver writes the cgroup itself (it owns the zone's cgroup tree, v1 or v2, limits and
kill) while the agent holds the process's call; the agent only lets the call go on and
judges the zone's connects against its network mode, since in a shared namespace only the
agent can tell its processes apart.
"""

from __future__ import annotations

import contextlib
from typing import Any

from hvtsm.errors import HvtsmError, ZoneError
from hvtsm.host import HostCapabilities
from hvtsm.monitor.anomalies import agent_network
from hvtsm.monitor.code_path import CodePath
from hvtsm.restrictions import FilesystemMode, Restrictions
from hvtsm.zones.base import ApplyReport, Backend, DriverEvents, ZoneHandle, ZoneSpec
from hvtsm.zones.cgroup import cgroupfs, launcher, limits
from hvtsm.zones.cgroup.agents import ZoneAgents
from hvtsm.zones.cgroup.cgroupfs import ZoneCgroup
from hvtsm.zones.cgroup.state import CgroupTransientState


class CgroupTransients:
    def __init__(self, caps: HostCapabilities, agents: ZoneAgents,
                 events: DriverEvents) -> None:
        self.caps = caps
        self.agents = agents
        self.events = events

    def cgroup(self, state: CgroupTransientState, zone_id: str) -> ZoneCgroup:
        return cgroupfs.child_cgroup(self.caps, state.parent, zone_id)

    def split(self, parent_id: str, parent_applied: Restrictions, parent_user: str | None,
              spec: ZoneSpec, request: CodePath,
              initial: Restrictions) -> tuple[ZoneHandle[CgroupTransientState],
                                              launcher.AdoptedWorkload]:
        zone_id = spec.zone_id
        if self.agents.link(parent_id) is None:
            raise ZoneError("the zone's agent is not connected: nobody can release the "
                            "held call", zone_id=parent_id)
        cgroup = cgroupfs.child_cgroup(self.caps, parent_id, zone_id)
        notes: list[str] = []
        try:
            cgroup.create()
            if cgroup.version == 2:
                notes.append("cgroup v2: held to its parent's resource limits (a cgroup "
                             "that holds processes cannot delegate controllers)")
            else:
                limits.write(cgroup, initial)
            # the process is blocked in its exec/connect until the agent answers: moved
            # now, everything it runs or forks from here on is in the transient zone
            cgroup.move(request.pid)
        except BaseException as exc:
            # back where it was (a move may have got through some hierarchies): the caller
            # refuses its call, and the process goes on in its zone without the exec
            with contextlib.suppress(HvtsmError, OSError):
                cgroupfs.zone_cgroup(self.caps, parent_id).move(request.pid)
            with contextlib.suppress(HvtsmError, OSError):
                end(cgroup)
            if isinstance(exc, OSError):
                raise ZoneError(f"cannot make the transient zone's cgroup: {exc}",
                                zone_id=zone_id) from exc
            raise
        if initial.filesystem is FilesystemMode.RO \
                and parent_applied.filesystem is not FilesystemMode.RO:
            notes.append("filesystem ro is not enforced for the subtree alone: it shares "
                         "its parent's mount namespace")
        self.agents.transient(parent_id, "split", hold=request.hold, zone=zone_id,
                              network=agent_network(initial))
        state = CgroupTransientState(parent=parent_id, cgroup_version=cgroup.version,
                                     cgroups=[str(d) for d in cgroup.dirs()], pid=request.pid,
                                     user=parent_user, notes=notes)
        handle = ZoneHandle(zone_id, Backend.CGROUP, state, initial)
        return handle, launcher.AdoptedWorkload(cgroup, request.pid)

    def refuse(self, parent_id: str, request: CodePath, reason: str) -> None:
        try:
            self.agents.transient(parent_id, "deny", hold=request.hold, reason=reason[:500])
        except ZoneError:
            raise ZoneError("the zone's agent is not connected; its hold times out",
                            zone_id=parent_id) from None

    def apply(self, handle: ZoneHandle[CgroupTransientState],
              restrictions: Restrictions) -> ApplyReport:
        old = handle.applied
        changed = restrictions.changes_from(old)
        notes: list[str] = []

        def done(name: str, value: object) -> None:
            handle.applied = handle.applied.with_field(name, value)

        cgroup = self.cgroup(handle.state, handle.zone_id)
        # no deputy writes a transient zone's files: no lock to share
        already = limits.tighten(cgroup, restrictions, old, done, lock=None) \
            if cgroup.version == 1 else []
        network = agent_network(restrictions)
        if network != agent_network(old):
            try:
                self.agents.transient(handle.state.parent, "update", zone=handle.zone_id,
                                      network=network)
            except ZoneError:
                raise ZoneError("the parent's agent is gone: the network cut cannot be "
                                "judged", zone_id=handle.zone_id) from None
            notes.append(f"network {network}: the agent refuses its connects off the host")
        if restrictions.filesystem is not old.filesystem:
            notes.append("filesystem ro is not enforced for the subtree alone")
        handle.applied = restrictions
        return ApplyReport(changed, tuple(notes), tuple(already))

    def on_ack(self, zone_id: str, data: dict[str, Any]) -> None:
        """The agent's answer to a `transient` message. The host placed the process before
        it asked for the release, so only a failure is news (a hold that timed out first:
        the call was refused and the transient zone ends empty)."""
        if data.get("ok") is not True:
            self.events.note(zone_id, "transient-refused",
                             f"the agent could not {str(data.get('op'))[:20]} for transient "
                             f"zone {str(data.get('zone'))[:40]}: "
                             f"{str(data.get('error'))[:300]}")


def end(cgroup: ZoneCgroup) -> list[str]:
    """Kill a transient zone's processes and remove its cgroup."""
    if not cgroup.exists():
        return []
    count = len(cgroup.pids())
    cgroup.kill()
    removed = [f"{count} process(es) killed"] if count else []
    return removed + cgroup.remove()
