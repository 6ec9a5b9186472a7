"""What the cgroup driver keeps about each zone (stored with the zone for adoption)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hvtsm.zones import state as stored
from hvtsm.zones.base import StartFacts

#: version of the layout
STATE_VERSION = 1


@dataclass
class CgroupZoneState:
    """A zone: its cgroups, network namespace and NIC, its first process, its agent."""

    cgroup_version: int
    cgroups: list[str]
    netns: str
    host_if: str
    host_addr: str
    zone_addr: str
    net_index: int
    nic: bool = False
    lo_up: bool = False
    user: str | None = None
    #: the zone's own identity (uid = gid) when its workload runs as ZONE_USER
    uid: int | None = None
    cwd: str | None = None
    pid: int | None = None
    #: the bind mount that keeps the zone's mount namespace reachable
    ns_ref: str | None = None
    frozen: bool = False
    agent_pid: int | None = None
    agent_name: str | None = None
    #: the zone's name in its group when it has a channel
    channel: str | None = None
    #: the policy's part of the agent's profile (None: not watched)
    monitor: dict[str, Any] | None = None
    #: how the workload is kept apart (confine.describe), said with its start
    isolation: str | None = None
    version: int = STATE_VERSION

    def to_json(self) -> dict[str, Any]:
        return stored.dump(self)

    def facts(self) -> StartFacts:
        return StartFacts(notes=(f"isolation: {self.isolation}",) if self.isolation else ())


@dataclass(kw_only=True)
class CgroupTransientState(stored.TransientState):
    """A transient zone: a child cgroup of its parent's, sharing its namespaces and agent."""

    cgroup_version: int
    cgroups: list[str]


CgroupState = CgroupZoneState | CgroupTransientState


def load_state(data: Mapping[str, Any]) -> CgroupState:
    if data.get("parent"):
        return stored.load(CgroupTransientState, data)
    return stored.load(CgroupZoneState, data)
