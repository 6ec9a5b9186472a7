"""The cgroup zone driver: a zone is a cgroup, a network namespace with a veth NIC and a
private mount namespace on this host.

Every resource name derives from the zone id (cgroup `hvtsm/<id>`, netns `hvtsm-<id>`,
veth `hz...`, namespace reference `/run/hvtsm/ns/<id>`), so a zone can be found and
removed from its id alone, even when the controller that made it is gone. The agents
beside the zones are `agents.py`'s, transient zones (child cgroups) `transient.py`'s, the
schedule an agent keeps while no controller runs (its deputy) `deputy.py`'s.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from hvtsm.errors import HvtsmError, ZoneError
from hvtsm.host import HostCapabilities
from hvtsm.monitor import host_agent
from hvtsm.monitor.anomalies import zone_profile
from hvtsm.monitor.code_path import CodePath
from hvtsm.monitor.link import AgentLink
from hvtsm.restrictions import FilesystemMode, NetworkMode, Restrictions
from hvtsm.zones import netslots
from hvtsm.zones.base import (
    ZONE_USER,
    ApplyReport,
    Backend,
    DriverEvents,
    InForce,
    Workload,
    WorkloadIO,
    ZoneHandle,
    ZoneSpec,
    ZoneStats,
    narrowed,
)
from hvtsm.zones.cgroup import (
    cgroupfs,
    confine,
    deputy,
    launcher,
    limits,
    mounts,
    netns,
    nft,
    tripwire,
    view,
)
from hvtsm.zones.cgroup import transient as transient_zones
from hvtsm.zones.cgroup.agents import ZoneAgents
from hvtsm.zones.cgroup.cgroupfs import ZoneCgroup
from hvtsm.zones.cgroup.state import (
    CgroupState,
    CgroupTransientState,
    CgroupZoneState,
    load_state,
)
from hvtsm.zones.identity import Identities

log = logging.getLogger(__name__)

#: ids become path components and interface aliases
_ZONE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

Handle = ZoneHandle[CgroupState]


def _check_id(zone_id: str) -> str:
    if not _ZONE_ID.match(zone_id):
        raise ZoneError(f"{zone_id!r} is not a usable zone id (letters, digits, '_.-', "
                        "at most 64)")
    return zone_id


class CgroupDriver:
    backend = Backend.CGROUP

    def __init__(self, events: DriverEvents, caps: HostCapabilities, *,
                 net_pool: str = "10.213.0.0/16") -> None:
        try:
            pool = ipaddress.IPv4Network(net_pool)
        except ValueError as exc:
            raise ZoneError(f"net pool {net_pool!r} is not an IPv4 network: {exc}") from None
        if pool.prefixlen > 30:
            raise ZoneError(f"net pool {net_pool!r} is too small: zones need a /30 each")
        self.caps = caps
        self.pool = pool
        self.events = events
        self._ip = caps.ip or "ip"
        self._setup_lock = threading.Lock()
        self._nat_ready = False
        self._ref_dir_ready = False
        #: environments for zones not started yet: kept out of the state, which the store
        #: persists, because environments carry secrets
        self._envs: dict[str, dict[str, str]] = {}
        self.identities = Identities()
        self._keep_run = view.keep_run_paths()
        self.transients = transient_zones.CgroupTransients(
            caps, ZoneAgents(events, on_transient=self._on_transient), events)
        self.agents = self.transients.agents

    # -- naming -------------------------------------------------------------------------

    def cgroup(self, zone_id: str) -> ZoneCgroup:
        return cgroupfs.zone_cgroup(self.caps, zone_id)

    def handle_cgroup(self, handle: Handle) -> ZoneCgroup:
        """The cgroup of a zone or of a transient zone."""
        if isinstance(handle.state, CgroupTransientState):
            return self.transients.cgroup(handle.state, handle.zone_id)
        return self.cgroup(handle.zone_id)

    def zone_net(self, zone_id: str, net_index: int) -> netns.ZoneNet:
        return netns.ZoneNet.for_zone(zone_id, net_index, self.pool)

    # -- lifecycle ------------------------------------------------------------------------

    def create(self, spec: ZoneSpec, initial: Restrictions) -> Handle:
        zone_id = _check_id(spec.zone_id)
        cgroup = self.cgroup(zone_id)
        index = spec.net_index
        if initial.network.has_nic:
            index = netslots.reserve(zone_id, spec.net_index, self.pool,
                                      alive=lambda z: netns.netns_path(z).exists())
        net = self.zone_net(zone_id, index)
        state = CgroupZoneState(
            cgroup_version=cgroup.version, cgroups=[str(d) for d in cgroup.dirs()],
            netns=net.netns, host_if=net.host_if, host_addr=str(net.host_addr),
            zone_addr=str(net.zone_addr), net_index=index, user=spec.user, cwd=spec.cwd)
        handle: Handle = ZoneHandle(zone_id, self.backend, state, initial)
        try:
            if spec.user == ZONE_USER:
                state.uid = self.identities.claim(zone_id).uid
            # the agent beside the zone watches it, serves its channel and/or keeps its
            # schedule while no controller runs
            if spec.monitor is not None or spec.channel is not None or spec.deputy:
                agent = self.agents.take(zone_id)
                state.agent_pid, state.agent_name = agent.pid, agent.name
                state.channel = spec.channel
                if spec.monitor is not None:
                    state.monitor = dict(spec.monitor)
            cgroup.create()
            limits.write(cgroup, initial)
            nic = initial.network.has_nic
            netns.create(net, nic=nic, lo_up=initial.network is not NetworkMode.NONE,
                         ip=self._ip)
            if nic and initial.egress is not None:
                nft.set_egress(zone_id, initial.egress, nft=self.caps.nft)
            if nic:
                self._ensure_nat()
        except BaseException as exc:
            with contextlib.suppress(HvtsmError, OSError):
                self._teardown(zone_id)
                confine.release_identity(self.identities, zone_id)
            self.agents.stop(zone_id)
            if isinstance(exc, OSError):
                raise ZoneError(f"cannot create the zone: {exc}", zone_id=zone_id) from exc
            raise
        state.nic = initial.network.has_nic
        state.lo_up = initial.network is not NetworkMode.NONE
        if spec.env is not None:
            self._envs[zone_id] = dict(spec.env)
        return handle

    def _zone_state(self, handle: Handle) -> CgroupZoneState:
        if not isinstance(handle.state, CgroupZoneState):
            raise ZoneError("a transient zone has no workload of its own to start",
                            zone_id=handle.zone_id)
        return handle.state

    def start(self, handle: Handle, argv: Sequence[str], io: WorkloadIO) -> Workload:
        zone_id = handle.zone_id
        state = self._zone_state(handle)
        if not argv:
            raise ZoneError("no command to run", zone_id=zone_id)
        if state.pid is not None:
            raise ZoneError("the zone already runs a workload", zone_id=zone_id)
        cgroup = self.cgroup(zone_id)
        procs_files = tuple(str(p) for p in cgroup.procs_files())
        user = confine.workload_user(zone_id, state)
        readonly = handle.applied.filesystem is FilesystemMode.RO
        wire = tripwire.make(zone_id) if state.monitor is not None else None
        seen = confine.zone_view(handle.applied, state, argv, user, readonly,
                                 keep_run=self._keep_run, wire=wire)
        if state.monitor is not None and seen.covered:
            # the agent marks it for as long as the zone is watched (every profile after)
            state.monitor = {**state.monitor, "tripwires": [str(wire)]}
        entry = launcher.Entry(
            zone_id=zone_id,
            procs_files=procs_files,
            netns_path=str(netns.netns_path(zone_id)),
            readonly=readonly,
            user=user,
            watch=self.agents.watch(zone_id, state, handle.applied, procs_files[0],
                                    cgroup.oom_file()),
            view=seen,
        )
        env: Mapping[str, str] | None = self._envs.pop(zone_id, None)
        if state.channel is not None:
            env = self.agents.open_channel(zone_id, state.channel, env)
        try:
            workload = launcher.spawn(entry, argv, io, env=env, cwd=state.cwd,
                                      barrier=lambda: self.agents.flush(zone_id))
        finally:
            self.agents.handed_over(zone_id)
        # what the agent said while taking the workload over (that it watches) is the
        # zone's making, told with its start: wait until it has been delivered
        self.agents.flush(zone_id)
        state.pid = workload.pid
        # a failure here fails the start: whoever started it ends the zone
        confine.verify(workload.pid, user, zone_id)
        state.isolation = confine.describe(seen, user)
        state.ns_ref = self._pin_mount_ns(zone_id, workload.pid)
        return workload

    def channel_link(self, zone_id: str) -> AgentLink | None:
        return self.agents.link(zone_id)

    def deputy(self, handle: Handle) -> deputy.CgroupDeputy | None:
        zone = narrowed(handle, CgroupZoneState)
        if zone is None or zone.state.agent_pid is None:
            return None  # a transient zone's phases are its controller's alone
        return deputy.CgroupDeputy(zone, self.cgroup(handle.zone_id), self.agents)

    def close(self) -> None:
        self.agents.close()

    def _pin_mount_ns(self, zone_id: str, pid: int) -> str | None:
        """Keep the zone's mount namespace reachable for a later read-only switch even
        after its first process exits. Without the pin, that switch still finds the
        namespace through any live zone process, so a failure here only gets logged."""
        try:
            self._ensure_ref_dir()
            ref = mounts.bind_ns_ref(pid, zone_id)
        except (ZoneError, OSError) as exc:
            log.warning("zone %s: cannot pin its mount namespace: %s", zone_id, exc)
            return None
        return None if ref is None else str(ref)

    def terminate(self, handle: Handle) -> None:
        state = handle.state
        if isinstance(state, CgroupTransientState):
            transient_zones.end(self.handle_cgroup(handle))
            return
        self._envs.pop(handle.zone_id, None)
        try:
            self._teardown(handle.zone_id)
            # only now: nothing of the zone runs any more, and its scratch went with it
            confine.release_identity(self.identities, handle.zone_id)
        finally:
            self.agents.stop(handle.zone_id)
        state.frozen = state.nic = state.lo_up = False
        state.ns_ref = None

    def _teardown(self, zone_id: str, *, plan: bool = False) -> list[str]:
        """Kill and remove whatever of the zone exists; every step runs even when an
        earlier one failed, and only real failures (not absence) raise. With `plan`,
        nothing is changed: the list says what would be removed."""
        removed: list[str] = []
        errors: list[str] = []
        cgroup = self.cgroup(zone_id)

        def step(action: Callable[[], list[str]], would: Callable[[], list[str]]) -> None:
            try:
                removed.extend(would() if plan else action())
            except (HvtsmError, OSError) as exc:
                errors.append(str(exc).removeprefix(f"zone {zone_id}: "))

        for child in sorted(cgroupfs.children(self.caps, zone_id)):
            # transient zones first: a cgroup with children cannot be removed
            sub = cgroupfs.child_cgroup(self.caps, zone_id, child)
            step(partial(transient_zones.end, sub), partial(_cgroup_would, sub))
        if cgroup.exists():
            step(lambda: _kill(cgroup), lambda: _procs_would(cgroup))
            step(cgroup.remove, lambda: [f"cgroup {d}" for d in cgroup.dirs() if d.exists()])
        step(lambda: netns.destroy(zone_id, ip=self._ip), lambda: netns.would_destroy(zone_id))
        step(lambda: netslots.release(zone_id), lambda: netslots.held(zone_id))
        step(lambda: mounts.drop_ns_ref(zone_id), lambda: mounts.would_drop_ns_ref(zone_id))
        step(lambda: limits.drop_lock(zone_id), lambda: limits.would_drop_lock(zone_id))
        step(lambda: tripwire.remove(zone_id), lambda: tripwire.would_remove(zone_id))
        if plan:
            removed.extend(f"zone identity {uid}" for uid, owner
                           in self.identities.claimed().items() if owner == zone_id)
        if errors:
            raise ZoneError("; ".join(errors), zone_id=zone_id)
        return removed

    # -- tightening -----------------------------------------------------------------------

    def apply(self, handle: Handle, restrictions: Restrictions) -> ApplyReport:
        transient = narrowed(handle, CgroupTransientState)
        if transient is not None:
            return self.transients.apply(transient, restrictions)
        state = self._zone_state(handle)
        old = handle.applied
        changed = restrictions.changes_from(old)
        notes: list[str] = []
        already: list[InForce] = []

        def done(name: str, value: object) -> None:
            handle.applied = handle.applied.with_field(name, value)

        # the network first: cutting it is what a tightening most often exists for
        if (restrictions.network, restrictions.egress) != (old.network, old.egress):
            notes += self._apply_network(handle.zone_id, state, old, restrictions, already)
            done("network", restrictions.network)
            done("egress", restrictions.egress)
        if restrictions.filesystem is not old.filesystem:
            notes += self._apply_filesystem(handle, restrictions.filesystem, already)
            done("filesystem", restrictions.filesystem)
        # only lower, under the zone's lock (the deputy's too): a value the deputy lowered
        # already is in force, never raised by a controller that comes late
        already += limits.tighten(self.cgroup(handle.zone_id), restrictions, old, done,
                                  lock=limits.lock_path(handle.zone_id))
        if state.monitor is not None and changed:
            # the agent judges connects against the allow-list in force now
            self.agents.update(handle.zone_id, zone_profile(state.monitor, handle.applied))
        return ApplyReport(changed, tuple(notes), tuple(already))

    def _apply_network(self, zone_id: str, state: CgroupZoneState, old: Restrictions,
                       new: Restrictions, already: list[InForce]) -> list[str]:
        if new.network.rank() < old.network.rank():
            raise ZoneError(f"cannot loosen the network from '{old.network}' to "
                            f"'{new.network}'", zone_id=zone_id)
        if new.network is NetworkMode.FULL:
            if new.egress is None:
                nft.drop_egress(zone_id, nft=self.caps.nft)
                return ["egress allow-list removed"]
            # one transaction replacing the table whatever it holds: applying it again
            # leaves the same rules
            nft.set_egress(zone_id, new.egress, nft=self.caps.nft)
            return [f"egress allow-list in force: {len(new.egress)} destination(s)"]
        lo_down = new.network is NetworkMode.NONE
        # the kernel's word, not the stored state's: a cut done before a crash is in force
        found = netns.tighten(zone_id, lo_down=lo_down, ip=self._ip)
        notes = []
        # in force already: what the recorded restrictions say is still to be done
        if found.nic:
            notes.append(f"NIC unplugged (veth {state.host_if} deleted)")
        elif old.network.has_nic:
            already.append(InForce("network", "NIC absent"))
        if lo_down and (found.lo_up or found.lo_addressed):
            notes.append("loopback down")
        elif lo_down and old.network is not NetworkMode.NONE:
            already.append(InForce("network", "loopback down"))
        state.nic = False
        state.lo_up = state.lo_up and not lo_down
        return notes

    def _apply_filesystem(self, handle: Handle, mode: FilesystemMode,
                          already: list[InForce]) -> list[str]:
        if mode is FilesystemMode.RW:
            raise ZoneError("cannot make a read-only zone writable again",
                            zone_id=handle.zone_id)
        state = self._zone_state(handle)
        if state.pid is None:
            return ["read-only from the workload's start"]
        namespaces = self._mount_namespaces(handle.zone_id, state)
        if not namespaces:
            return ["no process left in the zone to remount for"]
        # a namespace whose every mount is read-only already (a switch done before a
        # crash) is left alone; one no zone process shows is remounted, which read-only
        # mounts take without harm
        writable = [path for path, mountinfo in namespaces.items()
                    if mountinfo is None or not mounts.all_readonly(mountinfo)]
        if not writable:
            already.append(InForce("filesystem", "every mount read-only in "
                                   f"{len(namespaces)} mount namespace(s)"))
            return []
        total = sum(launcher.remount_readonly_live(path, handle.zone_id)
                    for path in writable)
        return [f"{total} mount(s) remounted read-only in {len(writable)} mount "
                "namespace(s)"]

    def _mount_namespaces(self, zone_id: str,
                          state: CgroupZoneState) -> dict[str, str | None]:
        """One path per distinct mount namespace of the zone (the reference taken at
        start, plus any namespace a zone process made for itself since), each with the
        mountinfo of a zone process in it (None: no zone process shows it)."""
        host = os.stat("/proc/self/ns/mnt").st_ino
        seen: dict[int, str] = {}
        shown: dict[int, str] = {}
        candidates: list[tuple[str | None, str | None]] = [(state.ns_ref, None)]
        candidates += [(f"/proc/{pid}/ns/mnt", f"/proc/{pid}/mountinfo")
                       for pid in sorted(self.cgroup(zone_id).pids())]
        for path, mountinfo in candidates:
            if not path:
                continue
            try:
                inode = os.stat(path).st_ino
            except OSError:
                continue
            if inode != host:
                seen.setdefault(inode, path)
                if mountinfo is not None:
                    shown.setdefault(inode, mountinfo)
        return {path: shown.get(inode) for inode, path in seen.items()}

    # -- freezing and statistics ----------------------------------------------------------

    def freeze(self, handle: Handle) -> None:
        self.handle_cgroup(handle).freeze()
        handle.state.frozen = True

    def thaw(self, handle: Handle) -> None:
        self.handle_cgroup(handle).thaw()
        handle.state.frozen = False

    def stats(self, handle: Handle) -> ZoneStats:
        cgroup = self.handle_cgroup(handle)
        return ZoneStats(procs=len(cgroup.pids()), memory_bytes=cgroup.memory_usage(),
                         cpu_usage_ns=cgroup.cpu_usage_ns(), frozen=cgroup.frozen())

    # -- after a controller restart -------------------------------------------------------

    def adopt(self, zone_id: str, state: Mapping[str, Any],
              applied: Restrictions) -> tuple[Handle, Workload | None]:
        _check_id(zone_id)
        handle: Handle = ZoneHandle(zone_id, self.backend, load_state(state), applied)
        cgroup = self.handle_cgroup(handle)
        zone_state = handle.state
        if isinstance(zone_state, CgroupZoneState):
            # even an empty zone's: its deputy may have ended it, and says when
            self.agents.reattach(zone_id, zone_state)
        pids = cgroup.pids()
        if not pids:
            return handle, None
        if isinstance(zone_state, CgroupTransientState):
            # its processes are watched by its parent's agent, adopted with the parent
            return handle, launcher.AdoptedWorkload(cgroup, min(pids))
        pid = zone_state.pid if zone_state.pid in pids else min(pids)
        zone_state.frozen = cgroup.frozen()
        self._read_network(zone_id, zone_state)
        return handle, launcher.AdoptedWorkload(cgroup, pid)

    def _read_network(self, zone_id: str, state: CgroupZoneState) -> None:
        """The NIC and loopback as the kernel has them: the store is behind when the
        controller died between a cut and its record (the overdue phase then finds the
        cut in force). Only ever tighter than what was stored: a NIC or loopback back in
        the namespace would be a stranger's, and the next cut removes it all the same."""
        try:
            found = netns.present(zone_id, ip=self._ip)
        except ZoneError as exc:
            log.warning("zone %s: cannot read its network namespace: %s", zone_id, exc)
            return
        # the lifecycle audits what changed against the stored state (its "adopted" event)
        state.nic = state.nic and found.nic
        state.lo_up = state.lo_up and found.lo_up

    def leftovers(self) -> set[str]:
        claims = {z for z in self.identities.claimed().values() if _ZONE_ID.match(z)}
        return (cgroupfs.zone_ids(self.caps) | netns.zone_ids() | mounts.ref_zone_ids() | claims
                | {z for z in limits.locked_zone_ids() if _ZONE_ID.match(z)}
                | {z for z in tripwire.zone_ids() if _ZONE_ID.match(z)}
                | {z for z in host_agent.recorded_zones() if _ZONE_ID.match(z)}
                | set(cgroupfs.transient_ids(self.caps)))

    def resources(self, zone_id: str) -> list[str]:
        parent = cgroupfs.transient_ids(self.caps).get(_check_id(zone_id))
        if parent is not None:
            return _cgroup_would(cgroupfs.child_cgroup(self.caps, parent, zone_id))
        return self._teardown(zone_id, plan=True) + host_agent.would_stop_orphan(zone_id)

    def remove(self, zone_id: str) -> list[str]:
        parent = cgroupfs.transient_ids(self.caps).get(_check_id(zone_id))
        if parent is not None:
            return transient_zones.end(cgroupfs.child_cgroup(self.caps, parent, zone_id))
        removed = self._teardown(_check_id(zone_id))
        removed += confine.release_identity(self.identities, zone_id)
        self.agents.stop(zone_id)
        host_agent.sweep_spares()
        return removed + host_agent.stop_orphan(zone_id)

    # -- transient zones ------------------------------------------------------------------

    def split(self, parent: Handle, spec: ZoneSpec, request: CodePath,
              initial: Restrictions) -> tuple[ZoneHandle[Any], Workload]:
        _check_id(spec.zone_id)
        return self.transients.split(parent.zone_id, parent.applied, parent.state.user, spec,
                                     request, initial)

    def refuse(self, parent: Handle, request: CodePath, reason: str) -> None:
        self.transients.refuse(parent.zone_id, request, reason)

    def _on_transient(self, zone_id: str, data: dict[str, Any]) -> None:
        self.transients.on_ack(zone_id, data)

    # -- shared host setup ----------------------------------------------------------------

    def _ensure_nat(self) -> None:
        if self._nat_ready or not (self.caps.ip_forward and self.caps.nft):
            return
        with self._setup_lock:
            if not self._nat_ready:
                nft.ensure_nat(self.pool, nft=self.caps.nft)
                self._nat_ready = True

    def _ensure_ref_dir(self) -> None:
        if self._ref_dir_ready:
            return
        with self._setup_lock:
            if not self._ref_dir_ready:
                try:
                    mounts.prepare_ref_dir()
                except OSError as exc:
                    raise ZoneError(f"cannot prepare {mounts.NS_REF_DIR}: {exc}") from exc
                self._ref_dir_ready = True


def _kill(cgroup: ZoneCgroup) -> list[str]:
    count = len(cgroup.pids())
    cgroup.kill()
    return [f"{count} process(es) killed"] if count else []


def _procs_would(cgroup: ZoneCgroup) -> list[str]:
    count = len(cgroup.pids())
    return [f"{count} process(es) killed"] if count else []


def _cgroup_would(cgroup: ZoneCgroup) -> list[str]:
    if not cgroup.exists():
        return []
    return _procs_would(cgroup) + [f"cgroup {d}" for d in cgroup.dirs() if d.exists()]
