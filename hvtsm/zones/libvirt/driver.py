"""Libvirt zones: each zone is a transient QEMU domain, its phases applied live.

The guest boots the lab image (hvtsm/image), its init starts the guest agent, and the
workload runs through the agent (hvtsm/monitor/link.py). Boot time is not lifespan: `start`
returns once the agent reports the workload started.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pwd
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Sequence
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
from hvtsm.zones.libvirt.templates import DomainParams, render, to_xml
from hvtsm.zones.libvirt.workload import DomainWorkload, GuestWorkload

log = logging.getLogger(__name__)

DOMAIN_PREFIX = "hvtsm-"
TAP_PREFIX = "hv"
DEFAULT_MEMORY = 512 * 1024 * 1024
#: what QEMU itself needs beside guest memory, for the memtune hard limit
QEMU_OVERHEAD_KIB = {"kvm": 256 * 1024, "qemu": 768 * 1024}
LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE
PERIOD_US = 100_000


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
        self._links: dict[str, AgentLink] = {}
        #: the workload each zone's agent runs, for its guest pid
        self._workloads: dict[str, Any] = {}
        self._removed: dict[str, threading.Event] = {}
        self._gone: dict[str, threading.Event] = {}
        self._agent_dir: Path | None = None
        self._python = self.options.guest_python
        #: the manager's sinks: anomalies, and facts that arrive after `apply` returned
        #: (the unplug completing, the guest seeing its new memory), which it audits
        self.hooks = MonitorHooks()

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
        name = domain_name(zone_id)
        zone_dir = self.options.state_root / zone_id
        state: dict[str, Any] = {"domain": name, "dir": str(zone_dir),
                                 "memory_dump": spec.memory_dump, "accel":
                                 self.accel.accel.domain_type, "user": spec.user, "nic": False}
        handle = ZoneHandle(zone_id, self.backend, state, Restrictions())
        try:
            image = build_lab_image()
            _make_zone_dir(zone_dir)
            nic = initial.network.has_nic
            ip = gateway = None
            tap = tap_name(zone_id)
            if nic:
                index = netslots.reserve(zone_id, spec.net_index, self.pool,
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
                console_log=str(zone_dir / "console.log"), tap=tap, mac=mac_address(zone_id))
            domain_xml = render(self.options.template, params)
            if not nic:
                for iface in domain_xml.findall("./devices/interface"):
                    iface.getparent().remove(iface)
            state.update(channel=params.channel_path, console=params.console_log,
                         nic=nic, image=image.digest)
            self._gone[name] = threading.Event()
            self._removed[name] = threading.Event()
            self.connection.lifecycle[name] = self._on_lifecycle
            self.connection.device_removed[name] = self._on_device_removed
            started = time.monotonic()
            dom = self.connection.get().createXML(to_xml(domain_xml), 0)
            if nic:
                # libvirt made the tap; the host's end of the zone's /30 goes on it
                run(["ip", "addr", "add", str(state["host_addr"]), "dev", tap],
                    zone_id=zone_id)
                run(["ip", "link", "set", tap, "up"], zone_id=zone_id)
            on_problem, on_event = self.hooks.handlers(zone_id)
            link = AgentLink.connect(params.channel_path, timeout=self.options.boot_timeout,
                                     zone_id=zone_id, on_problem=on_problem,
                                     on_event=on_event)
            self._links[zone_id] = link
            hello = link.wait_hello(self.options.boot_timeout)
            state["boot_ms"] = round((time.monotonic() - started) * 1000, 1)
            state["agent"] = {"version": hello.agent_version, "protocol": hello.protocol,
                              "capabilities": list(hello.capabilities)}
            if spec.monitor is not None:
                if "monitor:seccomp" not in hello.capabilities:
                    raise ZoneError("the guest agent cannot watch system calls (no seccomp "
                                    "user notification in the guest kernel)", zone_id=zone_id,
                                    hint="use a guest kernel with CONFIG_SECCOMP_FILTER, or "
                                    "set monitor = false in the policy's [anomaly]")
                state["monitor"] = dict(spec.monitor)
            if spec.channel is not None:
                state["channel_name"] = spec.channel
            state["uuid"] = dom.UUIDString()
            # the same code path as a later phase: one way to put limits on a guest
            self.apply(handle, initial, first=True)
        except BaseException as exc:
            tail = _tail(Path(state.get("console", zone_dir / "console.log")))
            with contextlib.suppress(HvtsmError, OSError, libvirt.libvirtError):
                self._teardown(zone_id)
            if isinstance(exc, libvirt.libvirtError | OSError):
                raise ZoneError(f"cannot create the guest: {exc}", zone_id=zone_id,
                                hint=f"console: {tail}" if tail else None) from exc
            if isinstance(exc, ZoneError) and tail and exc.hint is None:
                exc.hint = f"guest console ends with: {tail}"
            raise
        return handle

    def start(self, handle: ZoneHandle, argv: Sequence[str], io: WorkloadIO) -> Workload:
        link = self._link(handle)
        # WorkloadIO's None means "inherit", as for a local process: the controller's own
        # stdout/stderr; the link would discard None
        stdout = sys.stdout.fileno() if io.stdout is None else io.stdout
        stderr = sys.stderr.fileno() if io.stderr is None else io.stderr
        static = handle.state.get("monitor")
        channel = handle.state.get("channel_name")
        if channel is not None:
            link.on_channel = self.hooks.channel_handler(handle.zone_id)
        remote = link.start(argv, user=handle.state.get("user"), stdout=stdout,
                            stderr=stderr,
                            monitor=None if static is None else zone_profile(static,
                                                                             handle.applied),
                            channel=channel)
        handle.state["workload"] = remote.id
        self._workloads[handle.zone_id] = remote
        return GuestWorkload(remote, self._gone[handle.state["domain"]])

    def terminate(self, handle: ZoneHandle) -> None:
        remote = self._workloads.get(handle.zone_id)
        # a dump only when the zone is ended under a running workload (policy, reaction,
        # operator), not when cleaning up after the workload finished
        running = remote is not None and remote.poll() is None
        dumped = self._teardown(handle.zone_id,
                                dump=bool(handle.state.get("memory_dump")) and running)
        for item in dumped:
            if item.startswith("memory dump"):
                handle.state["dump"] = item.removeprefix("memory dump ")
                self._report(handle.zone_id, "memory-dump", f"guest memory kept in {item}")
        handle.state.update(nic=False)

    def freeze(self, handle: ZoneHandle) -> None:
        dom = self._domain(handle)
        if dom.info()[0] != libvirt.VIR_DOMAIN_PAUSED:
            dom.suspend()
        handle.state["frozen"] = True

    def thaw(self, handle: ZoneHandle) -> None:
        dom = self._domain(handle)
        if dom.info()[0] == libvirt.VIR_DOMAIN_PAUSED:
            dom.resume()
        handle.state["frozen"] = False

    def stats(self, handle: ZoneHandle) -> ZoneStats:
        dom = self._domain(handle)
        info = dom.info()
        memory = dom.memoryStats()
        rss = memory.get("rss")
        return ZoneStats(procs=info[3], memory_bytes=None if rss is None else rss * 1024,
                         cpu_usage_ns=info[4], frozen=info[0] == libvirt.VIR_DOMAIN_PAUSED)

    # -- tightening ---------------------------------------------------------------------------

    def apply(self, handle: ZoneHandle, restrictions: Restrictions, *,
              first: bool = False) -> ApplyReport:
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
            egress.set_egress(handle.zone_id, state["tap"], restrictions.egress,
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
        link = self._links.get(handle.zone_id)
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

    def channel_link(self, zone_id: str) -> AgentLink | None:
        """The link a zone's channel messages travel on (None: none, or closed)."""
        link = self._links.get(zone_id)
        return link if link is not None and not link.closed else None

    def agent_link(self, zone_id: str) -> AgentLink | None:
        """The link to a zone's guest agent (probes, administrative commands)."""
        return self._links.get(zone_id)

    def _link(self, handle: ZoneHandle) -> AgentLink:
        link = self._links.get(handle.zone_id)
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
                self._report(name.removeprefix(DOMAIN_PREFIX), "guest-" + kind,
                             f"domain {name} {kind} (libvirt event {event}, detail {detail})")

    def _on_device_removed(self, name: str, alias: str) -> None:
        removed = self._removed.get(name)
        if removed is not None and alias.startswith("net"):
            removed.set()

    # -- teardown, adoption, leftovers --------------------------------------------------------

    def _teardown(self, zone_id: str, *, dump: bool = False) -> list[str]:
        removed: list[str] = []
        name = domain_name(zone_id)
        self._workloads.pop(zone_id, None)
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
                        path = self.options.dump_dir / f"{zone_id}.core"
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
        name = domain_name(zone_id)
        try:
            dom = self.connection.get().lookupByName(name)
            active = dom.isActive()
        except libvirt.libvirtError:
            active = False
        if not active:
            return handle, None
        self._gone[name] = threading.Event()
        self._removed[name] = threading.Event()
        self.connection.lifecycle[name] = self._on_lifecycle
        self.connection.device_removed[name] = self._on_device_removed
        try:
            on_problem, on_event = self.hooks.handlers(zone_id)
            link = AgentLink.connect(state["channel"], timeout=10, zone_id=zone_id,
                                     on_problem=on_problem, on_event=on_event)
            link.wait_hello(10)
            self._links[zone_id] = link
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

