"""Libvirt zones: each zone is a transient QEMU domain, its phases applied live.

The guest boots the lab image (hvtsm/image), its init starts the guest agent, and the
workload runs through the agent (hvtsm/monitor/link/). Boot time is not lifespan: `start`
returns once the agent reports the workload started. The guests themselves (boot, links,
events, teardown) are `guests.py`'s; live tightening `tighten.py`'s; administration through
the agent `admin.py`'s; transient zones (guest cgroups) `transient.py`'s; what the agent
keeps of the schedule while no controller runs (its deputy) `deputy.py`'s.

A guest and a zone are not the same thing: a cold zone is its own guest (named by the zone
id), a zone bound to a pooled guest (`bind`) names the guest in its state, and the guest
outlives it when its workload ends on its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import libvirt

from hvtsm.errors import ZoneError
from hvtsm.host import HostCapabilities
from hvtsm.monitor.anomalies import zone_profile
from hvtsm.monitor.code_path import CodePath
from hvtsm.monitor.link import AgentLink, RemoteWorkload
from hvtsm.restrictions import Restrictions
from hvtsm.zones.base import (
    ApplyReport,
    Backend,
    DriverEvents,
    GuestRelease,
    Workload,
    WorkloadIO,
    ZoneHandle,
    ZoneSpec,
    ZoneStats,
    guest_user,
    narrowed,
)
from hvtsm.zones.libvirt import deputy
from hvtsm.zones.libvirt import guests as guest_names
from hvtsm.zones.libvirt.admin import GuestAdmin
from hvtsm.zones.libvirt.guests import DEFAULT_MEMORY, Guests, domain_name, tap_name
from hvtsm.zones.libvirt.options import LibvirtOptions
from hvtsm.zones.libvirt.standby import MODES as STANDBY_MODES
from hvtsm.zones.libvirt.standby import standby_id, start_note
from hvtsm.zones.libvirt.state import (
    GuestState,
    GuestTransientState,
    GuestZoneState,
    load_state,
)
from hvtsm.zones.libvirt.tighten import Tightener
from hvtsm.zones.libvirt.transient import GuestTransients, TransientGuestWorkload
from hvtsm.zones.libvirt.workload import DomainWorkload, GuestWorkload

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MEMORY", "LibvirtDriver", "LibvirtOptions", "domain_name", "tap_name"]

Handle = ZoneHandle[GuestState]


class LibvirtDriver:
    backend = Backend.LIBVIRT

    def __init__(self, events: DriverEvents, caps: HostCapabilities,
                 options: LibvirtOptions | None = None) -> None:
        self.caps = caps
        self.options = options or LibvirtOptions()
        self.events = events
        #: transient zones: cgroups the guest agent manages (zones/libvirt/transient.py)
        self.transients = GuestTransients()
        self.guests = Guests(caps, self.options, events, on_transient=self.transients.on_event)
        self.admin = GuestAdmin(self.guests)
        self.tightener = Tightener(caps, self.options, self.guests, self.admin, events)
        self.connection = self.guests.connection
        #: the workload each zone's agent runs, for its guest pid
        self._workloads: dict[str, RemoteWorkload] = {}
        #: environments of zones not started yet (never stored: they carry secrets)
        self._envs: dict[str, dict[str, str]] = {}

    def guest_python(self) -> str:
        return self.guests.python()

    def guest_agent_dir(self) -> Any:
        return self.guests.agent_dir()

    # -- lifecycle ----------------------------------------------------------------------------

    def create(self, spec: ZoneSpec, initial: Restrictions) -> Handle:
        zone_id = spec.zone_id
        # a cold zone is its own guest: domain, state dir and tap are named by the zone id
        self.guests.serve(zone_id, zone_id)
        state = self.guests.boot(zone_id, zone_id, spec.net_index, initial,
                                 user=guest_user(spec.user), memory_dump=spec.memory_dump)
        handle: Handle = ZoneHandle(zone_id, self.backend, state, Restrictions())
        try:
            if spec.monitor is not None:
                _require_monitoring(state.agent.get("capabilities", ()), zone_id)
                state.monitor = dict(spec.monitor)
            # the same code path as a later phase: one way to put limits on a guest
            self.tightener.apply(_zone(handle), initial, first=True)
        except BaseException:
            self.guests.teardown(zone_id)
            raise
        self._place(handle, spec)
        return handle

    def start(self, handle: Handle, argv: Sequence[str], io: WorkloadIO) -> Workload:
        state = _zone_state(handle)
        link = self.guests.require_link(state.guest, handle.zone_id)
        # WorkloadIO's None means "inherit", as for a local process: the controller's own
        # stdout/stderr. The link writes output later, on its own thread, so it gets
        # descriptors of its own: the caller may close its copies once we return
        stdout = _own(sys.stdout.fileno() if io.stdout is None else io.stdout)
        stderr = _own(sys.stderr.fileno() if io.stderr is None else io.stderr)
        # a pooled guest's agent outlives links of other processes, whose counters also
        # start at w1: the zone id is the one workload id no earlier exit can carry
        try:
            remote = link.start(
                argv, user=state.user, stdout=stdout, stderr=stderr,
                monitor=None if state.monitor is None else zone_profile(state.monitor,
                                                                        handle.applied),
                workload_id=handle.zone_id if state.bound else None, cwd=state.cwd,
                env=self._envs.pop(handle.zone_id, None), channel=state.channel_name,
                standby=standby_id(state.guest) if state.bound and state.standby else None,
                owned=True)
        except BaseException:
            for fd in (stdout, stderr):
                _close(fd)
            raise
        state.workload = remote.id
        self._workloads[handle.zone_id] = remote
        work = GuestWorkload(remote, self.guests.gone(state.guest))
        work.start_note = start_note(remote.standby)
        return work

    def terminate(self, handle: Handle) -> None:
        transient = narrowed(handle, GuestTransientState)
        if transient is not None:
            self.transients.terminate(_parent_link(self.guests, transient), transient)
            return
        state = _zone_state(handle)
        remote = self._workloads.get(handle.zone_id)
        self._envs.pop(handle.zone_id, None)
        # a dump only when the zone is ended under a running workload (policy, reaction,
        # operator), not when cleaning up after the workload finished
        running = remote is not None and remote.poll() is None
        if state.bound and not running and not state.destroyed:
            # the workload exited on its own: the pooled guest outlives the zone (its pool
            # scrubs or retires it); the zone only lets go of it, and its agent forgets the
            # zone's schedule (a later phase must never cut the next zone's guest)
            self._workloads.pop(handle.zone_id, None)
            deputy.forget(self.guests.link(state.guest), handle.zone_id)
            self.guests.unserve(state.guest, handle.zone_id)
            state.released = True
            return
        if state.bound:
            # ended under a running workload (policy, reaction, operator): the guest goes
            # with the zone, never back to a pool
            self.guests.unserve(state.guest)
            state.destroyed = True
        dumped = self.guests.teardown(state.guest, dump=state.memory_dump and running,
                                      dump_name=handle.zone_id)
        self._workloads.pop(handle.zone_id, None)
        for item in dumped:
            if item.startswith("memory dump"):
                state.dump = item.removeprefix("memory dump ")
                self.events.note(handle.zone_id, "memory-dump", f"guest memory kept in {item}")
        state.nic = False

    def freeze(self, handle: Handle) -> None:
        transient = narrowed(handle, GuestTransientState)
        if transient is not None:
            self.transients.act(_parent_link(self.guests, transient), transient, "freeze")
        else:
            dom = self.guests.domain(_zone_state(handle).domain, handle.zone_id)
            if dom.info()[0] != libvirt.VIR_DOMAIN_PAUSED:
                dom.suspend()
        handle.state.frozen = True

    def thaw(self, handle: Handle) -> None:
        transient = narrowed(handle, GuestTransientState)
        if transient is not None:
            self.transients.act(_parent_link(self.guests, transient), transient, "thaw")
        else:
            dom = self.guests.domain(_zone_state(handle).domain, handle.zone_id)
            if dom.info()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
        handle.state.frozen = False

    def stats(self, handle: Handle) -> ZoneStats:
        transient = narrowed(handle, GuestTransientState)
        if transient is not None:
            return self.transients.stats(_parent_link(self.guests, transient), transient)
        dom = self.guests.domain(_zone_state(handle).domain, handle.zone_id)
        info = dom.info()
        rss = dom.memoryStats().get("rss")
        return ZoneStats(procs=info[3], memory_bytes=None if rss is None else rss * 1024,
                         cpu_usage_ns=info[4], frozen=info[0] == libvirt.VIR_DOMAIN_PAUSED)

    def apply(self, handle: Handle, restrictions: Restrictions) -> ApplyReport:
        transient = narrowed(handle, GuestTransientState)
        if transient is not None:
            return self.transients.apply(_parent_link(self.guests, transient), transient,
                                         restrictions)
        zone = _zone(handle)
        state = zone.state
        remote = self._workloads.get(handle.zone_id)
        changed = restrictions.changes_from(handle.applied)
        report = self.tightener.apply(zone, restrictions,
                                      workload_pid=remote.pid if remote else None)
        if state.monitor is not None and remote is not None and changed:
            # the agent judges connects against the allow-list in force now
            self.guests.require_link(state.guest).update_profile(
                remote.id, zone_profile(state.monitor, restrictions))
        return report

    # -- pooled guests (a warm pool) ----------------------------------------------------------

    def boot_guest(self, guest: str, net_index: int, baseline: Restrictions) -> dict[str, Any]:
        """Boot a guest that serves no zone yet (a warm pool's): `baseline` in force, the
        agent's hello received, no workload. Returns its state for `bind`."""
        state = self.guests.boot(guest, guest, net_index, baseline, user=None,
                                 memory_dump=False)
        state.pooled = True
        handle = ZoneHandle(guest, self.backend, state, Restrictions())
        try:
            self.tightener.apply(handle, baseline, first=True)
        except BaseException:
            self.guests.teardown(guest)
            raise
        state.baseline = baseline.to_json()
        return state.to_json()

    def attach_guest(self, state: Mapping[str, Any], *, timeout: float = 10.0) -> None:
        self.guests.attach(state, timeout=timeout)

    def detach_guest(self, guest: str) -> None:
        self.guests.detach(guest)

    def bind(self, spec: ZoneSpec, initial: Restrictions, state: Mapping[str, Any],
             baseline: Restrictions, *, standby: bool = False) -> Handle:
        """Make zone `spec` in the running pooled guest `state` (from `boot_guest`): its
        link now reports for the zone, and `initial` is applied over the guest's `baseline`
        (only tightening: an unplugged NIC or lowered memory is never given back, so such
        a guest must not serve again). Raises ZoneError; the guest is then unusable."""
        self.guests.attach(state)
        zone_state = load_state(state, str(state["guest"]))
        assert isinstance(zone_state, GuestZoneState)
        zone_state.user, zone_state.memory_dump = guest_user(spec.user), spec.memory_dump
        zone_state.bound, zone_state.standby = True, standby
        handle: Handle = ZoneHandle(spec.zone_id, self.backend, zone_state, baseline)
        self._place(handle, spec)
        if spec.monitor is not None:
            link = self.guests.link(zone_state.guest)
            hello = link.hello if link is not None else None
            _require_monitoring(hello.capabilities if hello else (), spec.zone_id)
            zone_state.monitor = dict(spec.monitor)
        self.guests.serve(zone_state.guest, spec.zone_id)
        try:
            self.apply(handle, initial)
        except BaseException:
            self.guests.unserve(zone_state.guest, spec.zone_id)
            raise
        return handle

    def released(self, handle: ZoneHandle[Any]) -> GuestRelease:
        state = handle.state
        destroyed = not isinstance(state, GuestZoneState) or state.destroyed
        return GuestRelease(destroyed=destroyed,
                            nic_lost=isinstance(state, GuestZoneState) and not state.nic)

    def scrub(self, guest: str, user: str, scratch: str, *, timeout: float = 30.0) -> float:
        return self.admin.scrub(guest, user, scratch, timeout=timeout)

    def prepare_standby(self, guest: str, runtime: str, user: str,
                        monitor: Mapping[str, Any]) -> dict[str, Any] | None:
        """Have the pooled guest's agent start a standby for `runtime` as `user` under
        `monitor` (its filter is fixed from then on): the next zone's start in this guest
        names it. None for a runtime that has no standby; ZoneError when the agent could
        not prepare one (the guest still serves, with normal starts)."""
        if runtime not in STANDBY_MODES:
            return None
        link = self.guests.link(guest)
        if link is None:
            raise ZoneError(f"no agent link to guest {guest}")
        mode, program = STANDBY_MODES[runtime]
        return link.prepare_standby(standby_id(guest), mode=mode, monitor=monitor, user=user,
                                    python=self.guests.python(), program=program)

    def destroy_guest(self, guest: str) -> list[str]:
        """Destroy a pooled guest and everything of it on the host."""
        self.guests.unserve(guest)
        return self.guests.teardown(guest)

    def guest_alive(self, guest: str) -> bool:
        return self.guests.alive(guest)

    # -- transient zones (a cgroup the guest agent manages) -----------------------------------

    def split(self, parent: Handle, spec: ZoneSpec, request: CodePath,
              initial: Restrictions) -> tuple[ZoneHandle[Any], Workload]:
        state = _zone_state(parent)
        return self.transients.split(self.guests.link(state.guest), parent.zone_id, state,
                                     spec, request, initial, self.guests.gone(state.guest))

    def refuse(self, parent: Handle, request: CodePath, reason: str) -> None:
        state = _zone_state(parent)
        self.transients.refuse(self.guests.link(state.guest), parent.zone_id, state, request,
                               reason)

    def channel_link(self, zone_id: str) -> AgentLink | None:
        """The link a zone's channel messages travel on (None: none, or closed)."""
        link = self.guests.link_of_zone(zone_id)
        return link if link is not None and not link.closed else None

    def deputy(self, handle: Handle) -> deputy.GuestDeputy | None:
        zone = narrowed(handle, GuestZoneState)
        if zone is None or zone.state.workload is None:
            return None  # a transient zone's phases are its controller's alone
        return deputy.GuestDeputy(zone, self.guests)

    def agent_link(self, zone_id: str) -> AgentLink | None:
        """The link to a zone's (or a pooled guest's) agent (probes, administration)."""
        return self.guests.link_of_zone(zone_id)

    def close(self) -> None:
        """Nothing outlives the controller here: guests end with their zones or pools."""

    # -- adoption, leftovers -----------------------------------------------------------------

    def adopt(self, zone_id: str, state: Mapping[str, Any],
              applied: Restrictions) -> tuple[Handle, Workload | None]:
        loaded = load_state(state, zone_id)
        handle: Handle = ZoneHandle(zone_id, self.backend, loaded, applied)
        if isinstance(loaded, GuestTransientState):
            # its agent link is its parent's, adopted with it; its end is the agent's
            # "ended" event or the guest's
            gone = self.guests.gone(loaded.domain.removeprefix(guest_names.DOMAIN_PREFIX))
            if gone.is_set():
                return handle, None
            return handle, TransientGuestWorkload(loaded.pid,
                                                  self.transients.ended(zone_id), gone)
        name = domain_name(loaded.guest)
        try:
            active = bool(self.connection.get().lookupByName(name).isActive())
        except libvirt.libvirtError:
            active = False
        if not active:
            return handle, None
        self.guests.watch_domain(name)
        self.guests.serve(loaded.guest, zone_id)
        try:
            # the guest's word over the store's: what a cut done just before the crash left
            self.tightener.reconcile(_zone(handle))
        except (libvirt.libvirtError, ZoneError) as exc:
            log.warning("zone %s: cannot read its guest's devices: %s", zone_id, exc)
        gone = self.guests.gone(loaded.guest)
        try:
            if loaded.channel_path is None or loaded.workload is None:
                raise ZoneError("no agent channel recorded", zone_id=zone_id)
            link = self.guests.connect(loaded.guest, loaded.channel_path, zone_id)
            self.guests.adopt_link(loaded.guest, link)
            remote = link.attach(loaded.workload)
        except ZoneError:
            # no agent to ask: the zone lives as long as its domain does
            return handle, DomainWorkload(gone)
        self._workloads[zone_id] = remote
        return handle, GuestWorkload(remote, gone)

    def leftovers(self) -> set[str]:
        return self.guests.leftovers()

    def resources(self, zone_id: str) -> list[str]:
        return self.guests.teardown(zone_id, plan=True)

    def remove(self, zone_id: str) -> list[str]:
        return self.guests.teardown(zone_id)

    # -- internals ----------------------------------------------------------------------------

    def _place(self, handle: Handle, spec: ZoneSpec) -> None:
        """Where in the guest the workload starts, and its environment (when the spec
        says)."""
        state = _zone_state(handle)
        if spec.cwd is not None:
            state.cwd = spec.cwd
        if spec.env is not None:
            self._envs[handle.zone_id] = dict(spec.env)
        if spec.channel is not None:
            state.channel_name = spec.channel


def _parent_link(guests: Guests, handle: ZoneHandle[GuestTransientState]) -> AgentLink | None:
    return guests.link_of_zone(handle.state.parent)


def _zone(handle: ZoneHandle[Any]) -> ZoneHandle[GuestZoneState]:
    zone = narrowed(handle, GuestZoneState)
    if zone is None:
        raise ZoneError("a transient zone has no guest of its own", zone_id=handle.zone_id)
    return zone


def _zone_state(handle: ZoneHandle[Any]) -> GuestZoneState:
    if not isinstance(handle.state, GuestZoneState):
        raise ZoneError("a transient zone has no guest of its own", zone_id=handle.zone_id)
    return handle.state


def _require_monitoring(capabilities: Sequence[str], zone_id: str) -> None:
    if "monitor:seccomp" not in capabilities:
        raise ZoneError("the guest agent cannot watch system calls (no seccomp "
                        "user notification in the guest kernel)", zone_id=zone_id,
                        hint="use a guest kernel with CONFIG_SECCOMP_FILTER, or "
                        "set monitor = false in the policy's [anomaly]")


def _own(target: int) -> int:
    """A descriptor of the driver's own for an output target (PIPE, DEVNULL and STDOUT,
    all negative, pass as they are)."""
    return target if target < 0 else os.dup(target)


def _close(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
