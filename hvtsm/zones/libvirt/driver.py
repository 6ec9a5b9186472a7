"""Libvirt zones: each zone is a transient QEMU domain, its phases applied live.

The guest boots the lab image (hvtsm/image), its init starts the guest agent, and the
workload runs through the agent (hvtsm/monitor/link/). Boot time is not lifespan: `start`
returns once the agent reports the workload started.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pwd
import shlex
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
from lxml import etree

from hvtsm.agent_stage import stage_agent, zone_python
from hvtsm.errors import HvtsmError, ZoneError
from hvtsm.host import HostCapabilities
from hvtsm.image.lab import build_lab_image, kernel_cmdline
from hvtsm.monitor.anomalies import zone_profile
from hvtsm.monitor.code_path import CodePath
from hvtsm.monitor.events import HookedDriver, MonitorHooks
from hvtsm.monitor.link import AgentLink
from hvtsm.restrictions import FilesystemMode, NetworkMode, Restrictions
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
from hvtsm.zones.command import run
from hvtsm.zones.libvirt import egress
from hvtsm.zones.libvirt.accel import AccelChoice, choose_accel
from hvtsm.zones.libvirt.connection import Connection
from hvtsm.zones.libvirt.standby import MODES as STANDBY_MODES
from hvtsm.zones.libvirt.standby import standby_id, start_note
from hvtsm.zones.libvirt.templates import DomainParams, render, to_xml
from hvtsm.zones.libvirt.transient import GuestTransients
from hvtsm.zones.libvirt.workload import DomainWorkload, GuestWorkload

log = logging.getLogger(__name__)

DOMAIN_PREFIX = "hvtsm-"
TAP_PREFIX = "hv"
DEFAULT_MEMORY = 512 * 1024 * 1024
#: what QEMU itself needs beside guest memory, for the memtune hard limit
QEMU_OVERHEAD_KIB = {"kvm": 256 * 1024, "qemu": 768 * 1024}
LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE
PERIOD_US = 100_000
#: a guest's directories every user may write to: a pooled guest's scrub deletes what the
#: workload's user left there, so the next request of the pool finds none of it
SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm")
#: of those, the ones a pooled guest gets a tmpfs of its own on
PRIVATE_TMP = ("/tmp", "/var/tmp")


@dataclass(frozen=True)
class LibvirtOptions:
    uri: str = "qemu:///system"
    template: str = "lab"
    accel: str = "auto"
    net_pool: str = "10.214.0.0/16"
    vcpus: int = 1
    #: where per-zone files (console log, channel socket) live
    state_root: Path = Path("/run/hvtsm/zones")
    #: interpreter the guest runs the agent with (a path in the host root it shares)
    guest_python: str | None = None
    boot_timeout: float = 120.0
    unplug_timeout: float = 10.0
    #: where memory dumps go when a zone's policy asks for them (forensics)
    dump_dir: Path = Path("/var/lib/hvtsm/dumps")


def domain_name(zone_id: str) -> str:
    return DOMAIN_PREFIX + zone_id


def tap_name(zone_id: str) -> str:
    return TAP_PREFIX + zone_id.removeprefix("z")[:13]


def guest_of(handle: ZoneHandle) -> str:
    """The guest a zone runs in: its own (named by the zone id) unless it was bound to a
    pooled guest."""
    return str(handle.state.get("guest", handle.zone_id))


def mac_address(zone_id: str) -> str:
    digest = hashlib.sha256(zone_id.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


class LibvirtDriver(HookedDriver):
    backend = Backend.LIBVIRT

    def __init__(self, caps: HostCapabilities, options: LibvirtOptions | None = None) -> None:
        import ipaddress

        self.caps = caps
        self.options = options or LibvirtOptions()
        self.pool = ipaddress.IPv4Network(self.options.net_pool)
        self.connection = Connection(self.options.uri)
        self._accel: AccelChoice | None = None
        #: agent links by guest (a cold zone is its own guest: the zone id)
        self._links: dict[str, AgentLink] = {}
        #: guest -> the zone it serves now, whose audit trail its link reports to
        self._route: dict[str, str] = {}
        #: (guest, kind, detail) of a pooled guest that serves no zone: its link's problems
        #: and events, the domain stopping (the pool taints it)
        self.idle_sink: Callable[[str, str, str], None] | None = None
        #: the workload each zone's agent runs, for its guest pid
        self._workloads: dict[str, Any] = {}
        self._removed: dict[str, threading.Event] = {}
        self._gone: dict[str, threading.Event] = {}
        self._agent_dir: Path | None = None
        self._python = self.options.guest_python
        #: the manager's sinks: anomalies, and facts that arrive after `apply` returned
        #: (the unplug completing, the guest seeing its new memory), which it audits
        self.hooks = MonitorHooks()
        #: transient zones: cgroups the guest agent manages (zones/libvirt/transient.py)
        self.transients = GuestTransients()
        self.hooks.transient = self.transients.on_event

    @property
    def accel(self) -> AccelChoice:
        """Probed on first use, not at construction: `hvtsm cleanup` needs no guest."""
        if self._accel is None:
            self._accel = choose_accel(self.options.accel)
            log.info("libvirt zones use %s: %s", self._accel.accel, self._accel.reason)
        return self._accel

    def guest_agent_dir(self) -> Path:
        """The directory the guest puts on PYTHONPATH (staged once per agent version)."""
        if self._agent_dir is None:
            self._agent_dir = stage_agent()
        return self._agent_dir

    def guest_python(self) -> str:
        if self._python is None:
            self._python = zone_python()
        return self._python

    # -- lifecycle ----------------------------------------------------------------------------

    def create(self, spec: ZoneSpec, initial: Restrictions) -> ZoneHandle:
        zone_id = spec.zone_id
        # a cold zone is its own guest: domain, state dir and tap are named by the zone id
        self._route[zone_id] = zone_id
        handle = ZoneHandle(zone_id, self.backend, {}, Restrictions())
        self._boot(handle, zone_id, spec.net_index, initial, user=spec.user,
                   memory_dump=spec.memory_dump, monitor=spec.monitor)
        _place(handle, spec)
        return handle

    def boot_guest(self, guest: str, net_index: int, baseline: Restrictions) -> dict[str, Any]:
        """Boot a guest that serves no zone yet (a warm pool's): `baseline` in force, the
        agent's hello received, no workload. Returns its driver state for `bind`. Problems
        its link reports while it serves no zone go to `idle_sink`."""
        handle = ZoneHandle(guest, self.backend, {"guest": guest, "pooled": True},
                            Restrictions())
        self._boot(handle, guest, net_index, baseline, user=None, memory_dump=False,
                   monitor=None)
        handle.state["baseline"] = baseline.to_json()
        return handle.state

    def _boot(self, handle: ZoneHandle, guest: str, net_index: int, initial: Restrictions, *,
              user: str | None, memory_dump: bool,
              monitor: Mapping[str, Any] | None) -> None:
        zone_id = handle.zone_id
        name = domain_name(guest)
        zone_dir = self.options.state_root / guest
        state = handle.state
        state.update({"domain": name, "dir": str(zone_dir), "memory_dump": memory_dump,
                      "accel": self.accel.accel.domain_type, "user": user, "nic": False})
        try:
            image = build_lab_image()
            _make_zone_dir(zone_dir)
            nic = initial.network.has_nic
            ip = gateway = None
            tap = tap_name(guest)
            if nic:
                index = netslots.reserve(guest, net_index, self.pool,
                                         alive=lambda z: (Path("/sys/class/net") /
                                                          tap_name(z)).exists())
                base = self.pool.network_address + 4 * index
                gateway, ip = str(base + 1), f"{base + 2}/30"
                state.update(tap=tap, host_addr=f"{gateway}/30", zone_addr=ip, net_index=index)
            memory = initial.memory or DEFAULT_MEMORY
            params = DomainParams(
                name=name, uuid=str(uuid.uuid4()), accel=self.accel.accel.domain_type,
                emulator=None, vcpus=self.options.vcpus, memory_kib=memory // 1024,
                max_memory_kib=memory // 1024, kernel=str(image.kernel),
                initrd=str(image.initrd),
                cmdline=kernel_cmdline(python=self.guest_python(),
                                       agent_path=str(self.guest_agent_dir()),
                                       ip=ip, gateway=gateway),
                host_root="/", channel_path=str(zone_dir / "agent.sock"),
                console_log=str(zone_dir / "console.log"), tap=tap, mac=mac_address(guest))
            domain_xml = render(self.options.template, params)
            if not nic:
                for iface in domain_xml.findall("./devices/interface"):
                    iface.getparent().remove(iface)
            state.update(channel=params.channel_path, console=params.console_log,
                         nic=nic, image=image.digest)
            self._watch_domain(name)
            started = time.monotonic()
            dom = self.connection.get().createXML(to_xml(domain_xml), 0)
            if nic:
                # libvirt made the tap; the host's end of the zone's /30 goes on it
                run(["ip", "addr", "add", str(state["host_addr"]), "dev", tap],
                    zone_id=zone_id)
                run(["ip", "link", "set", tap, "up"], zone_id=zone_id)
            on_problem, on_event = self._handlers(guest)
            link = AgentLink.connect(params.channel_path, timeout=self.options.boot_timeout,
                                     zone_id=zone_id, on_problem=on_problem,
                                     on_event=on_event)
            self._links[guest] = link
            hello = link.wait_hello(self.options.boot_timeout)
            state["boot_ms"] = round((time.monotonic() - started) * 1000, 1)
            state["agent"] = {"version": hello.agent_version, "protocol": hello.protocol,
                              "capabilities": list(hello.capabilities)}
            if monitor is not None:
                _require_monitoring(hello.capabilities, zone_id)
                state["monitor"] = dict(monitor)
            state["uuid"] = dom.UUIDString()
            # the same code path as a later phase: one way to put limits on a guest
            self.apply(handle, initial, first=True)
        except BaseException as exc:
            tail = _tail(Path(state.get("console", zone_dir / "console.log")))
            with contextlib.suppress(HvtsmError, OSError, libvirt.libvirtError):
                self._teardown(guest)
            if isinstance(exc, libvirt.libvirtError | OSError):
                raise ZoneError(f"cannot create the guest: {exc}", zone_id=zone_id,
                                hint=f"console: {tail}" if tail else None) from exc
            if isinstance(exc, ZoneError) and tail and exc.hint is None:
                exc.hint = f"guest console ends with: {tail}"
            raise

    def _watch_domain(self, name: str) -> None:
        self._gone[name] = threading.Event()
        self._removed[name] = threading.Event()
        self.connection.lifecycle[name] = self._on_lifecycle
        self.connection.device_removed[name] = self._on_device_removed

    # -- guests that outlive their zones (a warm pool) ----------------------------------------

    def attach_guest(self, state: Mapping[str, Any], *, timeout: float = 10.0) -> None:
        """Connect to a running pooled guest's agent (booted by this process or another,
        whose link is closed: QEMU serves one client at a time)."""
        guest = str(state["guest"])
        if guest in self._links and not self._links[guest].closed:
            return
        name = domain_name(guest)
        try:
            active = self.connection.get().lookupByName(name).isActive()
        except libvirt.libvirtError as exc:
            raise ZoneError(f"pooled guest {guest} is gone: {exc}",
                            hint="`hvtsm pool status` shows the pool; retire it with "
                            "`hvtsm cleanup`") from exc
        if not active:
            raise ZoneError(f"pooled guest {guest} is not running")
        self._watch_domain(name)
        on_problem, on_event = self._handlers(guest)
        link = AgentLink.connect(str(state["channel"]), timeout=timeout, zone_id=guest,
                                 on_problem=on_problem, on_event=on_event)
        try:
            link.wait_hello(timeout)
        except ZoneError:
            link.close()
            raise
        self._links[guest] = link

    def detach_guest(self, guest: str) -> None:
        """Close this process's link to a pooled guest (it keeps running) so another
        process can connect to it."""
        link = self._links.pop(guest, None)
        if link is not None:
            link.close()
        name = domain_name(guest)
        self.connection.lifecycle.pop(name, None)
        self.connection.device_removed.pop(name, None)

    def bind(self, spec: ZoneSpec, initial: Restrictions, state: Mapping[str, Any],
             baseline: Restrictions) -> ZoneHandle:
        """Make zone `spec` in the running pooled guest `state` (from `boot_guest`): its
        link now reports for the zone, and `initial` is applied over the guest's `baseline`
        (only tightening: an unplugged NIC or lowered memory is never given back, so such
        a guest must not serve again). Raises ZoneError; the guest is then unusable."""
        guest = str(state["guest"])
        self.attach_guest(state)
        link = self._links[guest]
        handle = ZoneHandle(spec.zone_id, self.backend, dict(state), baseline)
        handle.state.update(user=spec.user, memory_dump=spec.memory_dump, bound=True)
        _place(handle, spec)
        hello = link.hello
        if spec.monitor is not None:
            _require_monitoring(hello.capabilities if hello else (), spec.zone_id)
            handle.state["monitor"] = dict(spec.monitor)
        self._route[guest] = spec.zone_id
        try:
            self.apply(handle, initial)
        except BaseException:
            self._route.pop(guest, None)
            raise
        return handle

    def scrub(self, guest: str, user: str, scratch: str, *, timeout: float = 30.0) -> float:
        """Between two zones of one guest: kill every process of `user` (what a workload
        left running), check that none survives, delete what a workload of the user made
        in the shared temporary directories (/tmp, /var/tmp, /dev/shm: their entries the
        user owns, with all they hold), and give the next zone an empty
        `scratch` directory. Returns the seconds it took; ZoneError when a process or a
        file survives or the guest does not answer."""
        link = self._links.get(guest)
        if link is None:
            raise ZoneError(f"no agent link to guest {guest}")
        entry = pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
        if uid == 0:
            raise ZoneError("a guest whose workload ran as root cannot be scrubbed for reuse")
        # the user's own entries of the shared directories. A lab guest's /tmp and
        # /var/tmp are the host's (over 9p: slow to walk, and none of a workload's
        # business), so the guest's first scrub, before it served anything, mounts a
        # private tmpfs on each that is not a mount of its own yet; it also lists the
        # user's entries already there as known, and later scrubs leave those alone
        known = f"/run/hvtsm-scrub-known-{uid}"
        private = "; ".join(f"mountpoint -q {d} || mount -t tmpfs -o mode=1777,nosuid,nodev "
                            f"tmpfs {d} || exit 6" for d in PRIVATE_TMP)
        found = (f"find {' '.join(shlex.quote(d) for d in SHARED_TMP)} -mindepth 1 "
                 f"-maxdepth 1 -user {uid} 2>/dev/null")
        made = f"{found} | grep -vxF -f {known}"
        # pkill -U matches the real uid, which a setuid program keeps; a process forked
        # between the kill and the check is caught by the next round
        script = (f"n=0; while pgrep -U {uid} >/dev/null; do n=$((n+1)); "
                  f"[ $n -gt 40 ] && exit 3; pkill -KILL -U {uid}; sleep 0.05; done; "
                  f"[ -e {known} ] || {{ {private}; {found} > {known}; "
                  f"[ -e {known} ] || exit 5; }}; "
                  # each program started costs a TCG guest ~80 ms: the second look only
                  # when there was something to delete
                  f"left=$({made}); if [ -n \"$left\" ]; then "
                  f"printf '%s\\n' \"$left\" | while IFS= read -r p; do rm -rf \"$p\"; done; "
                  f"[ -z \"$({made})\" ] || exit 4; fi; "
                  f"rm -rf {shlex.quote(scratch)} && install -d -m 0700 -o {uid} -g {gid} "
                  f"{shlex.quote(scratch)}")
        t0 = time.monotonic()
        remote = link.start(["/bin/sh", "-c", script], stdout=None, stderr=None,
                            workload_id="scrub-" + uuid.uuid4().hex[:12])
        status = remote.wait(timeout)
        if status != 0:
            raise ZoneError(f"guest {guest}: scrub failed (status {status}): "
                            + {3: "processes of the previous workload survived",
                               4: "files of the previous workload could not be deleted",
                               5: f"could not list the known files of uid {uid}",
                               6: "could not mount a private tmpfs on /tmp or /var/tmp"}
                            .get(status, "the guest did not clean up"))
        return time.monotonic() - t0

    def prepare_standby(self, guest: str, runtime: str, user: str,
                        monitor: Mapping[str, Any]) -> dict[str, Any] | None:
        """Have the pooled guest's agent start a standby for `runtime` as `user` under
        `monitor` (its filter is fixed from then on): the next zone's start in this guest
        names it. None for a runtime that has no standby; ZoneError when the agent could
        not prepare one (the guest still serves, with normal starts)."""
        if runtime not in STANDBY_MODES:
            return None
        link = self._links.get(guest)
        if link is None:
            raise ZoneError(f"no agent link to guest {guest}")
        mode, program = STANDBY_MODES[runtime]
        return link.prepare_standby(standby_id(guest), mode=mode, monitor=monitor, user=user,
                                    python=self.guest_python(), program=program)

    def destroy_guest(self, guest: str) -> list[str]:
        """Destroy a pooled guest and everything of it on the host."""
        self._route.pop(guest, None)
        return self._teardown(guest)

    def guest_alive(self, guest: str) -> bool:
        try:
            return bool(self.connection.get().lookupByName(domain_name(guest)).isActive())
        except libvirt.libvirtError:
            return False

    def _handlers(self, guest: str) -> tuple[Any, Any]:
        """Link callbacks that report for whichever zone the guest serves at the time (a
        pooled guest serves one after another); with none, to `idle_sink`."""

        def on_problem(kind: str, detail: str) -> None:
            zone = self._route.get(guest)
            if zone is None:
                self._idle(guest, kind, detail)
            else:
                self.hooks.handlers(zone)[0](kind, detail)

        def on_event(msg: Any) -> None:
            zone = self._route.get(guest)
            if zone is None:
                data = msg.get("data")
                what = data.get("category") if isinstance(data, dict) else None
                self._idle(guest, "event", str(msg.get("kind"))[:40]
                           + (f" {str(what)[:40]}" if what else ""))
            else:
                self.hooks.handlers(zone)[1](msg)

        return on_problem, on_event

    def _idle(self, guest: str, kind: str, detail: str) -> None:
        sink = self.idle_sink
        if sink is None:
            log.warning("guest %s (no zone): %s: %s", guest, kind, detail)
        else:
            sink(guest, kind, detail)

    def start(self, handle: ZoneHandle, argv: Sequence[str], io: WorkloadIO) -> Workload:
        link = self._link(handle)
        # WorkloadIO's None means "inherit", as for a local process: the controller's own
        # stdout/stderr; the link would discard None
        stdout = sys.stdout.fileno() if io.stdout is None else io.stdout
        stderr = sys.stderr.fileno() if io.stderr is None else io.stderr
        static = handle.state.get("monitor")
        # a pooled guest's agent outlives links of other processes, whose counters also
        # start at w1: the zone id is the one workload id no earlier exit can carry
        bound = bool(handle.state.get("bound"))
        channel = handle.state.get("channel_name")
        if channel is not None:
            link.on_channel = self.hooks.channel_handler(handle.zone_id)
        remote = link.start(argv, user=handle.state.get("user"), stdout=stdout,
                            stderr=stderr,
                            monitor=None if static is None else zone_profile(static,
                                                                             handle.applied),
                            workload_id=handle.zone_id if bound else None,
                            cwd=handle.state.get("cwd"), env=handle.state.get("env"),
                            channel=channel,
                            standby=standby_id(guest_of(handle))
                            if bound and handle.state.get("standby") else None)
        handle.state["workload"] = remote.id
        self._workloads[handle.zone_id] = remote
        work = GuestWorkload(remote, self._gone[handle.state["domain"]])
        work.start_note = start_note(remote.standby)
        return work

    def terminate(self, handle: ZoneHandle) -> None:
        if handle.state.get("parent"):
            self.transients.terminate(self._parent_link(handle), handle)
            return
        remote = self._workloads.get(handle.zone_id)
        # a dump only when the zone is ended under a running workload (policy, reaction,
        # operator), not when cleaning up after the workload finished
        running = remote is not None and remote.poll() is None
        guest = guest_of(handle)
        if handle.state.get("bound") and not running and not handle.state.get("destroyed"):
            # the workload exited on its own: the pooled guest outlives the zone (its pool
            # scrubs or retires it); the zone only lets go of it
            self._workloads.pop(handle.zone_id, None)
            if self._route.get(guest) == handle.zone_id:
                del self._route[guest]
            handle.state["released"] = True
            return
        if handle.state.get("bound"):
            # ended under a running workload (policy, reaction, operator): the guest goes
            # with the zone, never back to a pool
            self._route.pop(guest, None)
            handle.state["destroyed"] = True
        dumped = self._teardown(guest, dump=bool(handle.state.get("memory_dump")) and running,
                                dump_name=handle.zone_id)
        self._workloads.pop(handle.zone_id, None)
        for item in dumped:
            if item.startswith("memory dump"):
                handle.state["dump"] = item.removeprefix("memory dump ")
                self._report(handle.zone_id, "memory-dump", f"guest memory kept in {item}")
        handle.state.update(nic=False)

    def freeze(self, handle: ZoneHandle) -> None:
        if handle.state.get("parent"):
            self.transients.act(self._parent_link(handle), handle, "freeze")
            handle.state["frozen"] = True
            return
        dom = self._domain(handle)
        if dom.info()[0] != libvirt.VIR_DOMAIN_PAUSED:
            dom.suspend()
        handle.state["frozen"] = True

    def thaw(self, handle: ZoneHandle) -> None:
        if handle.state.get("parent"):
            self.transients.act(self._parent_link(handle), handle, "thaw")
            handle.state["frozen"] = False
            return
        dom = self._domain(handle)
        if dom.info()[0] == libvirt.VIR_DOMAIN_PAUSED:
            dom.resume()
        handle.state["frozen"] = False

    def stats(self, handle: ZoneHandle) -> ZoneStats:
        if handle.state.get("parent"):
            return self.transients.stats(self._parent_link(handle), handle)
        dom = self._domain(handle)
        info = dom.info()
        memory = dom.memoryStats()
        rss = memory.get("rss")
        return ZoneStats(procs=info[3], memory_bytes=None if rss is None else rss * 1024,
                         cpu_usage_ns=info[4], frozen=info[0] == libvirt.VIR_DOMAIN_PAUSED)

    # -- tightening ---------------------------------------------------------------------------

    def apply(self, handle: ZoneHandle, restrictions: Restrictions, *,
              first: bool = False) -> ApplyReport:
        if handle.state.get("parent"):
            return self.transients.apply(self._parent_link(handle), handle, restrictions)
        old = handle.applied
        changed = restrictions.changes_from(old)
        notes: list[str] = []
        dom = self._domain(handle)
        state = handle.state
        if restrictions.network is not NetworkMode.FULL and state.get("nic"):
            notes += self._unplug(handle, dom)
        egress_changed = first or restrictions.egress != old.egress
        if (restrictions.network is NetworkMode.FULL and state.get("nic") and egress_changed
                and restrictions.egress is not None):
            egress.set_egress(guest_of(handle), state["tap"], restrictions.egress,
                              nft=self.caps.nft or "nft")
            notes.append(f"egress allow-list on tap {state['tap']}: "
                         f"{len(restrictions.egress)} destination(s)")
        if restrictions.network is NetworkMode.NONE and (first or old.network
                                                         is not NetworkMode.NONE):
            self._guest_command(handle, ["ip", "link", "set", "lo", "down"])
            notes.append("guest loopback down")
        self._apply_cpu(dom, handle, restrictions, old, notes, first)
        if restrictions.memory is not None and (first or restrictions.memory != old.memory):
            notes += self._apply_memory(dom, handle, restrictions.memory, watch=not first)
        if (restrictions.pids is not None and restrictions.pids != old.pids
                and handle.zone_id in self._workloads):
            # a guest has no cgroup between the workload and its kernel: the limit goes on
            # the workload's user inside the guest
            self._guest_command(handle, ["prlimit", f"--pid={self._guest_pid(handle)}",
                                         f"--nproc={restrictions.pids}"], check=False)
            notes.append(f"RLIMIT_NPROC {restrictions.pids} on the workload")
        if restrictions.filesystem is FilesystemMode.RO and (
                first or old.filesystem is not FilesystemMode.RO):
            self._guest_command(handle, ["mount", "-o", "remount,ro", "/"])
            notes.append("guest root remounted read-only")
        handle.applied = restrictions
        static = state.get("monitor")
        work = self._workloads.get(handle.zone_id)
        if static is not None and work is not None and changed and not first:
            # the agent judges connects against the allow-list in force now
            self._link(handle).update_profile(work.id, zone_profile(static, restrictions))
        return ApplyReport(changed, tuple(notes))

    def _unplug(self, handle: ZoneHandle, dom: Any) -> list[str]:
        """Link down now (the cut is in force in milliseconds), then hot-unplug in the
        background: QEMU needs the guest's ACPI cooperation and takes a while; its
        completion is reported when the DEVICE_REMOVED event (or the live XML) says so."""
        state = handle.state
        if state.get("unplugging"):
            return []
        iface = self._interface(dom)
        if iface is None:
            state["nic"] = False
            return ["NIC already gone"]
        link = iface.find("link")
        if link is None:
            link = etree.SubElement(iface, "link")
        link.set("state", "down")
        t0 = time.monotonic()
        dom.updateDeviceFlags(etree.tostring(iface, encoding="unicode"), LIVE)
        state["unplugging"] = True
        threading.Thread(target=self._finish_unplug, args=(handle, dom, iface),
                         name=f"unplug-{handle.zone_id}", daemon=True).start()
        return [f"link down in {(time.monotonic() - t0) * 1000:.1f} ms; hot-unplug started"]

    def _finish_unplug(self, handle: ZoneHandle, dom: Any, iface: Any) -> None:
        state = handle.state
        removed = self._removed[state["domain"]]
        removed.clear()
        t1 = time.monotonic()
        try:
            dom.detachDeviceFlags(etree.tostring(iface, encoding="unicode"), LIVE)
            done = removed.wait(self.options.unplug_timeout)
            if not done:
                # the event can be missed across a reconnect: the live XML is the truth
                done = self._interface(dom) is None
        except libvirt.libvirtError as exc:
            self._report(handle.zone_id, "nic-unplug-failed",
                         f"hot-unplug failed ({exc}); the link stays down")
            return
        finally:
            state["unplugging"] = False
        took = (time.monotonic() - t1) * 1000
        if done:
            state["nic"] = False
            self._report(handle.zone_id, "nic-unplugged",
                         f"NIC unplug complete {took:.0f} ms after the request")
        else:
            self._report(handle.zone_id, "nic-unplug-pending",
                         f"NIC still present {took:.0f} ms after the unplug request; "
                         "the link stays down")

    def _report(self, zone_id: str, kind: str, detail: str) -> None:
        self.hooks.note(zone_id, kind, detail)

    def _interface(self, dom: Any) -> Any:
        live = etree.fromstring(dom.XMLDesc(0))
        return live.find("./devices/interface")

    def _apply_cpu(self, dom: Any, handle: ZoneHandle, new: Restrictions, old: Restrictions,
                   notes: list[str], first: bool) -> None:
        params: dict[str, int] = {}
        if new.cpu_shares is not None and (first or new.cpu_shares != old.cpu_shares):
            params["cpu_shares"] = new.cpu_shares
        if new.cpu_quota is not None and (first or new.cpu_quota != old.cpu_quota):
            vcpus = self.options.vcpus
            per_vcpu = min(new.cpu_quota / vcpus, 100.0)
            params.update(vcpu_period=PERIOD_US, vcpu_quota=max(1000, int(per_vcpu * 1000)),
                          global_period=PERIOD_US,
                          global_quota=max(1000, int(new.cpu_quota * 1000)))
        if params:
            dom.setSchedulerParametersFlags(params, LIVE)
            notes.append("scheduler " + ", ".join(f"{k}={v}" for k, v in params.items()))
        if new.cpus is not None and (first or new.cpus != old.cpus):
            host_cpus = max(self.caps.cpus | new.cpus) + 1
            cpumap = tuple(i in new.cpus for i in range(host_cpus))
            for vcpu in range(self.options.vcpus):
                dom.pinVcpuFlags(vcpu, cpumap, LIVE)
            dom.pinEmulator(cpumap, LIVE)
            notes.append(f"vCPUs and emulator pinned to {sorted(new.cpus)}")

    def _apply_memory(self, dom: Any, handle: ZoneHandle, memory: int, *,
                      watch: bool) -> list[str]:
        kib = memory // 1024
        t0 = time.monotonic()
        dom.setMemoryFlags(kib, LIVE)
        overhead = QEMU_OVERHEAD_KIB[handle.state["accel"]]
        dom.setMemoryParameters({"hard_limit": kib + overhead}, LIVE)
        if watch:  # at creation the guest boots with this much: nothing to wait for
            threading.Thread(target=self._watch_guest_memory, args=(handle, kib, t0),
                             name=f"balloon-{handle.zone_id}", daemon=True).start()
        return [f"balloon target {kib} KiB, memtune hard_limit {kib + overhead} KiB"]

    def _watch_guest_memory(self, handle: ZoneHandle, target_kib: int, since: float,
                            timeout: float = 10.0) -> None:
        """Report what the guest says once the balloon moved (it takes it 1-3 s)."""
        link = self._links.get(guest_of(handle))
        if link is None:
            return
        seen: int | None = None
        while time.monotonic() - since < timeout:
            try:
                seen = int(link.probe("meminfo", timeout=2)["MemTotal"])
            except (HvtsmError, KeyError, ValueError, TypeError):
                break
            if seen <= target_kib:
                break
            time.sleep(0.05)
        took = (time.monotonic() - since) * 1000
        handle.state["guest_memtotal_kb"] = seen
        if seen is not None and seen <= target_kib:
            self._report(handle.zone_id, "guest-memory",
                         f"guest reports MemTotal {seen} kB {took:.0f} ms after the balloon "
                         f"target {target_kib} KiB")
        else:
            self._report(handle.zone_id, "guest-memory-pending",
                         f"guest still reports MemTotal {seen} kB {took:.0f} ms after the "
                         f"balloon target {target_kib} KiB")

    # -- guest commands -----------------------------------------------------------------------

    def _guest_command(self, handle: ZoneHandle, argv: list[str], *, check: bool = True,
                       timeout: float = 15.0) -> int | None:
        """Run an administrative command in the guest as root, through the agent."""
        remote = self._link(handle).start(argv, stdout=None, stderr=None)
        status = remote.wait(timeout)
        if check and status != 0:
            raise ZoneError(f"guest command {argv} failed with status {status}",
                            zone_id=handle.zone_id)
        return status

    def _guest_pid(self, handle: ZoneHandle) -> int:
        remote = self._workloads.get(handle.zone_id)
        if remote is None:
            raise ZoneError("no workload runs in the guest yet", zone_id=handle.zone_id)
        return int(remote.pid)

    # -- transient zones (a cgroup the guest agent manages) -----------------------------------

    def split(self, parent: ZoneHandle, spec: ZoneSpec, request: CodePath,
              initial: Restrictions) -> tuple[ZoneHandle, Workload]:
        gone = self._gone.get(str(parent.state.get("domain")), threading.Event())
        return self.transients.split(self._links.get(parent.zone_id), parent, spec,
                                     request, initial, gone)

    def refuse(self, parent: ZoneHandle, request: CodePath, reason: str) -> None:
        self.transients.refuse(self._links.get(parent.zone_id), parent, request, reason)

    def _parent_link(self, handle: ZoneHandle) -> AgentLink | None:
        return self._links.get(str(handle.state["parent"]))

    def channel_link(self, zone_id: str) -> AgentLink | None:
        """The link a zone's channel messages travel on (None: none, or closed)."""
        link = self.agent_link(zone_id)
        return link if link is not None and not link.closed else None

    def agent_link(self, zone_id: str) -> AgentLink | None:
        """The link to a zone's (or a pooled guest's) agent (probes, administrative
        commands)."""
        for guest, zone in list(self._route.items()):
            if zone == zone_id:
                return self._links.get(guest)
        return self._links.get(zone_id)

    def _link(self, handle: ZoneHandle) -> AgentLink:
        link = self._links.get(guest_of(handle))
        if link is None:
            raise ZoneError("no agent link to the guest", zone_id=handle.zone_id)
        return link

    def _domain(self, handle: ZoneHandle) -> Any:
        try:
            return self.connection.get().lookupByName(handle.state["domain"])
        except libvirt.libvirtError as exc:
            raise ZoneError(f"guest domain is gone: {exc}", zone_id=handle.zone_id) from exc

    # -- events -------------------------------------------------------------------------------

    def _on_lifecycle(self, name: str, event: int, detail: int) -> None:
        if event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED,
                     libvirt.VIR_DOMAIN_EVENT_UNDEFINED):
            gone = self._gone.get(name)
            if gone is not None and not gone.is_set():
                gone.set()
                # a stop we did not ask for (a crash, a shutdown from inside) must reach
                # the audit trail, not only end the workload
                kind = {libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
                        libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined"}.get(event, "stopped")
                guest = name.removeprefix(DOMAIN_PREFIX)
                text = f"domain {name} {kind} (libvirt event {event}, detail {detail})"
                zone = self._route.get(guest)
                if zone is None and guest not in self._links:
                    self._report(guest, "guest-" + kind, text)
                elif zone is None:
                    self._idle(guest, "guest-" + kind, text)
                else:
                    self._report(zone, "guest-" + kind, text)

    def _on_device_removed(self, name: str, alias: str) -> None:
        removed = self._removed.get(name)
        if removed is not None and alias.startswith("net"):
            removed.set()

    # -- teardown, adoption, leftovers --------------------------------------------------------

    def _teardown(self, zone_id: str, *, dump: bool = False,
                  dump_name: str | None = None) -> list[str]:
        """Remove guest `zone_id` (a cold zone's id, or a pooled guest's) from the host."""
        removed: list[str] = []
        name = domain_name(zone_id)
        self._workloads.pop(zone_id, None)
        self._route.pop(zone_id, None)
        link = self._links.pop(zone_id, None)
        if link is not None:
            link.close()
        try:
            dom = self.connection.get().lookupByName(name)
        except libvirt.libvirtError:
            dom = None
        gone = self._gone.get(name)
        if gone is not None:
            gone.set()  # our own destroy below is no news for the audit trail
        if dom is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.suspend()  # frozen at once; destroy takes a while
                    if dump:
                        self.options.dump_dir.mkdir(parents=True, exist_ok=True)
                        path = self.options.dump_dir / f"{dump_name or zone_id}.core"
                        dom.coreDumpWithFormat(str(path),
                                               libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW,
                                               libvirt.VIR_DUMP_MEMORY_ONLY)
                        removed.append(f"memory dump {path}")
                    dom.destroy()
                    removed.append(f"domain {name}")
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()
        if egress.remove_egress(zone_id, nft=self.caps.nft or "nft") if self.caps.nft else False:
            removed.append(f"nft table {egress.table_name(zone_id)}")
        removed += netslots.release(zone_id)
        zone_dir = self.options.state_root / zone_id
        if zone_dir.exists():
            shutil.rmtree(zone_dir, ignore_errors=True)
            removed.append(f"directory {zone_dir}")
        self.connection.lifecycle.pop(name, None)
        self.connection.device_removed.pop(name, None)
        return removed

    def adopt(self, zone_id: str, state: dict[str, Any],
              applied: Restrictions) -> tuple[ZoneHandle, Workload | None]:
        handle = ZoneHandle(zone_id, self.backend, state, applied)
        if state.get("parent"):
            # its agent link is its parent's, adopted with it; its end is the agent's
            # "ended" event or the guest's
            gone = self._gone.get(str(state.get("domain")))
            if gone is None or gone.is_set():
                return handle, None
            from hvtsm.zones.libvirt.transient import TransientGuestWorkload

            return handle, TransientGuestWorkload(int(state.get("pid") or 0),
                                                  self.transients.ended(zone_id), gone)
        guest = guest_of(handle)
        name = domain_name(guest)
        try:
            dom = self.connection.get().lookupByName(name)
            active = dom.isActive()
        except libvirt.libvirtError:
            active = False
        if not active:
            return handle, None
        self._watch_domain(name)
        self._route[guest] = zone_id
        try:
            on_problem, on_event = self._handlers(guest)
            link = AgentLink.connect(state["channel"], timeout=10, zone_id=zone_id,
                                     on_problem=on_problem, on_event=on_event)
            link.wait_hello(10)
            self._links[guest] = link
            if state.get("channel_name") is not None:
                link.on_channel = self.hooks.channel_handler(zone_id)
            remote = link.attach(state["workload"])
        except (HvtsmError, KeyError):
            # no agent to ask: the zone lives as long as its domain does
            return handle, DomainWorkload(self._gone[name])
        self._workloads[zone_id] = remote
        return handle, GuestWorkload(remote, self._gone[name])

    def leftovers(self) -> set[str]:
        ids: set[str] = set()
        with contextlib.suppress(libvirt.libvirtError):
            for dom in self.connection.get().listAllDomains(0):
                if dom.name().startswith(DOMAIN_PREFIX):
                    ids.add(dom.name().removeprefix(DOMAIN_PREFIX))
        if self.options.state_root.is_dir():
            ids |= {p.name for p in self.options.state_root.iterdir() if p.is_dir()}
        return ids

    def remove(self, zone_id: str) -> list[str]:
        return self._teardown(zone_id)


def _place(handle: ZoneHandle, spec: ZoneSpec) -> None:
    """Where in the guest the workload starts, and its environment (when the spec says)."""
    if spec.cwd is not None:
        handle.state["cwd"] = spec.cwd
    if spec.env is not None:
        handle.state["env"] = dict(spec.env)
    if spec.channel is not None:
        handle.state["channel_name"] = spec.channel


def _require_monitoring(capabilities: Sequence[str], zone_id: str) -> None:
    if "monitor:seccomp" not in capabilities:
        raise ZoneError("the guest agent cannot watch system calls (no seccomp "
                        "user notification in the guest kernel)", zone_id=zone_id,
                        hint="use a guest kernel with CONFIG_SECCOMP_FILTER, or "
                        "set monitor = false in the policy's [anomaly]")


def _make_zone_dir(path: Path) -> None:
    """QEMU runs as its own user and binds the channel socket here."""
    path.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o755)
    try:
        qemu = pwd.getpwnam("libvirt-qemu")
        os.chown(path, qemu.pw_uid, qemu.pw_gid)
    except KeyError:
        pass
    path.chmod(0o750)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""

