"""The guests of a libvirt driver: booting one from the lab template, the agent link of
each, which zone each serves (a pooled guest serves one after another), the domain's
lifecycle events, and removing a guest with everything of it on the host.

A guest's link reports for whichever zone the guest serves at the moment (`serve`); while
it serves none its reports go to `DriverEvents.idle` (its pool taints it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import libvirt

from hvtsm.agent_stage import stage_agent, zone_python
from hvtsm.errors import HvtsmError, ZoneError
from hvtsm.files import read_tail
from hvtsm.host import HostCapabilities
from hvtsm.image.lab import build_lab_image, kernel_cmdline
from hvtsm.monitor.events import LinkEvents, TransientSink
from hvtsm.monitor.link import AgentLink
from hvtsm.restrictions import Restrictions
from hvtsm.zones import netslots
from hvtsm.zones.base import DriverEvents
from hvtsm.zones.command import run
from hvtsm.zones.libvirt import egress
from hvtsm.zones.libvirt.accel import AccelChoice, choose_accel
from hvtsm.zones.libvirt.connection import Connection
from hvtsm.zones.libvirt.options import LibvirtOptions
from hvtsm.zones.libvirt.state import GuestZoneState
from hvtsm.zones.libvirt.templates import DomainParams, render, to_xml

log = logging.getLogger(__name__)

DOMAIN_PREFIX = "hvtsm-"
TAP_PREFIX = "hv"
DEFAULT_MEMORY = 512 * 1024 * 1024


def domain_name(guest: str) -> str:
    return DOMAIN_PREFIX + guest


def tap_name(guest: str) -> str:
    return TAP_PREFIX + guest.removeprefix("z")[:13]


def mac_address(guest: str) -> str:
    import hashlib

    digest = hashlib.sha256(guest.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


class Guests:
    def __init__(self, caps: HostCapabilities, options: LibvirtOptions, events: DriverEvents,
                 *, on_transient: TransientSink) -> None:
        import ipaddress

        self.caps = caps
        self.options = options
        self.events = events
        self._on_transient = on_transient
        self.pool = ipaddress.IPv4Network(options.net_pool)
        self.connection = Connection(options.uri)
        self._accel: AccelChoice | None = None
        #: agent links by guest (a cold zone is its own guest: the zone id)
        self._links: dict[str, AgentLink] = {}
        #: guest -> the zone it serves now, whose audit trail its link reports to
        self._route: dict[str, str] = {}
        self._removed: dict[str, threading.Event] = {}
        self._gone: dict[str, threading.Event] = {}
        self._agent_dir: Path | None = None
        self._python = options.guest_python

    # -- facts ------------------------------------------------------------------------------

    @property
    def accel(self) -> AccelChoice:
        """Probed on first use, not at construction: `hvtsm cleanup` needs no guest."""
        if self._accel is None:
            self._accel = choose_accel(self.options.accel)
            log.info("libvirt zones use %s: %s", self._accel.accel, self._accel.reason)
        return self._accel

    def agent_dir(self) -> Path:
        """The directory the guest puts on PYTHONPATH (staged once per agent version)."""
        if self._agent_dir is None:
            self._agent_dir = stage_agent()
        return self._agent_dir

    def python(self) -> str:
        if self._python is None:
            self._python = zone_python()
        return self._python

    # -- which zone a guest serves ----------------------------------------------------------

    def serve(self, guest: str, zone_id: str) -> None:
        self._route[guest] = zone_id

    def unserve(self, guest: str, zone_id: str | None = None) -> None:
        if zone_id is None or self._route.get(guest) == zone_id:
            self._route.pop(guest, None)

    def serving(self, guest: str) -> str | None:
        return self._route.get(guest)

    def sink(self, guest: str) -> LinkEvents:
        return LinkEvents(self.events, lambda: self._route.get(guest), guest=guest,
                          transient=self._on_transient)

    def link(self, guest: str) -> AgentLink | None:
        return self._links.get(guest)

    def require_link(self, guest: str, zone_id: str | None = None) -> AgentLink:
        link = self._links.get(guest)
        if link is None:
            raise ZoneError("no agent link to the guest", zone_id=zone_id or guest)
        return link

    def link_of_zone(self, zone_id: str) -> AgentLink | None:
        """The link to a zone's (or a pooled guest's) agent."""
        for guest, zone in list(self._route.items()):
            if zone == zone_id:
                return self._links.get(guest)
        return self._links.get(zone_id)

    def gone(self, guest: str) -> threading.Event:
        """Set once the guest's domain stopped (a crash, a destroy)."""
        return self._gone.setdefault(domain_name(guest), threading.Event())

    def removed_event(self, domain: str) -> threading.Event:
        return self._removed.setdefault(domain, threading.Event())

    def domain(self, name: str, zone_id: str) -> Any:
        try:
            return self.connection.get().lookupByName(name)
        except libvirt.libvirtError as exc:
            raise ZoneError(f"guest domain is gone: {exc}", zone_id=zone_id) from exc

    def alive(self, guest: str) -> bool:
        try:
            return bool(self.connection.get().lookupByName(domain_name(guest)).isActive())
        except libvirt.libvirtError:
            return False

    # -- booting ----------------------------------------------------------------------------

    def boot(self, guest: str, zone_id: str, net_index: int, initial: Restrictions, *,
             user: str | None, memory_dump: bool) -> GuestZoneState:
        """Boot guest `guest` (for zone `zone_id`, or for a pool when they are the same)
        with `initial`'s NIC and memory; returns its state once the agent said hello.
        All or nothing: on failure nothing of it remains and ZoneError is raised."""
        name = domain_name(guest)
        zone_dir = self.options.state_root / guest
        state = GuestZoneState(guest=guest, domain=name, dir=str(zone_dir),
                               memory_dump=memory_dump, accel=self.accel.accel.domain_type,
                               user=user)
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
                state.tap, state.host_addr, state.zone_addr = tap, f"{gateway}/30", ip
                state.net_index = index
            memory = initial.memory or DEFAULT_MEMORY
            params = DomainParams(
                name=name, uuid=str(uuid.uuid4()), accel=self.accel.accel.domain_type,
                emulator=None, vcpus=self.options.vcpus, memory_kib=memory // 1024,
                max_memory_kib=memory // 1024, kernel=str(image.kernel),
                initrd=str(image.initrd),
                cmdline=kernel_cmdline(python=self.python(), agent_path=str(self.agent_dir()),
                                       ip=ip, gateway=gateway),
                host_root="/", channel_path=str(zone_dir / "agent.sock"),
                console_log=str(zone_dir / "console.log"), tap=tap, mac=mac_address(guest))
            domain_xml = render(self.options.template, params)
            if not nic:
                for iface in domain_xml.findall("./devices/interface"):
                    iface.getparent().remove(iface)
            state.channel_path, state.console = params.channel_path, params.console_log
            state.nic, state.image = nic, image.digest
            self.watch_domain(name)
            started = time.monotonic()
            dom = self.connection.get().createXML(to_xml(domain_xml), 0)
            if nic:
                # libvirt made the tap; the host's end of the zone's /30 goes on it
                run(["ip", "addr", "add", str(state.host_addr), "dev", tap], zone_id=zone_id)
                run(["ip", "link", "set", tap, "up"], zone_id=zone_id)
            sink = self.sink(guest)
            link = AgentLink.connect(params.channel_path, timeout=self.options.boot_timeout,
                                     zone_id=zone_id, on_problem=sink.problem,
                                     on_event=sink.event, on_channel=sink.channel)
            self._links[guest] = link
            hello = link.wait_hello(self.options.boot_timeout)
            state.boot_ms = round((time.monotonic() - started) * 1000, 1)
            state.agent = {"version": hello.agent_version, "protocol": hello.protocol,
                           "capabilities": list(hello.capabilities)}
            state.uuid = dom.UUIDString()
        except BaseException as exc:
            tail = _tail(Path(state.console or zone_dir / "console.log"))
            with contextlib.suppress(HvtsmError, OSError, libvirt.libvirtError):
                self.teardown(guest)
            if isinstance(exc, libvirt.libvirtError | OSError):
                raise ZoneError(f"cannot create the guest: {exc}", zone_id=zone_id,
                                hint=f"console: {tail}" if tail else None) from exc
            if isinstance(exc, ZoneError) and tail and exc.hint is None:
                exc.hint = f"guest console ends with: {tail}"
            raise
        return state

    def watch_domain(self, name: str) -> None:
        self._gone[name] = threading.Event()
        self._removed[name] = threading.Event()
        self.connection.lifecycle[name] = self._on_lifecycle
        self.connection.device_removed[name] = self._on_device_removed

    # -- pooled guests: links of other processes ---------------------------------------------

    def attach(self, state: Mapping[str, Any], *, timeout: float = 10.0) -> None:
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
        self.watch_domain(name)
        self._links[guest] = self.connect(guest, str(state["channel_path"]), guest,
                                          timeout=timeout)

    def connect(self, guest: str, path: str, zone_id: str, *,
                timeout: float = 10.0) -> AgentLink:
        sink = self.sink(guest)
        link = AgentLink.connect(path, timeout=timeout, zone_id=zone_id,
                                 on_problem=sink.problem, on_event=sink.event,
                                 on_channel=sink.channel)
        try:
            link.wait_hello(timeout)
        except ZoneError:
            link.close()
            raise
        return link

    def adopt_link(self, guest: str, link: AgentLink) -> None:
        self._links[guest] = link

    def detach(self, guest: str) -> None:
        """Close this process's link to a pooled guest (it keeps running) so another
        process can connect to it."""
        link = self._links.pop(guest, None)
        if link is not None:
            link.close()
        name = domain_name(guest)
        self.connection.lifecycle.pop(name, None)
        self.connection.device_removed.pop(name, None)

    # -- events ------------------------------------------------------------------------------

    def _on_lifecycle(self, name: str, event: int, detail: int) -> None:
        if event not in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED,
                         libvirt.VIR_DOMAIN_EVENT_UNDEFINED):
            return
        gone = self._gone.get(name)
        if gone is None or gone.is_set():
            return
        gone.set()
        # a stop we did not ask for (a crash, a shutdown from inside) must reach the audit
        # trail, not only end the workload
        kind = {libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
                libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined"}.get(event, "stopped")
        guest = name.removeprefix(DOMAIN_PREFIX)
        text = f"domain {name} {kind} (libvirt event {event}, detail {detail})"
        zone = self._route.get(guest)
        if zone is None and guest in self._links:
            self.events.idle(guest, "guest-" + kind, text)
        else:
            self.events.note(zone or guest, "guest-" + kind, text)

    def _on_device_removed(self, name: str, alias: str) -> None:
        removed = self._removed.get(name)
        if removed is not None and alias.startswith("net"):
            removed.set()

    # -- removing ----------------------------------------------------------------------------

    def teardown(self, guest: str, *, dump: bool = False, dump_name: str | None = None,
                 plan: bool = False) -> list[str]:
        """Remove guest `guest` (a cold zone's id, or a pooled guest's) from the host; with
        `plan`, only say what would go."""
        removed: list[str] = []
        name = domain_name(guest)
        try:
            dom = self.connection.get().lookupByName(name)
        except libvirt.libvirtError:
            dom = None
        zone_dir = self.options.state_root / guest
        if plan:
            if dom is not None:
                removed.append(f"domain {name}")
            if self.caps.nft and egress.has_egress(guest, nft=self.caps.nft):
                removed.append(f"nft table {egress.table_name(guest)}")
            removed += netslots.held(guest)
            if zone_dir.exists():
                removed.append(f"directory {zone_dir}")
            return removed
        self._route.pop(guest, None)
        link = self._links.pop(guest, None)
        if link is not None:
            link.close()
        gone = self._gone.get(name)
        if gone is not None:
            gone.set()  # our own destroy below is no news for the audit trail
        if dom is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.suspend()  # frozen at once; destroy takes a while
                    if dump:
                        self.options.dump_dir.mkdir(parents=True, exist_ok=True)
                        # a guest's memory holds whatever it read: root's alone
                        self.options.dump_dir.chmod(0o700)
                        path = self.options.dump_dir / f"{dump_name or guest}.core"
                        dom.coreDumpWithFormat(str(path),
                                               libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW,
                                               libvirt.VIR_DUMP_MEMORY_ONLY)
                        removed.append(f"memory dump {path}")
                    dom.destroy()
                    removed.append(f"domain {name}")
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()
        if self.caps.nft and egress.remove_egress(guest, nft=self.caps.nft):
            removed.append(f"nft table {egress.table_name(guest)}")
        removed += netslots.release(guest)
        if zone_dir.exists():
            shutil.rmtree(zone_dir, ignore_errors=True)
            removed.append(f"directory {zone_dir}")
        self.connection.lifecycle.pop(name, None)
        self.connection.device_removed.pop(name, None)
        return removed

    def leftovers(self) -> set[str]:
        ids: set[str] = set()
        with contextlib.suppress(libvirt.libvirtError):
            for dom in self.connection.get().listAllDomains(0):
                if dom.name().startswith(DOMAIN_PREFIX):
                    ids.add(dom.name().removeprefix(DOMAIN_PREFIX))
        if self.options.state_root.is_dir():
            ids |= {p.name for p in self.options.state_root.iterdir() if p.is_dir()}
        return ids


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
        text = read_tail(path, 64 * 1024).decode(errors="replace")  # a log may be huge
        return " | ".join(text.strip().splitlines()[-lines:])
    except OSError:
        return ""
