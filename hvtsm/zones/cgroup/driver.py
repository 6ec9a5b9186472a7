"""The cgroup zone driver: a zone is a cgroup, a network namespace with a veth NIC and a
private mount namespace on this host.

Every resource name derives from the zone id (cgroup `hvtsm/<id>`, netns `hvtsm-<id>`,
veth `hz...`, namespace reference `/run/hvtsm/ns/<id>`), so a zone can be found and
removed from its id alone, even when the controller that made it is gone.

A transient zone (hvtsm/transient.py) is only a child cgroup `hvtsm/<parent>/<id>`: it
shares its parent's network and mount namespaces and agent. The driver writes the cgroup
itself (it owns the zone's cgroup tree, v1 or v2, limits and kill) while the agent holds the
process's call; the agent only lets the call go on and judges the zone's connects against
its network mode, since in a shared namespace only the agent can tell its processes apart.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from guest_agent.profile import Profile, ProfileError
from guest_agent.protocol import CHANNEL_ADDRESS, CHANNEL_ENV, CHANNEL_NAME_ENV
from guest_agent.seccomp import Installer
from hvtsm.agent_stage import stage_agent
from hvtsm.errors import HvtsmError, ZoneError
from hvtsm.host import HostCapabilities
from hvtsm.monitor import host_agent
from hvtsm.monitor.anomalies import zone_profile
from hvtsm.monitor.code_path import CodePath
from hvtsm.monitor.events import HookedDriver, MonitorHooks
from hvtsm.monitor.host_agent import HostAgent
from hvtsm.monitor.link import AgentLink
from hvtsm.restrictions import FilesystemMode, NetworkMode, Restrictions
from hvtsm.transient import agent_network
from hvtsm.zones import netslots
from hvtsm.zones.base import (
    ApplyReport,
    Backend,
    Workload,
    WorkloadIO,
    ZoneHandle,
    ZoneSpec,
    ZoneStats,
)
from hvtsm.zones.cgroup import cgroupfs, launcher, mounts, netns, nft
from hvtsm.zones.cgroup.cgroupfs import ZoneCgroup

log = logging.getLogger(__name__)

#: ids become path components and interface aliases
_ZONE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: version of the layout of handle.state
STATE_VERSION = 1


def _check_id(zone_id: str) -> str:
    if not _ZONE_ID.match(zone_id):
        raise ZoneError(f"{zone_id!r} is not a usable zone id (letters, digits, '_.-', "
                        "at most 64)")
    return zone_id


class CgroupDriver(HookedDriver):
    backend = Backend.CGROUP

    def __init__(self, caps: HostCapabilities, *, net_pool: str = "10.213.0.0/16") -> None:
        try:
            pool = ipaddress.IPv4Network(net_pool)
        except ValueError as exc:
            raise ZoneError(f"net pool {net_pool!r} is not an IPv4 network: {exc}") from None
        if pool.prefixlen > 30:
            raise ZoneError(f"net pool {net_pool!r} is too small: zones need a /30 each")
        self.caps = caps
        self.pool = pool
        self._ip = caps.ip or "ip"
        self._setup_lock = threading.Lock()
        self._nat_ready = False
        self._ref_dir_ready = False
        #: environments for zones not started yet: kept out of handle.state, which the
        #: store persists, because environments carry secrets
        self._envs: dict[str, dict[str, str]] = {}
        self.hooks = MonitorHooks()
        self.hooks.transient = self._on_transient_ack
        #: the agent beside each monitored zone
        self._agents: dict[str, HostAgent] = {}
        #: an agent started ahead for the next zone (its start-up is Python's ~140 ms)
        self._spare: HostAgent | None = None
        self._spare_lock = threading.Lock()
        self._swept = False

    # -- naming -------------------------------------------------------------------------

    def cgroup(self, zone_id: str) -> ZoneCgroup:
        return cgroupfs.zone_cgroup(self.caps, zone_id)

    def handle_cgroup(self, handle: ZoneHandle) -> ZoneCgroup:
        """The cgroup of a zone or of a transient zone."""
        parent = handle.state.get("parent")
        if isinstance(parent, str):
            return cgroupfs.child_cgroup(self.caps, parent, handle.zone_id)
        return self.cgroup(handle.zone_id)

    def zone_net(self, zone_id: str, net_index: int) -> netns.ZoneNet:
        return netns.ZoneNet.for_zone(zone_id, net_index, self.pool)

    # -- lifecycle ------------------------------------------------------------------------

    def create(self, spec: ZoneSpec, initial: Restrictions) -> ZoneHandle:
        zone_id = _check_id(spec.zone_id)
        cgroup = self.cgroup(zone_id)
        index = spec.net_index
        if initial.network.has_nic:
            index = netslots.reserve(zone_id, spec.net_index, self.pool,
                                      alive=lambda z: netns.netns_path(z).exists())
        net = self.zone_net(zone_id, index)
        handle = ZoneHandle(zone_id, self.backend, self._initial_state(spec, cgroup, net, index),
                            initial)
        try:
            # the agent beside the zone watches it and/or serves its channel
            if spec.monitor is not None or spec.channel is not None:
                agent = self._take_agent()
                agent.assign(zone_id)
                self._agents[zone_id] = agent
                handle.state.update(agent_pid=agent.pid, agent_name=agent.name,
                                    channel=spec.channel)
                if spec.monitor is not None:
                    handle.state["monitor"] = dict(spec.monitor)
            cgroup.create()
            self._set_limits(cgroup, initial, Restrictions(), lambda _name, _value: None)
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
            self._stop_agent(zone_id)
            if isinstance(exc, OSError):
                raise ZoneError(f"cannot create the zone: {exc}", zone_id=zone_id) from exc
            raise
        handle.state.update(nic=initial.network.has_nic,
                            lo_up=initial.network is not NetworkMode.NONE)
        if spec.env is not None:
            self._envs[zone_id] = dict(spec.env)
        return handle

    def _initial_state(self, spec: ZoneSpec, cgroup: ZoneCgroup, net: netns.ZoneNet,
                       net_index: int) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "cgroup_version": cgroup.version,
            "cgroups": [str(d) for d in cgroup.dirs()],
            "netns": net.netns,
            "host_if": net.host_if,
            "host_addr": str(net.host_addr),
            "zone_addr": str(net.zone_addr),
            "net_index": net_index,
            "nic": False,
            "lo_up": False,
            "user": spec.user,
            "cwd": spec.cwd,
            "pid": None,
            "ns_ref": None,
            "frozen": False,
        }

    def start(self, handle: ZoneHandle, argv: Sequence[str], io: WorkloadIO) -> Workload:
        zone_id = handle.zone_id
        if not argv:
            raise ZoneError("no command to run", zone_id=zone_id)
        if handle.state.get("pid") is not None:
            raise ZoneError("the zone already runs a workload", zone_id=zone_id)
        user = handle.state.get("user")
        cgroup = self.cgroup(zone_id)
        procs_files = tuple(str(p) for p in cgroup.procs_files())
        entry = launcher.Entry(
            zone_id=zone_id,
            procs_files=procs_files,
            netns_path=str(netns.netns_path(zone_id)),
            readonly=handle.applied.filesystem is FilesystemMode.RO,
            user=None if user is None else launcher.UserInfo.lookup(user, zone_id),
            watch=self._watch(handle, procs_files[0], cgroup.oom_file()),
        )
        env = self._envs.pop(zone_id, None)
        if handle.state.get("channel") is not None:
            env = self._open_channel(handle, env)
        try:
            workload = launcher.spawn(entry, argv, io, env=env, cwd=handle.state.get("cwd"))
        finally:
            agent = self._agents.get(zone_id)
            if agent is not None:
                agent.handed_over()
        handle.state["pid"] = workload.pid
        handle.state["ns_ref"] = self._pin_mount_ns(zone_id, workload.pid)
        return workload

    def _watch(self, handle: ZoneHandle, procs_file: str,
               oom_file: str | None) -> launcher.Watch | None:
        """Connect to the zone's agent and prepare the hand-over of the workload to it."""
        agent = self._agents.get(handle.zone_id)
        static = handle.state.get("monitor")
        if agent is None or static is None:
            return None
        on_problem, on_event = self.hooks.handlers(handle.zone_id)
        agent.connect(on_problem=on_problem, on_event=on_event)
        profile = zone_profile(static, handle.applied)
        try:
            installer = Installer(Profile.from_dict(profile))
        except ProfileError as exc:
            raise ZoneError(f"the monitoring profile is unusable: {exc}",
                            zone_id=handle.zone_id) from exc
        assert agent.hand_over is not None
        return launcher.Watch(installer, agent.hand_over.fileno(),
                              agent.watch_header(profile, procs_file=procs_file,
                                                 oom_file=oom_file))

    def _open_channel(self, handle: ZoneHandle,
                      env: dict[str, str] | None) -> dict[str, str]:
        """Bind the zone's channel socket in its network namespace, hand it to the zone's
        agent, and return the workload's environment naming it."""
        zone_id, name = handle.zone_id, str(handle.state["channel"])
        agent = self._agents.get(zone_id)
        if agent is None:
            raise ZoneError("the zone has no agent to serve its channel", zone_id=zone_id)
        if agent.link is None:  # not watched: connect for the channel alone
            on_problem, on_event = self.hooks.handlers(zone_id)
            agent.connect(on_problem=on_problem, on_event=on_event)
        assert agent.link is not None
        agent.link.on_channel = self.hooks.channel_handler(zone_id)
        listener = launcher.channel_listener(str(netns.netns_path(zone_id)), zone_id)
        try:
            agent.give_channel(listener, name)
        finally:
            listener.close()  # the agent holds its own copy now
        out = dict(os.environ if env is None else env)
        source = str(stage_agent())  # a copy the zone's unprivileged user can read
        out["PYTHONPATH"] = source + (":" + out["PYTHONPATH"] if out.get("PYTHONPATH") else "")
        out[CHANNEL_ENV] = "unix:@" + CHANNEL_ADDRESS
        out[CHANNEL_NAME_ENV] = name
        return out

    def channel_link(self, zone_id: str) -> AgentLink | None:
        """The link a zone's channel messages travel on (None: none, or closed)."""
        agent = self._agents.get(zone_id)
        link = agent.link if agent is not None else None
        return link if link is not None and not link.closed else None

    def _take_agent(self) -> HostAgent:
        """The spare (started ahead), else a new agent; either way a new spare is started
        for the zone after this one."""
        with self._spare_lock:
            if not self._swept:
                host_agent.sweep_spares()
                self._swept = True
            agent, self._spare = self._spare, None
            if agent is not None and not agent.usable():
                agent.stop()
                agent = None
            if agent is None:
                agent = HostAgent.launch(f"agent-{os.getpid()}-{secrets.token_hex(4)}")
            with contextlib.suppress(ZoneError):
                self._spare = HostAgent.launch(f"agent-{os.getpid()}-{secrets.token_hex(4)}")
        return agent

    def close(self) -> None:
        """The controller is done with this driver: its spare agent goes."""
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.stop()

    def _stop_agent(self, zone_id: str) -> None:
        agent = self._agents.pop(zone_id, None)
        if agent is not None:
            agent.stop()

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

    def terminate(self, handle: ZoneHandle) -> None:
        if handle.state.get("parent"):
            self._end_transient(self.handle_cgroup(handle))
            return
        self._envs.pop(handle.zone_id, None)
        try:
            self._teardown(handle.zone_id)
        finally:
            self._stop_agent(handle.zone_id)
        handle.state.update(frozen=False, nic=False, lo_up=False, ns_ref=None)

    def _teardown(self, zone_id: str) -> list[str]:
        """Kill and remove whatever of the zone exists; every step runs even when an
        earlier one failed, and only real failures (not absence) raise."""
        removed: list[str] = []
        errors: list[str] = []
        cgroup = self.cgroup(zone_id)

        def step(action: Callable[[], list[str]]) -> None:
            try:
                removed.extend(action())
            except (HvtsmError, OSError) as exc:
                errors.append(str(exc).removeprefix(f"zone {zone_id}: "))

        for child in sorted(cgroupfs.children(self.caps, zone_id)):
            # transient zones first: a cgroup with children cannot be removed
            step(lambda c=child: self._end_transient(cgroupfs.child_cgroup(self.caps,
                                                                           zone_id, c)))
        if cgroup.exists():
            def kill() -> list[str]:
                count = len(cgroup.pids())
                cgroup.kill()
                return [f"{count} process(es) killed"] if count else []
            step(kill)
            step(cgroup.remove)
        step(lambda: netns.destroy(zone_id, ip=self._ip))
        step(lambda: netslots.release(zone_id))
        step(lambda: mounts.drop_ns_ref(zone_id))
        if errors:
            raise ZoneError("; ".join(errors), zone_id=zone_id)
        return removed

    # -- tightening -----------------------------------------------------------------------

    def apply(self, handle: ZoneHandle, restrictions: Restrictions) -> ApplyReport:
        if handle.state.get("parent"):
            return self._apply_transient(handle, restrictions)
        old = handle.applied
        changed = restrictions.changes_from(old)
        notes: list[str] = []

        def done(name: str, value: object) -> None:
            handle.applied = replace(handle.applied, **{name: value})

        # the network first: cutting it is what a tightening most often exists for
        if (restrictions.network, restrictions.egress) != (old.network, old.egress):
            notes += self._apply_network(handle, old, restrictions)
            done("network", restrictions.network)
            done("egress", restrictions.egress)
        if restrictions.filesystem is not old.filesystem:
            notes += self._apply_filesystem(handle, restrictions.filesystem)
            done("filesystem", restrictions.filesystem)
        self._set_limits(self.cgroup(handle.zone_id), restrictions, old, done)
        agent = self._agents.get(handle.zone_id)
        static = handle.state.get("monitor")
        if agent is not None and static is not None and changed:
            # the agent judges connects against the allow-list in force now
            agent.update(zone_profile(static, handle.applied))
        return ApplyReport(changed, tuple(notes))

    def _set_limits(self, cgroup: ZoneCgroup, new: Restrictions, old: Restrictions,
                    done: Callable[[str, object], None]) -> None:
        # memory last: lowering it is the one change that may fail (and end the zone)
        setters: list[tuple[str, Callable[[Any], None]]] = [
            ("cpus", cgroup.set_cpus),
            ("cpu_shares", cgroup.set_cpu_shares),
            ("cpu_quota", cgroup.set_cpu_quota),
            ("pids", cgroup.set_pids),
            ("memory", cgroup.set_memory),
        ]
        for name, setter in setters:
            value = getattr(new, name)
            if value != getattr(old, name):
                setter(value)
                done(name, value)

    def _apply_network(self, handle: ZoneHandle, old: Restrictions,
                       new: Restrictions) -> list[str]:
        zone_id, state = handle.zone_id, handle.state
        if new.network.rank() < old.network.rank():
            raise ZoneError(f"cannot loosen the network from '{old.network}' to "
                            f"'{new.network}'", zone_id=zone_id)
        if new.network is NetworkMode.FULL:
            if new.egress is None:
                nft.run_in_netns(zone_id, [self.caps.nft or "nft", "delete", "table", "inet",
                                           nft.EGRESS_TABLE])
                return ["egress allow-list removed"]
            nft.set_egress(zone_id, new.egress, nft=self.caps.nft)
            return [f"egress allow-list in force: {len(new.egress)} destination(s)"]
        remove_nic = bool(state.get("nic"))
        lo_down = new.network is NetworkMode.NONE and bool(state.get("lo_up"))
        netns.tighten(zone_id, remove_nic=remove_nic, lo_down=lo_down, ip=self._ip)
        notes = []
        if remove_nic:
            state["nic"] = False
            notes.append(f"NIC unplugged (veth {state.get('host_if')} deleted)")
        if lo_down:
            state["lo_up"] = False
            notes.append("loopback down")
        return notes

    def _apply_filesystem(self, handle: ZoneHandle, mode: FilesystemMode) -> list[str]:
        if mode is FilesystemMode.RW:
            raise ZoneError("cannot make a read-only zone writable again",
                            zone_id=handle.zone_id)
        if handle.state.get("pid") is None:
            return ["read-only from the workload's start"]
        namespaces = self._mount_namespaces(handle)
        if not namespaces:
            return ["no process left in the zone to remount for"]
        total = sum(launcher.remount_readonly_live(path, handle.zone_id)
                    for path in namespaces)
        return [f"{total} mount(s) remounted read-only in {len(namespaces)} mount "
                "namespace(s)"]

    def _mount_namespaces(self, handle: ZoneHandle) -> list[str]:
        """One path per distinct mount namespace of the zone: the reference taken at start,
        plus any namespace a zone process made for itself since."""
        host = os.stat("/proc/self/ns/mnt").st_ino
        seen: dict[int, str] = {}
        candidates = [handle.state.get("ns_ref")] + [
            f"/proc/{pid}/ns/mnt" for pid in sorted(self.cgroup(handle.zone_id).pids())]
        for path in candidates:
            if not path:
                continue
            try:
                inode = os.stat(path).st_ino
            except OSError:
                continue
            if inode != host:
                seen.setdefault(inode, path)
        return list(seen.values())

    # -- freezing and statistics ----------------------------------------------------------

    def freeze(self, handle: ZoneHandle) -> None:
        self.handle_cgroup(handle).freeze()
        handle.state["frozen"] = True

    def thaw(self, handle: ZoneHandle) -> None:
        self.handle_cgroup(handle).thaw()
        handle.state["frozen"] = False

    def stats(self, handle: ZoneHandle) -> ZoneStats:
        cgroup = self.handle_cgroup(handle)
        return ZoneStats(procs=len(cgroup.pids()), memory_bytes=cgroup.memory_usage(),
                         cpu_usage_ns=cgroup.cpu_usage_ns(), frozen=cgroup.frozen())

    # -- after a controller restart -------------------------------------------------------

    def adopt(self, zone_id: str, state: dict[str, Any], applied: Restrictions) -> tuple[
        ZoneHandle, Workload | None
    ]:
        _check_id(zone_id)
        handle = ZoneHandle(zone_id, self.backend, dict(state), applied)
        cgroup = self.handle_cgroup(handle)
        pids = cgroup.pids()
        if not pids:
            return handle, None
        if handle.state.get("parent"):
            # its processes are watched by its parent's agent, adopted with the parent
            return handle, launcher.AdoptedWorkload(cgroup, min(pids))
        pid = state.get("pid")
        if not isinstance(pid, int) or pid not in pids:
            pid = min(pids)
        handle.state["frozen"] = cgroup.frozen()
        self._reattach_agent(handle)
        return handle, launcher.AdoptedWorkload(cgroup, pid)

    def _reattach_agent(self, handle: ZoneHandle) -> None:
        """Take over the zone's running agent; without one, the zone is unwatched, which
        is an anomaly (fail closed) rather than a silent gap."""
        zone_id, pid = handle.zone_id, handle.state.get("agent_pid")
        name = handle.state.get("agent_name")
        watched = handle.state.get("monitor") is not None or handle.state.get("channel")
        if not watched or not isinstance(pid, int) or not isinstance(name, str):
            return
        agent = HostAgent.reattach(zone_id, pid, name)
        on_problem, on_event = self.hooks.handlers(zone_id)
        if agent is None:
            on_problem("disconnected", f"the zone's agent (pid {pid}) is gone: its "
                       "processes are no longer watched")
            return
        self._agents[zone_id] = agent

        def connect() -> None:
            try:
                agent.connect(on_problem=on_problem, on_event=on_event, timeout=15,
                              on_channel=self.hooks.channel_handler(zone_id))
            except ZoneError as exc:
                on_problem("disconnected", f"the zone's agent did not come back: {exc}")
        threading.Thread(target=connect, name=f"agent-{zone_id}", daemon=True).start()

    def leftovers(self) -> set[str]:
        return (cgroupfs.zone_ids(self.caps) | netns.zone_ids() | mounts.ref_zone_ids()
                | {z for z in host_agent.recorded_zones() if _ZONE_ID.match(z)}
                | set(cgroupfs.transient_ids(self.caps)))

    def remove(self, zone_id: str) -> list[str]:
        parent = cgroupfs.transient_ids(self.caps).get(_check_id(zone_id))
        if parent is not None:
            return self._end_transient(cgroupfs.child_cgroup(self.caps, parent, zone_id))
        removed = self._teardown(_check_id(zone_id))
        self._stop_agent(zone_id)
        host_agent.sweep_spares()
        return removed + host_agent.stop_orphan(zone_id)

    # -- transient zones ------------------------------------------------------------------

    def split(self, parent: ZoneHandle, spec: ZoneSpec, request: CodePath,
              initial: Restrictions) -> tuple[ZoneHandle, Workload]:
        zone_id = _check_id(spec.zone_id)
        agent = self._agents.get(parent.zone_id)
        if agent is None or agent.link is None or agent.link.closed:
            raise ZoneError("the zone's agent is not connected: nobody can release the "
                            "held call", zone_id=parent.zone_id)
        cgroup = cgroupfs.child_cgroup(self.caps, parent.zone_id, zone_id)
        notes: list[str] = []
        try:
            cgroup.create()
            if cgroup.version == 2:
                notes.append("cgroup v2: held to its parent's resource limits (a cgroup "
                             "that holds processes cannot delegate controllers)")
            else:
                self._set_limits(cgroup, initial, Restrictions(), lambda _n, _v: None)
            # the process is blocked in its exec/connect until the agent answers: moved
            # now, everything it runs or forks from here on is in the transient zone
            cgroup.move(request.pid)
        except BaseException as exc:
            # back where it was (a move may have got through some hierarchies): the caller
            # refuses its call, and the process goes on in its zone without the exec
            with contextlib.suppress(HvtsmError, OSError):
                self.cgroup(parent.zone_id).move(request.pid)
            with contextlib.suppress(HvtsmError, OSError):
                self._end_transient(cgroup)
            if isinstance(exc, OSError):
                raise ZoneError(f"cannot make the transient zone's cgroup: {exc}",
                                zone_id=zone_id) from exc
            raise
        if initial.filesystem is FilesystemMode.RO \
                and parent.applied.filesystem is not FilesystemMode.RO:
            notes.append("filesystem ro is not enforced for the subtree alone: it shares "
                         "its parent's mount namespace")
        agent.link.transient(parent.zone_id, "split", hold=request.hold, zone=zone_id,
                             network=agent_network(initial))
        state = {"version": STATE_VERSION, "parent": parent.zone_id, "transient": True,
                 "cgroup_version": cgroup.version, "cgroups": [str(d) for d in cgroup.dirs()],
                 "pid": request.pid, "user": parent.state.get("user"), "frozen": False,
                 "notes": notes}
        handle = ZoneHandle(zone_id, self.backend, state, initial)
        return handle, launcher.AdoptedWorkload(cgroup, request.pid)

    def refuse(self, parent: ZoneHandle, request: CodePath, reason: str) -> None:
        agent = self._agents.get(parent.zone_id)
        if agent is None or agent.link is None:
            raise ZoneError("the zone's agent is not connected; its hold times out",
                            zone_id=parent.zone_id)
        agent.link.transient(parent.zone_id, "deny", hold=request.hold, reason=reason[:500])

    def _apply_transient(self, handle: ZoneHandle, restrictions: Restrictions) -> ApplyReport:
        old = handle.applied
        changed = restrictions.changes_from(old)
        notes: list[str] = []

        def done(name: str, value: object) -> None:
            handle.applied = replace(handle.applied, **{name: value})

        cgroup = self.handle_cgroup(handle)
        if cgroup.version == 1:
            self._set_limits(cgroup, restrictions, old, done)
        network = agent_network(restrictions)
        if network != agent_network(old):
            agent = self._agents.get(str(handle.state["parent"]))
            if agent is None or agent.link is None:
                raise ZoneError("the parent's agent is gone: the network cut cannot be "
                                "judged", zone_id=handle.zone_id)
            agent.link.transient(str(handle.state["parent"]), "update", zone=handle.zone_id,
                                 network=network)
            notes.append(f"network {network}: the agent refuses its connects off the host")
        if restrictions.filesystem is not old.filesystem:
            notes.append("filesystem ro is not enforced for the subtree alone")
        handle.applied = restrictions
        return ApplyReport(changed, tuple(notes))

    def _on_transient_ack(self, zone_id: str, data: dict[str, Any]) -> None:
        """The agent's answer to a `transient` message. The host placed the process before
        it asked for the release, so only a failure is news (a hold that timed out first:
        the call was refused and the transient zone ends empty)."""
        if data.get("ok") is not True:
            self.hooks.note(zone_id, "transient-refused",
                            f"the agent could not {str(data.get('op'))[:20]} for transient "
                            f"zone {str(data.get('zone'))[:40]}: {str(data.get('error'))[:300]}")

    def _end_transient(self, cgroup: ZoneCgroup) -> list[str]:
        if not cgroup.exists():
            return []
        count = len(cgroup.pids())
        cgroup.kill()
        removed = [f"{count} process(es) killed"] if count else []
        return removed + cgroup.remove()

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

