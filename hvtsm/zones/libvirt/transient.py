"""Transient zones inside a guest: a cgroup the guest agent makes and manages
(guest_agent/tcgroup.py), driven over the agent link with `transient` messages, each
answered by a `transient` event this module waits for. The host cannot reach a guest's
cgroups, so the agent writes them; the held call is released only once the process is in
its cgroup (the agent refuses the call when it could not place it: fail closed).

A transient zone's state names its parent and the guest domain; the libvirt driver sends
every operation on such a handle here instead of to the domain.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from hvtsm.errors import ZoneError
from hvtsm.monitor.anomalies import agent_network
from hvtsm.monitor.code_path import CodePath
from hvtsm.monitor.link import AgentLink
from hvtsm.restrictions import Restrictions
from hvtsm.zones.base import ApplyReport, Backend, ZoneHandle, ZoneSpec, ZoneStats
from hvtsm.zones.libvirt.state import GuestTransientState, GuestZoneState

#: how long an operation's answer may take (a TCG guest is slow)
ACK_TIMEOUT = 15.0


def limits_of(restrictions: Restrictions) -> dict[str, Any]:
    """The `transient.limits` of the wire protocol (a guest's transient cgroup)."""
    return {"memory": restrictions.memory, "pids": restrictions.pids,
            "cpu_quota": restrictions.cpu_quota, "cpu_shares": restrictions.cpu_shares}


class TransientGuestWorkload:
    """The processes of a transient zone in a guest: ended when the agent reports its
    cgroup empty, or when the guest is gone. Their exit status is not known (0)."""

    start_note: str | None = None

    def __init__(self, pid: int, ended: threading.Event, gone: threading.Event) -> None:
        self._pid = pid
        self._ended = ended
        self._gone = gone

    @property
    def pid(self) -> int:
        return self._pid

    def poll(self) -> int | None:
        return 0 if self._ended.is_set() or self._gone.is_set() else None

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (status := self.poll()) is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            self._ended.wait(0.1 if left is None else min(left, 0.1))
        return status

    @property
    def stdout(self) -> Any:
        return None

    @property
    def stderr(self) -> Any:
        return None


class GuestTransients:
    """Acknowledgements of `transient` messages, and the operations that wait for them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[tuple[str, str], tuple[threading.Event, dict[str, Any]]] = {}
        self._ended: dict[str, threading.Event] = {}

    def on_event(self, _parent_id: str, data: dict[str, Any]) -> None:
        """A `transient` event (link reader thread)."""
        zone, op = data.get("zone"), data.get("op")
        if not isinstance(zone, str) or not isinstance(op, str):
            return
        if op == "ended":
            self.ended(zone).set()
            return
        with self._lock:
            waiter = self._waiting.get((zone, op))
        if waiter is not None:
            waiter[1].update(data)
            waiter[0].set()

    def ended(self, zone_id: str) -> threading.Event:
        with self._lock:
            return self._ended.setdefault(zone_id, threading.Event())

    def _call(self, link: AgentLink | None, workload: str, op: str, zone_id: str,
              **fields: Any) -> dict[str, Any]:
        if link is None or link.closed:
            raise ZoneError(f"no agent link to {op} the transient zone", zone_id=zone_id)
        event, answer = threading.Event(), dict[str, Any]()
        with self._lock:
            self._waiting[(zone_id, op)] = (event, answer)
        try:
            link.transient(workload, op, zone=zone_id, **fields)
            if not event.wait(ACK_TIMEOUT):
                raise ZoneError(f"the guest agent did not answer '{op}' within "
                                f"{ACK_TIMEOUT:g} s", zone_id=zone_id)
        finally:
            with self._lock:
                self._waiting.pop((zone_id, op), None)
        if answer.get("ok") is not True:
            raise ZoneError(f"the guest agent could not {op}: "
                            f"{str(answer.get('error'))[:300]}", zone_id=zone_id)
        return answer

    def split(self, link: AgentLink | None, parent_id: str, parent: GuestZoneState,
              spec: ZoneSpec, request: CodePath, initial: Restrictions,
              gone: threading.Event) -> tuple[ZoneHandle[GuestTransientState],
                                              TransientGuestWorkload]:
        workload = request.workload or str(parent.workload)
        answer = self._call(link, workload, "split", spec.zone_id, hold=request.hold,
                            cgroup=spec.zone_id, limits=limits_of(initial),
                            network=agent_network(initial))
        cgroup = answer.get("cgroup")
        state = GuestTransientState(
            parent=parent_id, domain=parent.domain, workload=workload,
            cgroup=cgroup if isinstance(cgroup, str) else None, pid=request.pid,
            user=parent.user, notes=[f"guest cgroup {cgroup}; the call was held "
                                     f"{answer.get('held_ms')} ms"])
        handle = ZoneHandle(spec.zone_id, Backend.LIBVIRT, state, initial)
        return handle, TransientGuestWorkload(request.pid, self.ended(spec.zone_id), gone)

    def refuse(self, link: AgentLink | None, parent_id: str, parent: GuestZoneState,
               request: CodePath, reason: str) -> None:
        if link is None or link.closed:
            raise ZoneError("no agent link: the agent's hold times out and refuses",
                            zone_id=parent_id)
        link.transient(request.workload or str(parent.workload), "deny",
                       hold=request.hold, reason=reason[:500])

    def apply(self, link: AgentLink | None, handle: ZoneHandle[GuestTransientState],
              restrictions: Restrictions) -> ApplyReport:
        changed = restrictions.changes_from(handle.applied)
        answer = self._call(link, handle.state.workload, "update", handle.zone_id,
                            limits=limits_of(restrictions),
                            network=agent_network(restrictions))
        handle.applied = restrictions
        return ApplyReport(changed, tuple(str(s) for s in answer.get("set") or ()))

    def act(self, link: AgentLink | None, handle: ZoneHandle[GuestTransientState],
            op: str) -> dict[str, Any]:
        """kill, freeze, thaw or stats on the zone's guest cgroup."""
        return self._call(link, handle.state.workload, op, handle.zone_id)

    def terminate(self, link: AgentLink | None,
                  handle: ZoneHandle[GuestTransientState]) -> None:
        if self.ended(handle.zone_id).is_set():
            return
        if link is not None and not link.closed:
            self.act(link, handle, "kill")
        # a guest without its agent link is being destroyed with everything in it
        self.ended(handle.zone_id).set()

    def stats(self, link: AgentLink | None,
              handle: ZoneHandle[GuestTransientState]) -> ZoneStats:
        answer = self.act(link, handle, "stats")
        procs, memory = answer.get("procs"), answer.get("memory")
        return ZoneStats(procs=procs if isinstance(procs, int) else 0,
                         memory_bytes=memory if isinstance(memory, int) else None,
                         cpu_usage_ns=None, frozen=handle.state.frozen)
