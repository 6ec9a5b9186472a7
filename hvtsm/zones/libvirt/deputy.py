"""The libvirt driver's side of a zone's deputy (guest_agent/deputy.py, run by the agent in
the guest): which steps the agent can take itself when a phase falls due and no controller
applied it, and what it freezes instead.

From inside the guest the agent can take its interfaces down (`LinkDown` "*": every one
but the loopback; the controller unplugs the NIC when it returns), the loopback too for
`none` (`LoopbackDown`), remount the root read-only (`RemountReadOnly`), and kill the
workload at the lifespan's end (`KillWorkload`). What only the host can do (CPU shares,
quotas and pinning, the balloon and memtune, the egress allow-list on the tap, RLIMIT_NPROC
the controller sets through the agent too but only with the phase's value) it cannot
apply: it stops the workload's processes instead (`FreezeWorkload`); the controller that
returns applies the real restriction, then has the agent thaw them.
"""

from __future__ import annotations

import contextlib
from typing import Any

from guest_agent.deputy_steps import (
    FreezeWorkload,
    KillWorkload,
    LinkDown,
    LoopbackDown,
    RemountReadOnly,
    Step,
)
from hvtsm.errors import ZoneError
from hvtsm.monitor.deputy import DeputyReport
from hvtsm.monitor.link import AgentLink
from hvtsm.restrictions import FilesystemMode, NetworkMode, Restrictions
from hvtsm.zones.base import DeputyOrders, ZoneHandle
from hvtsm.zones.libvirt.guests import Guests
from hvtsm.zones.libvirt.state import GuestZoneState

#: what the host alone can tighten: a deputy in the guest freezes for these
HOST_ONLY = ("cpus", "cpu_shares", "cpu_quota", "memory", "pids")


def guest_steps(workload: str, applied: Restrictions, target: Restrictions) -> list[Step]:
    """The steps that bring a guest from `applied` (in force now) to `target`, as far as
    its agent can (pure)."""
    steps: list[Step] = []
    if target.network is not NetworkMode.FULL and applied.network is NetworkMode.FULL:
        steps.append(LinkDown(None, "*"))
    if target.network is NetworkMode.NONE and applied.network is not NetworkMode.NONE:
        steps.append(LoopbackDown(None))
    if target.filesystem is FilesystemMode.RO and applied.filesystem is FilesystemMode.RW:
        steps.append(RemountReadOnly(None))
    egress = target.network is NetworkMode.FULL and target.egress != applied.egress
    if egress or any(getattr(target, f) != getattr(applied, f) for f in HOST_ONLY):
        steps.append(FreezeWorkload(workload))
    return steps


def schedule(workload: str, applied: Restrictions, orders: DeputyOrders) -> dict[str, Any]:
    """The ``deputy`` message's fields (without type and id)."""
    kill = KillWorkload(workload).to_dict()
    phases = [{"index": p.index, "due": p.due, "terminate": p.terminate,
               "steps": [kill] if p.terminate else
               [s.to_dict() for s in guest_steps(workload, applied, p.restrictions)]}
              for p in orders.phases]
    return {"phases": phases, "in_force": orders.in_force, "grace": orders.grace,
            "fail_closed": [kill]}


def forget(link: AgentLink | None, zone_id: str) -> None:
    """The zone let go of its (pooled) guest: its agent drops the zone's schedule. A link
    that is gone already took the agent's only host with it: the guest is retired."""
    if link is None or link.closed:
        return
    with contextlib.suppress(ZoneError):
        link.delegate(zone_id, {"phases": []})


class GuestDeputy:
    """The deputy of one guest zone: the agent in the guest (`hvtsm.zones.base.ZoneDeputy`)."""

    def __init__(self, handle: ZoneHandle[GuestZoneState], guests: Guests) -> None:
        self.handle = handle
        self.guests = guests

    def delegate(self, orders: DeputyOrders) -> None:
        state = self.handle.state
        assert state.workload is not None
        link = self.guests.require_link(state.guest, self.handle.zone_id)
        # thawing is the agent's: it stopped the workload's processes itself
        link.delegate(self.handle.zone_id,
                      schedule(state.workload, self.handle.applied, orders),
                      ack=orders.ack, thaw=orders.thaw)

    def report(self, timeout: float) -> DeputyReport | None:
        link = self.guests.link_of_zone(self.handle.zone_id)
        if link is None:
            return None
        try:
            return link.wait_hello(timeout).deputy.of(self.handle.zone_id)
        except ZoneError:
            return None
